"""``python -m jobs.serve``: every flag documented, clear errors, and a real server that stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from jobs.serve import build_parser, main, settings_args
from tests.pipelines.serve_harness import encode, free_port, save_tiny_model, shapes_image, wait_until_healthy

REPO = Path(__file__).resolve().parents[3]


def test_help_documents_every_flag() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.dest
    assert "VGLAW_SERVE_TOKEN" in text and "RAY_ADDRESS" in text


def test_arguments_become_builder_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VGLAW_SERVE_TOKEN", "env-token")
    args = settings_args(build_parser().parse_args(["--model", "model", "--replicas", "3", "--max-batch-size", "4"]))
    assert args["model"] == str(model_dir.resolve()) and args["auth_token"] == "env-token"
    assert (args["min_replicas"], args["max_replicas"], args["max_batch_size"]) == (3, 3, 4)
    (tmp_path / "token").write_text("file-token\n")
    args = settings_args(build_parser().parse_args(["--model", "models:/m@best", "--token-file", "token"]))
    assert (args["model"], args["auth_token"]) == ("models:/m@best", "file-token")


def test_bad_arguments_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "no VG-LAW model directory" in capsys.readouterr().err
    assert main(["--model", "models:/m@best", "--detach"]) == 2
    assert "--detach needs a running cluster" in capsys.readouterr().err
    assert main(["--model", "models:/m@best", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


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
