"""Serve a VG-LAW model over HTTP with Ray Serve: ``POST /v1/ground``, ``GET /v1/model``, ``GET /healthz`` and a
web page at ``/``.

Usage::

    python -m jobs.serve --model <model dir | models:/name@alias | models:/name/version | runs:/id/model> \\
        [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--min-replicas 1 --max-replicas 4] ...

Starts a local Ray (or joins ``RAY_ADDRESS``), deploys the application ``pipelines.serve:build_app`` and serves
until Ctrl-C (or SIGTERM), then shuts it down. ``--detach`` deploys onto a running cluster and returns. Set
``VGLAW_SERVE_TOKEN`` (or ``--token-file``) to require ``Authorization: Bearer <token>`` on ``/v1/*``.
See docs/api.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.runtime import ensure_ray
from pipelines.serve.app import TOKEN_ENV, ServeSettings, build_app
from pipelines.serve.requests import RequestLimits
from pipelines.tracking.registry import find_model_dir
from vglaw.precision import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.serve",
        description="Serve image + referring expression -> box + mask over HTTP with Ray Serve: POST /v1/ground "
        "(multipart or JSON), GET /v1/model, GET /healthz, and a web page at /. Blocks until Ctrl-C.",
        epilog=f"Honours RAY_ADDRESS, MLFLOW_TRACKING_URI and {TOKEN_ENV} (the bearer token; unset: no auth). "
        "The same application runs with `serve run pipelines.serve:build_app model=...` or "
        "`serve deploy cluster/serve.yaml`.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (from vglaw.save_pretrained) or MLflow URI: models:/name@alias, "
        "models:/name/version, runs:/<run_id>/<path>",
    )
    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    net.add_argument("--route-prefix", default="/", help="URL prefix of the application (default /)")
    net.add_argument("--name", default="vglaw", help="Serve application name (default vglaw)")
    net.add_argument(
        "--token-file", type=Path, default=None, help=f"read the bearer token from this file instead of ${TOKEN_ENV}"
    )
    rep = p.add_argument_group("replicas")
    rep.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="model device (default auto)")
    rep.add_argument(
        "--precision",
        default=None,
        choices=list(PRECISIONS),
        help="forward-pass precision, bf16 through autocast (default: bf16 on CUDA, fp32 on the CPU)",
    )
    rep.add_argument("--replicas", type=int, default=None, help="fixed number of model replicas (no autoscaling)")
    rep.add_argument("--min-replicas", type=int, default=1, help="autoscaling: fewest model replicas (default 1)")
    rep.add_argument("--max-replicas", type=int, default=1, help="autoscaling: most model replicas (default 1)")
    rep.add_argument(
        "--target-ongoing-requests", type=float, default=16.0, help="autoscaling target per replica (default 16)"
    )
    rep.add_argument(
        "--max-ongoing-requests", type=int, default=64, help="requests a model replica holds at once (default 64)"
    )
    rep.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="CPUs per model replica (default 1)")
    rep.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPUs per model replica (default 0)")
    rep.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (default 1)")
    bat = p.add_argument_group("batching and masks (the model's user_config)")
    bat.add_argument("--max-batch-size", type=int, default=16, help="most requests per forward pass (default 16)")
    bat.add_argument(
        "--batch-wait-timeout-s", type=float, default=0.01, help="how long a batch waits to fill (default 0.01)"
    )
    bat.add_argument("--mask-threshold", type=float, default=None, help="mask threshold (default: the model's)")
    lim = p.add_argument_group("request limits (the ingress's user_config)")
    lim.add_argument(
        "--max-image-bytes", type=int, default=RequestLimits.max_image_bytes, help="largest encoded image (10 MiB)"
    )
    lim.add_argument(
        "--max-image-pixels",
        type=int,
        default=RequestLimits.max_image_pixels,
        help="largest width * height, checked before decoding (default 4096 * 4096)",
    )
    lim.add_argument(
        "--max-expression-chars",
        type=int,
        default=RequestLimits.max_expression_chars,
        help="longest expression in characters (default 1000)",
    )
    net.add_argument(
        "--allow-no-auth",
        action="store_true",
        help=f"listen on a non-loopback --host without a token (refused by default; set {TOKEN_ENV} instead)",
    )
    run = p.add_argument_group("Ray")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all of this machine)")
    run.add_argument(
        "--detach",
        action="store_true",
        help="deploy onto the cluster at RAY_ADDRESS and return; the application keeps running "
        "(stop it with `serve delete <name>` or `serve shutdown`)",
    )
    return p


def settings_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`pipelines.serve.app.build_app` arguments for the parsed command line."""
    model = args.model
    if "://" not in model and not model.startswith(("models:/", "runs:/")):
        # Replicas may start in another working directory: hand them an absolute model directory.
        model = str(find_model_dir(Path(model).resolve()))
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV)
    min_replicas = args.replicas if args.replicas is not None else args.min_replicas
    max_replicas = args.replicas if args.replicas is not None else max(args.max_replicas, min_replicas)
    return {
        "model": model,
        "device": args.device,
        "precision": args.precision,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
        "max_ongoing_requests": args.max_ongoing_requests,
        "num_cpus": args.num_cpus_per_replica,
        "num_gpus": args.num_gpus_per_replica,
        "ingress_replicas": args.ingress_replicas,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "mask_threshold": args.mask_threshold,
        "max_image_bytes": args.max_image_bytes,
        "max_image_pixels": args.max_image_pixels,
        "max_expression_chars": args.max_expression_chars,
        "auth_token": token or None,
    }


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
        build_args = settings_args(args)
        ServeSettings.from_args(build_args)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not build_args["auth_token"] and not _is_loopback(args.host) and not args.allow_no_auth:
        print(
            f"error: --host {args.host} is reachable from other machines and no token is set; set {TOKEN_ENV} "
            "(or --token-file), or pass --allow-no-auth",
            file=sys.stderr,
        )
        return 2

    from ray import serve

    ensure_ray(args.num_cpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    if not args.detach:
        # NOTE: SIGINT too: a process started in the background of a non-interactive shell inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler of its own.
        signal.signal(signal.SIGTERM, _stop_on_signal)
        signal.signal(signal.SIGINT, _stop_on_signal)
    code = 0
    try:
        serve.run(build_app(build_args), name=args.name, route_prefix=args.route_prefix)
        auth = "bearer token required on /v1/*" if build_args["auth_token"] else f"no auth (set {TOKEN_ENV} for it)"
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
