"""``python -m jobs.serve``: flags generated from the settings and documented, the same settings as a Serve config,
clear errors on both paths, and a real server that stops on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pydantic
import pytest
import requests

from jobs.serve import add_setting_flags, build_parser, main, setting_flag, settings_from_args
from pipelines.serve.app import build_app
from pipelines.serve.settings import ServeSettings, optional_base
from tests.pipelines.serve_harness import encode, free_port, save_tiny_model, shapes_image, wait_until_healthy

REPO = Path(__file__).resolve().parents[3]

# A value other than the default for every setting, as a Serve config's ``args:`` would hold it.
CONFIG = {
    "model": "models:/m@best",
    "device": "cpu",
    "precision": "bf16",
    "min_replicas": 2,
    "max_replicas": 5,
    "target_ongoing_requests": 8.0,
    "upscale_delay_s": 3.0,
    "downscale_delay_s": 30.0,
    "look_back_period_s": 15.0,
    "max_ongoing_requests": 32,
    "max_queued_requests": 16,
    "num_cpus": 2.0,
    "num_gpus": 0.5,
    "ingress_replicas": 3,
    "ingress_num_cpus": 0.5,
    "ingress_max_queued_requests": 100,
    "request_timeout_s": 45.0,
    "body_timeout_s": 10.0,
    "max_header_bytes": 8192,
    "retry_after_s": 5,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.02,
    "mask_threshold": 0.4,
    "max_image_bytes": 1000,
    "max_image_pixels": 2000,
    "max_expression_chars": 30,
    "auth_token": "t0k3n",
}


def _settings(argv: list[str]) -> ServeSettings:
    return settings_from_args(build_parser().parse_args(argv))


def test_help_documents_every_flag() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.dest
    assert "VGLAW_SERVE_TOKEN" in text and "RAY_ADDRESS" in text


def test_every_setting_is_a_flag_with_its_default_and_type() -> None:
    actions = {action.dest: action for action in build_parser()._actions}
    for name, field in ServeSettings.model_fields.items():
        action = actions[name]
        assert action.option_strings == [setting_flag(name, field)], name
        assert field.description and field.description in action.help, name
        assert action.required == field.is_required(), name
        if not field.is_required():
            assert action.default == field.default and type(action.default) is type(field.default), name
        base, optional = optional_base(field.annotation)
        if typing.get_origin(base) is typing.Literal:
            assert action.choices == list(typing.get_args(base)), name
            continue
        assert action.choices is None, name
        converted = action.type("3")
        assert type(converted) is base and converted == base("3"), name
        if optional:
            assert action.type("none") is None and action.type("NULL") is None, name
        elif base is not str:
            with pytest.raises(ValueError):
                action.type("none")
    # The defaults of the command line are the settings' own.
    assert _settings(["--model", "m"]) == ServeSettings(model="m")


def test_documented_flag_names_still_work() -> None:
    argv = ["--model", "m", "--num-cpus-per-replica", "2", "--num-gpus-per-replica", "1", "--num-cpus", "3"]
    args = build_parser().parse_args([*argv, "--max-batch-size", "32", "--precision", "bf16", "--device", "cpu"])
    settings = settings_from_args(args)
    assert (settings.num_cpus, settings.num_gpus, args.ray_num_cpus) == (2.0, 1.0, 3)
    assert (settings.max_batch_size, settings.precision, settings.device) == (32, "bf16", "cpu")
    known = {option for action in build_parser()._actions for option in action.option_strings}
    documented = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text().replace("\\\n", " ").splitlines():  # shell continuation lines joined
            if "jobs.serve" in line:
                documented |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", line.split("jobs.serve", 1)[1]))
    assert {"--model", "--host", "--num-gpus-per-replica", "--detach"} <= documented
    assert documented <= known, documented - known


def test_flags_follow_any_settings_model() -> None:
    class Toy(pydantic.BaseModel):
        name: str = pydantic.Field(description="required text")
        verbose: bool = pydantic.Field(False, description="talk more")
        colour: typing.Literal["red", "blue"] = pydantic.Field("red", description="a choice")
        ratio: float | None = pydantic.Field(None, description="maybe a number")

    parser = argparse.ArgumentParser()
    assert add_setting_flags(parser, Toy) == {
        "name": "--name",
        "verbose": "--verbose",
        "colour": "--colour",
        "ratio": "--ratio",
    }
    args = vars(parser.parse_args(["--name", "x", "--verbose", "--colour", "blue", "--ratio", "0.5"]))
    assert Toy.model_validate(args) == Toy(name="x", verbose=True, colour="blue", ratio=0.5)
    args = vars(parser.parse_args(["--name", "x", "--no-verbose", "--ratio", "none"]))
    assert Toy.model_validate(args) == Toy(name="x")
    for bad in (["--verbose"], ["--name", "x", "--colour", "green"], ["--name", "x", "--ratio", "half"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_command_line_equals_the_serve_config() -> None:
    assert set(CONFIG) == set(ServeSettings.model_fields)
    defaults = ServeSettings(model="default")
    assert all(value != getattr(defaults, name) for name, value in CONFIG.items())
    fields = ServeSettings.model_fields
    argv = [text for name, value in CONFIG.items() for text in (setting_flag(name, fields[name]), str(value))]
    from_cli = _settings(argv)
    assert from_cli == ServeSettings.model_validate(CONFIG)
    assert from_cli == ServeSettings.model_validate({name: str(value) for name, value in CONFIG.items()})
    assert _settings(["--model", "m", "--replicas", "3"]) == ServeSettings(model="m", min_replicas=3, max_replicas=3)
    assert _settings(["--model", "m", "--mask-threshold", "none"]) == ServeSettings(model="m", mask_threshold=None)


def test_the_model_reference_passes_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VGLAW_SERVE_TOKEN", "env-token")
    settings = _settings(["--model", "model", "--replicas", "3", "--max-batch-size", "4"])
    assert (settings.model, settings.auth_token) == ("model", None)
    assert (settings.min_replicas, settings.max_replicas, settings.max_batch_size) == (3, 3, 4)
    # NOTE: Serve has no public accessor for a built application's deployments, hence the private attributes.
    ingress = build_app(settings)._bound_deployment
    assert ingress.init_args[0]._bound_deployment.init_args[0] == str(model_dir.resolve())
    assert ingress.init_args[1] == "env-token"
    (tmp_path / "token").write_text("file-token\n")
    settings = _settings(["--model", "models:/m@best", "--token-file", "token"])
    assert (settings.model, settings.auth_token) == ("models:/m@best", "file-token")
    with pytest.raises(ValueError, match="--auth-token or --token-file"):
        _settings(["--model", "m", "--token-file", "token", "--auth-token", "x"])


def test_bad_arguments_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty")]) == 2
    assert "no VG-LAW model directory" in capsys.readouterr().err
    assert main(["--model", "models:/m@best", "--detach"]) == 2
    assert "--detach needs a running cluster" in capsys.readouterr().err
    assert main(["--model", "models:/m@best", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


# name: (command line, what its error says, the Serve config's args alike, what their error says)
BAD_VALUES: dict[str, tuple[list[str], str, dict[str, typing.Any], str]] = {
    "wrong type": (["--max-batch-size", "lots"], "invalid int value: 'lots'", {"max_batch_size": "lots"}, "integer"),
    "not a choice": (["--device", "tpu"], "invalid choice: 'tpu'", {"device": "tpu"}, "'auto', 'cpu' or 'cuda'"),
    "unknown": (
        ["--batch-size", "2"],
        "unrecognized arguments",
        {"batch_size": 2},
        "unknown serve args ['batch_size']",
    ),
    "bad precision": (["--precision", "fp16"], "precision must be one of", {"precision": "fp16"}, "must be one of"),
    "zero limit": (
        ["--max-image-pixels", "0"],
        "max_image_pixels must be a positive int",
        {"max_image_pixels": 0},
        "max_image_pixels must be a positive int",
    ),
    "negative limit": (
        ["--max-expression-chars", "-5"],
        "max_expression_chars must be a positive int",
        {"max_expression_chars": -5},
        "max_expression_chars must be a positive int",
    ),
    "zero replicas": (
        ["--ingress-replicas", "0"],
        "--ingress-replicas: Input should be greater than or equal to 1",
        {"ingress_replicas": 0},
        "greater than or equal to 1",
    ),
    "negative resources": (
        ["--num-gpus-per-replica", "-1"],
        "--num-gpus-per-replica [num_gpus]: Input should be greater than or equal to 0",
        {"num_gpus": -1},
        "greater than or equal to 0",
    ),
    "replicas crossed": (
        ["--min-replicas", "3"],
        "need min_replicas <= max_replicas, got 3 > 1",
        {"min_replicas": 3},
        "need min_replicas <= max_replicas",
    ),
    "batch window": (
        ["--batch-wait-timeout-s", "60"],
        "batch_wait_timeout_s must be in [0, 10]",
        {"batch_wait_timeout_s": 60},
        "batch_wait_timeout_s must be in [0, 10]",
    ),
    "a bool for a number": (["--num-cpus-per-replica", "yes"], "invalid float value", {"num_cpus": True}, "bool"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_clear_errors_on_both_paths(case: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    argv, cli_error, args, config_error = BAD_VALUES[case]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        code = main(["--model", "models:/m@best", *argv])
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    assert code == 2
    assert cli_error in capsys.readouterr().err
    # What `serve run` and `serve deploy` do with the args (Serve's own call of a typed builder).
    with pytest.raises(pydantic.ValidationError) as info:
        call_user_app_builder_with_args_if_necessary(build_app, {"model": "models:/m@best", **args})
    assert config_error in str(info.value)


def test_a_public_address_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("VGLAW_SERVE_TOKEN", raising=False)
    assert main(["--model", str(model_dir), "--host", "0.0.0.0"]) == 2
    assert "no token is set" in capsys.readouterr().err


@pytest.mark.slow
def test_serves_until_interrupted(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["VGLAW_SERVE_TOKEN"] = "cli-token"
    command = [sys.executable, "-m", "jobs.serve", "--model", str(model_dir), "--port", str(port), "--num-cpus", "2"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        assert wait_until_healthy(url, process, timeout=180), (tmp_path / "serve.log").read_text()[-3000:]
        files = {"image": ("x.png", encode(shapes_image(90, 60)))}
        assert requests.post(f"{url}/v1/ground", files=files, data={"expression": "a"}).status_code == 401
        response = requests.post(
            f"{url}/v1/ground",
            files=files,
            data={"expression": "the circle"},
            headers={"Authorization": "Bearer cli-token"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["image"] == {"width": 90, "height": 60}
        while "serving; Ctrl-C stops" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # /healthz can answer a moment before serve.run returns
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=180) == 0  # Serve stops in ~10 s on an idle 2-core machine
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert f"VG-LAW grounding at http://127.0.0.1:{port}/" in output and "stopping" in output
