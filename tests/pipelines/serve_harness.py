"""A running grounding application for the Serve tests: a tiny model, a free port, Serve up and down."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image, ImageDraw

import vglaw

APP_NAME = "vglaw"
EXPRESSIONS = [
    "the small red circle",
    "the blue square on the left",
    "a big green triangle on the right",
    "the rightmost shape",
]


def save_tiny_model(directory: Path) -> Path:
    """An untrained (seeded) tiny model with a tokenizer fitted to :data:`EXPRESSIONS`; returns its directory."""
    torch.manual_seed(0)
    tokenizer = vglaw.ExpressionTokenizer.train(EXPRESSIONS * 4, vocab_size=200)
    model = vglaw.create_model("tiny", vocab_size=tokenizer.vocab_size)
    return vglaw.save_pretrained(model, tokenizer, directory)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url``'s ``/healthz`` until it answers 200 (True), the server process ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return True
        except requests.RequestException:  # not listening yet, or the proxy holds requests until ready
            pass
        time.sleep(1)
    return False


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    """``image`` encoded as ``fmt`` bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def shapes_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A grey picture with a blue circle and a green square (colours far from the page's red box)."""
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (width, height), (128, 128, 128, 255)[: len(mode)])
    draw = ImageDraw.Draw(image)
    x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    draw.ellipse([x, y, x + width // 3, y + height // 3], fill=(40, 60, 220, 255)[: len(mode)])
    draw.rectangle([width // 2, height // 2, width - 5, height - 5], fill=(30, 170, 60, 255)[: len(mode)])
    return image


@contextlib.contextmanager
def running_app(args: dict[str, Any]) -> Iterator[str]:
    """Serve on 127.0.0.1 with ``build_app(args)`` as :data:`APP_NAME`; yields the base URL.

    Starts an in-process Ray (2 CPUs) unless one is running, and shuts Serve (and a Ray it started) down
    afterwards, so that later test modules can start their own.
    """
    import ray
    from ray import serve

    from pipelines.serve.app import build_app

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
