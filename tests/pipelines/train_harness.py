"""Driving a training job from a test: its worker processes, and the moment a checkpoint is safe to resume from."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import psutil


def descendants_named(pid: int, fragment: str) -> list[psutil.Process]:
    """The processes under ``pid`` whose command line or name holds ``fragment``."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if fragment in " ".join(child.cmdline()) or fragment in child.name():
                found.append(child)
        except psutil.Error:
            continue
    return found


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
