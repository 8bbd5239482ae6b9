"""Serve a VG-LAW model over HTTP with Ray Serve: ``POST /v1/ground``, ``GET /v1/model``, ``GET /healthz`` and a
web page at ``/``.

Usage::

    python -m jobs.serve --model <model dir | models:/name@alias | models:/name/version | runs:/id/model> \\
        [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--min-replicas 1 --max-replicas 4] ...

Starts a local Ray (or joins ``RAY_ADDRESS``), deploys the application ``pipelines.serve:build_app`` and serves
until Ctrl-C (or SIGTERM), then shuts it down. ``--detach`` deploys onto a running cluster and returns. Set
``VGLAW_SERVE_TOKEN`` (or ``--token-file``) to require ``Authorization: Bearer <token>`` on ``/v1/*``.
The application's flags are generated from :class:`~pipelines.serve.settings.ServeSettings`, so that a command
line and a Serve config's ``args:`` mean the same settings. See docs/api.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipelines.runtime import ensure_ray
from pipelines.serve.app import build_app
from pipelines.serve.settings import NONE_WORDS, TOKEN_ENV, ServeSettings, optional_base
from pipelines.tracking.registry import resolve_model

SETTINGS_GROUP = "application (the args of pipelines.serve:build_app, named in brackets where they differ)"


def setting_flag(name: str, field: FieldInfo) -> str:
    """The flag of a settings field: ``--kebab-case`` of its name, unless the field names one (``"flag"``)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("flag", "--" + name.replace("_", "-")))


def _renamed_note(name: str, flag: str) -> str:
    """`` [name]`` when the flag is not the plain ``--kebab-case`` of the Serve arg it sets, else nothing."""
    return "" if flag == "--" + name.replace("_", "-") else f" [{name}]"


def _text_to(base: type, optional: bool) -> Callable[[str], Any]:
    """The argparse ``type`` of a field: ``base`` itself, or for an optional one also ``none`` -> None."""
    if not optional:
        return base

    def convert(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else base(text)

    convert.__name__ = base.__name__  # argparse names it in "invalid float value: ..."
    return convert


def add_setting_flags(group: argparse._ActionsContainer, settings: type[BaseModel]) -> dict[str, str]:
    """Adds one flag per field of ``settings``, in declaration order, and returns ``{field: flag}``.

    The field gives the flag everything: its name (``dest`` too), type, default or ``required``, and help (the
    description). A bool becomes ``--flag/--no-flag``, a ``Literal`` a choice; an optional field also takes
    ``none``. Ranges and cross-field rules stay with the model, which checks the parsed values.
    """
    flags: dict[str, str] = {}
    for name, field in settings.model_fields.items():
        flag = setting_flag(name, field)
        base, optional = optional_base(field.annotation)
        help_text = (field.description or name).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name}
        if field.is_required():
            kwargs["required"] = True
        else:
            kwargs["default"] = field.get_default(call_default_factory=True)
            shown = "none" if kwargs["default"] is None else kwargs["default"]
            help_text += f" (default: {shown})"
        help_text += _renamed_note(name, flag)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
        else:
            kwargs["type"] = _text_to(base, optional)
            kwargs["metavar"] = base.__name__.upper() if base in (int, float) else None
        group.add_argument(flag, help=help_text, **kwargs)
        flags[name] = flag
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: the :class:`ServeSettings` flags plus how and where to run them."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.serve",
        description="Serve image + referring expression -> box + mask over HTTP with Ray Serve: POST /v1/ground "
        "(multipart or JSON), GET /v1/model, GET /healthz, and a web page at /. Blocks until Ctrl-C.",
        epilog=f"Honours RAY_ADDRESS, MLFLOW_TRACKING_URI and {TOKEN_ENV} (the bearer token; unset: no auth). "
        "The same application runs with `serve run pipelines.serve:build_app model=...` or "
        "`serve deploy cluster/serve.yaml`; an optional setting takes `none`.",
    )
    app = p.add_argument_group(SETTINGS_GROUP)
    add_setting_flags(app, ServeSettings)
    app.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="INT",
        help="fixed number of model replicas: sets --min-replicas and --max-replicas",
    )
    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    net.add_argument("--route-prefix", default="/", help="URL prefix of the application (default /)")
    net.add_argument("--name", default="vglaw", help="Serve application name (default vglaw)")
    net.add_argument(
        "--token-file", type=Path, default=None, help=f"read the bearer token from this file instead of ${TOKEN_ENV}"
    )
    net.add_argument(
        "--allow-no-auth",
        action="store_true",
        help=f"listen on a non-loopback --host without a token (refused by default; set {TOKEN_ENV} instead)",
    )
    run = p.add_argument_group("Ray")
    run.add_argument(
        "--num-cpus",
        dest="ray_num_cpus",
        type=int,
        default=None,
        metavar="INT",
        help="CPUs of a local Ray (default: all of this machine)",
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="deploy onto the cluster at RAY_ADDRESS and return; the application keeps running "
        "(stop it with `serve delete <name>` or `serve shutdown`)",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The :class:`ServeSettings` of a parsed command line (``--replicas`` and ``--token-file`` applied).

    Raises:
        ValueError: If the settings are invalid (a :class:`pydantic.ValidationError`) or two flags conflict.
        OSError: If the token file cannot be read.
    """
    values = {name: getattr(args, name) for name in ServeSettings.model_fields}
    if args.replicas is not None:
        values["min_replicas"] = values["max_replicas"] = args.replicas
    if args.token_file is not None:
        if values["auth_token"] is not None:
            raise ValueError("give the token once: --auth-token or --token-file")
        values["auth_token"] = args.token_file.read_text().strip() or None
    return ServeSettings.model_validate(values)


def describe_errors(err: ValidationError) -> str:
    """The problems on one line, each naming its flag (and the Serve arg where the names differ)."""
    fields = ServeSettings.model_fields
    lines = []
    for error in err.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        name = str(error["loc"][0]) if error["loc"] else None
        if error["type"] != "value_error":  # the project's own messages name the value already
            message += f" (got {error['input']!r})"
        if name in fields:
            flag = setting_flag(name, fields[name])
            message = f"{flag}{_renamed_note(name, flag)}: {message}"
        lines.append(message)
    return "; ".join(lines)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: treat as reachable
        return False


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if args.detach and not on_cluster:
        print(
            "error: --detach needs a running cluster (RAY_ADDRESS); a local Ray ends with this process", file=sys.stderr
        )
        return 2
    try:
        settings = settings_from_args(args)
        model_path = settings.model_path()
        if model_path is not None:
            # Only a check that fails fast: the reference is passed on as given, and each replica resolves it.
            resolve_model(model_path)
    except ValidationError as err:
        print(f"error: {describe_errors(err)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # FileNotFoundError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    has_token = bool(settings.auth_token or os.environ.get(TOKEN_ENV))
    if not has_token and not _is_loopback(args.host) and not args.allow_no_auth:
        print(
            f"error: --host {args.host} is reachable from other machines and no token is set; set {TOKEN_ENV} "
            "(or --token-file), or pass --allow-no-auth",
            file=sys.stderr,
        )
        return 2

    from ray import serve

    ensure_ray(args.ray_num_cpus)
    # The proxy's deadline, the bound of last resort: Serve's HTTP options are not application args, so it is set
    # here (Serve configs set http_options.request_timeout_s themselves); the ingress has its own, shorter one.
    proxy_timeout = settings.proxy_request_timeout_s()
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": proxy_timeout})
    if not args.detach:
        # NOTE: SIGINT too: a process started in the background of a non-interactive shell inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler of its own.
        signal.signal(signal.SIGTERM, _stop_on_signal)
        signal.signal(signal.SIGINT, _stop_on_signal)
    code = 0
    try:
        serve.run(build_app(settings), name=args.name, route_prefix=args.route_prefix)
        auth = "bearer token required on /v1/*" if has_token else f"no auth (set {TOKEN_ENV} for it)"
        print(f"VG-LAW grounding at http://{args.host}:{args.port}{args.route_prefix} ({auth})", flush=True)
        if args.detach:
            return 0
        print("serving; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, also while the application was still starting
        print("stopping", flush=True)
    except RuntimeError as err:  # a replica failed to start, e.g. the model cannot be fetched or loaded
        print(f"error: the application did not start: {err}", file=sys.stderr)
        code = 1
    if on_cluster:
        serve.delete(args.name)
    else:
        serve.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
