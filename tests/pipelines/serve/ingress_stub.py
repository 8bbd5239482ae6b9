"""The real ingress in-process, in front of a stub model: the stub of the model deployment's handle, request bodies
as clients build them, and a request driven through the ASGI app message by message."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from pipelines.serve.app import app
from pipelines.serve.model import GroundingOutcome
from tests.pipelines.serve_harness import encode, shapes_image

PNG = encode(shapes_image(64, 48))
PNG_B64 = base64.b64encode(PNG).decode()
SERVER_DIR = "/srv/secret/models/vglaw-7"  # the stub model's source: must never reach a client


class _Method:
    """One method of a deployment handle: ``remote(*args)`` gives an awaitable, as Serve's responses are."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        async def call() -> Any:
            result = self.fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return call()


class StubModel:
    """What the ingress calls on its :class:`GroundingModel` handle; records the items that reached it."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.outcome = GroundingOutcome(box=[1.0, 2.0, 30.0, 40.0], box_normalized=[0.0, 0.0, 0.5, 0.8], batch_size=1)
        self.info_error: Exception | None = None
        self.ground_gate: asyncio.Event | None = None  # when set, ground waits for it
        self.info, self.stats, self.ground = _Method(self._info), _Method(self._stats), _Method(self._ground)

    def _info(self) -> dict[str, Any]:
        if self.info_error is not None:
            raise self.info_error
        return {"name": "vglaw-7", "version": "3", "source": SERVER_DIR, "preset": "tiny", "image_size": 32}

    def _stats(self) -> dict[str, Any]:
        return {"replica": "stub", "requests": len(self.items)}

    async def _ground(self, item: Any) -> GroundingOutcome:
        self.items.append(item)
        if self.ground_gate is not None:
            await self.ground_gate.wait()
        return self.outcome


def json_body(**fields: Any) -> bytes:
    """A JSON body with a valid image and expression, ``fields`` replacing or adding members."""
    return json.dumps({"image": PNG_B64, "expression": "the circle", **fields}).encode()


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "vglaw-b0undary") -> tuple[bytes, str]:
    """A multipart body from (name, raw bytes, filename or None for a text part) and its Content-Type."""
    chunks = []
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def form(expression: bytes | None = b"the circle", image: bytes | None = PNG, **fields: bytes) -> tuple[bytes, str]:
    parts = [] if image is None else [("image", image, "x.png")]
    parts += [] if expression is None else [("expression", expression, None)]
    return multipart(parts + [(name, value, None) for name, value in fields.items()])


def post(client: TestClient, body: bytes, content_type: str) -> Any:
    return client.post("/v1/ground", content=body, headers={"Content-Type": content_type})


def raw_json(text: str) -> bytes:
    """A JSON body from text that may hold escapes (``\\ud800``) and raw bytes written as ``\\xNN``."""
    return text.encode("latin-1")


async def asgi_post(body_messages: list[dict[str, Any]], wait_for_model: StubModel | None = None) -> list[dict]:
    """POST /v1/ground through the ASGI app with the given receive messages; returns what the app sent.

    With ``wait_for_model``, the request is cancelled once the model holds it, as Serve cancels a request whose
    client disconnected.
    """
    messages = iter(body_messages)
    sent: list[dict] = []

    async def receive() -> dict[str, Any]:
        try:
            return next(messages)
        except StopIteration:
            await asyncio.Event().wait()  # no more messages: the client neither sends nor leaves
            raise AssertionError("unreachable") from None

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    body, content_type = form()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/ground",
        "raw_path": b"/v1/ground",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    task = asyncio.create_task(app(scope, receive, send))
    if wait_for_model is None:
        await asyncio.wait_for(task, timeout=30)
        return sent
    while not wait_for_model.items:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return sent
