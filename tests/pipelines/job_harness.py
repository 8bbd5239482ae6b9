"""Driving the project's jobs from tests: running them, a synthetic dataset to feed them, a training run's
worker processes, and the moment its checkpoint is safe to resume from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def run_job(args: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command from ``cwd`` (the repository root); fails the test with its output if it fails."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def synthetic_parquet(root: Path, env: dict[str, str], images: int, seed: int, *preprocess_args: str) -> Path:
    """The synthetic set (2-3 shapes per image) in ``root/raw``, preprocessed at 128 px into ``root/data``."""
    run_job(
        [PY, "-m", "jobs.synth", "--out", str(root / "raw"), "--images", str(images), "--seed", str(seed),
         "--min-objects", "2", "--max-objects", "3"],
        env,
        120,
    )  # fmt: skip
    run_job(
        [PY, "-m", "jobs.preprocess", "--refer-root", str(root / "raw"), "--out", str(root / "data"),
         "--image-size", "128", *preprocess_args],
        env,
        300,
    )  # fmt: skip
    return root / "data"


def _holds(process: psutil.Process, fragment: str) -> bool:
    try:
        return fragment in " ".join(process.cmdline()) or fragment in process.name()
    except psutil.Error:  # gone, or not ours to read
        return False


def descendants_named(pid: int, fragment: str) -> list[psutil.Process]:
    """The processes under ``pid`` whose command line or name holds ``fragment``."""
    return [child for child in psutil.Process(pid).children(recursive=True) if _holds(child, fragment)]


def processes_named(fragment: str) -> list[psutil.Process]:
    """Every process on this machine whose command line or name holds ``fragment``: also those a separately
    started Ray head node runs, which are not under the process that submitted the job."""
    return [process for process in psutil.process_iter() if _holds(process, fragment)]


def registered_checkpoints(run_dir: Path) -> list[dict]:
    """The checkpoints Ray Train has registered for the run (a folder alone may still be half-written)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def wait_for_checkpoint(driver: subprocess.Popen, run_dir: Path, timeout: float) -> None:
    """Block until the run has a registered checkpoint; fails if the driver ends or ``timeout`` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        if registered_checkpoints(run_dir):
            return
        time.sleep(0.2)
    raise AssertionError(f"no registered checkpoint in {run_dir} (driver exit code {driver.poll()})")


def resumed_step(log: str) -> int:
    """The step the training log says the run resumed from (-1: it never resumed)."""
    steps = [int(m) for m in re.findall(r"resuming from step (\d+) ", log)]
    return steps[-1] if steps else -1
