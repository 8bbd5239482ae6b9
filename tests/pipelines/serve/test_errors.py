"""Every error the grounding endpoint answers: the documented code table, the client's mistakes in both body
types, the HTTP layer's own errors, the model replica's failures, no server paths, quiet logs for clients
that leave.

Fast tests run the real ingress (:class:`GroundingAPI` behind its FastAPI app) in-process, with a stub in
place of the model deployment's handle; the slow ones ask a running Serve application over HTTP.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.testclient import TestClient

from pipelines.serve.app import GroundingAPI, app, public_source
from pipelines.serve.errors import ERROR_CODES
from pipelines.serve.model import GroundingOutcome, ItemError
from tests.pipelines.serve.ingress_stub import (
    PNG,
    PNG_B64,
    SERVER_DIR,
    StubModel,
    asgi_post,
    form,
    json_body,
    multipart,
    post,
    raw_json,
)
from tests.pipelines.serve_harness import running_app, save_tiny_model

REPO = Path(__file__).resolve().parents[3]
LIMITS = {"max_image_bytes": 100_000, "max_image_pixels": 250_000, "max_expression_chars": 50}


# --------------------------------------------------------------------------------------------------
# The code table: defined once in errors.py, listed in docs/api.md, and every raised code is in it
# --------------------------------------------------------------------------------------------------


def docs_error_rows() -> list[str]:
    """The rows of the code table in docs/api.md's "### Errors" section."""
    text = (REPO / "docs" / "api.md").read_text()
    section = text.split("### Errors\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_docs_list_every_error_code() -> None:
    expected = [f"| `{code}` | {error.status} | {error.when} |" for code, error in ERROR_CODES.items()]
    assert docs_error_rows() == expected, "docs/api.md's error table should read:\n" + "\n".join(expected)


def test_openapi_names_the_codes_of_each_status() -> None:
    responses = app.openapi()["paths"]["/v1/ground"]["post"]["responses"]
    for code in ("empty_body", "invalid_text", "duplicate_field", "unauthorized", "overloaded", "inference_failed"):
        assert f"`{code}`" in responses[ERROR_CODES[code].status]["description"]


def _raised_codes() -> list[tuple[str, int, int | None, str]]:
    """(file, line, status or None when not a literal, code) of every ApiError(...) and ItemError(...) built in
    pipelines/serve with a literal code."""
    found = []
    for path in sorted((REPO / "pipelines" / "serve").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("ApiError", "ItemError")):
                continue
            status, code = [*node.args, None, None][:2]
            literal = status.value if isinstance(status, ast.Constant) else None
            for choice in [code.body, code.orelse] if isinstance(code, ast.IfExp) else [code]:  # "a" if x else "b"
                if isinstance(choice, ast.Constant) and isinstance(choice.value, str):
                    found.append((f"{path.name}:{node.lineno}", literal, node.func.id, choice.value))
    return found


def test_every_raised_error_code_is_documented() -> None:
    raised = _raised_codes()
    assert len(raised) > 30
    for where, status, kind, code in raised:
        if kind == "ItemError" and status is not None and status < 500:
            continue  # the model replica's refusals reach clients as internal_error (app.model_error)
        assert code in ERROR_CODES, f"{where}: code {code!r} is not in ERROR_CODES (nor in docs/api.md)"
        documented = ERROR_CODES[code].status
        if status is not None:
            assert documented in (str(status), f"{str(status)[0]}xx"), f"{where}: {code} is {status}, not {documented}"
    # ...and no documented code is dead.
    assert set(ERROR_CODES) == {code for *_, code in raised if code in ERROR_CODES}


# --------------------------------------------------------------------------------------------------
# The real ingress in-process, in front of a stub model (tests/pipelines/serve/ingress_stub.py)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> StubModel:
    """A stub model behind a real GroundingAPI, which the app's routes find as Serve's replica would."""
    stub = StubModel()
    # NOTE: serve.ingress wraps the class in a subclass with an async __init__ that Serve awaits; the routes only
    # need an instance of the class as written, which is the wrapper's first base.
    ingress = GroundingAPI.func_or_class.__mro__[1](stub)
    ingress.reconfigure(LIMITS)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return stub


@pytest.fixture
def client(model: StubModel) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


# The same mistake in both body types: (JSON body, multipart body, status, code).
SAME_MISTAKE: dict[str, tuple[bytes, tuple[bytes, str], int, str]] = {
    "lone surrogate in the expression": (
        raw_json(f'{{"image": "{PNG_B64}", "expression": "a \\ud800 b"}}'),
        form(b"a \xed\xa0\x80 b"),  # the surrogate as (invalid) UTF-8
        422,
        "invalid_text",
    ),
    "invalid UTF-8 in the expression": (
        raw_json(f'{{"image": "{PNG_B64}", "expression": "caf\xe9"}}'),
        form(b"caf\xe9"),  # latin-1, not UTF-8
        422,
        "invalid_text",
    ),
    "lone surrogate in an option": (
        raw_json(f'{{"image": "{PNG_B64}", "expression": "x", "mask_format": "\\udfff"}}'),
        form(mask_format=b"\xed\xbf\xbf"),
        422,
        "invalid_text",
    ),
    "duplicate field": (
        raw_json(f'{{"image": "{PNG_B64}", "expression": "a", "expression": "b"}}'),
        multipart([("image", PNG, "x.png"), ("expression", b"a", None), ("expression", b"b", None)]),
        422,
        "duplicate_field",
    ),
    "unknown field": (json_body(expresion="typo"), form(expresion=b"typo"), 422, "unknown_field"),
    "only invisible characters": (
        json_body(expression="\u200b\u200d\ufeff \u2060\t\u3164\u00ad"),
        form("\u200b\u200d\ufeff \u2060\t\u3164\u00ad".encode()),
        422,
        "empty_expression",
    ),
    "empty expression": (json_body(expression=""), form(b""), 422, "empty_expression"),
    "expression too long": (json_body(expression="a" * 51), form(b"a" * 51), 422, "expression_too_long"),
    "missing expression": (json.dumps({"image": PNG_B64}).encode(), form(None), 422, "missing_field"),
    "missing image": (json.dumps({"expression": "x"}).encode(), form(image=None), 422, "missing_field"),
    "threshold out of range": (json_body(threshold=1.5), form(threshold=b"1.5"), 422, "invalid_field"),
    "threshold not a number": (json_body(threshold="high"), form(threshold=b"high"), 422, "invalid_field"),
    "bad mask format": (json_body(mask_format="jpeg"), form(mask_format=b"jpeg"), 422, "invalid_field"),
    "bad return_mask": (json_body(return_mask="maybe"), form(return_mask=b"maybe"), 422, "invalid_field"),
    "empty body": (b"", (b"", "multipart/form-data; boundary=b"), 400, "empty_body"),
    "not an image": (
        json_body(image=base64.b64encode(b"just some text").decode()),
        form(image=b"just some text"),
        400,
        "invalid_image",
    ),
    "empty image": (json_body(image=""), form(image=b""), 400, "empty_image"),
}

# Mistakes only one body type can make: (body, Content-Type, status, code).
ONE_KIND_MISTAKE: dict[str, tuple[bytes, str, int, str]] = {
    "data URL without a comma": (json_body(image="data:image/png;base64"), "application/json", 400, "invalid_base64"),
    "data URL without base64": (
        json_body(image="data:image/png," + PNG_B64),
        "application/json",
        400,
        "invalid_base64",
    ),
    "deeply nested JSON": (
        b'{"image": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        "application/json",
        400,
        "malformed_json",
    ),
    "a number of 5000 digits": (b'{"threshold": ' + b"7" * 5000 + b"}", "application/json", 400, "malformed_json"),
    "NaN": (b'{"image": "", "expression": "x", "threshold": NaN}', "application/json", 400, "malformed_json"),
    "JSON array": (b"[1, 2]", "application/json", 400, "malformed_json"),
    "invalid UTF-8 outside strings": (b'{"image": "", \xff}', "application/json", 400, "malformed_json"),
    "no closing boundary": (form()[0][:-20], form()[1], 400, "malformed_multipart"),
    "part without a name": (
        b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
        400,
        "malformed_multipart",
    ),
    "not multipart at all": (b"hello", "multipart/form-data; boundary=b", 400, "malformed_multipart"),
    "multipart without boundary": (b"--b\r\n", "multipart/form-data", 400, "malformed_multipart"),
    "image as a text part": (
        *multipart([("image", PNG_B64.encode(), None), ("expression", b"x", None)]),
        422,
        "invalid_field",
    ),
    "expression as a file": (
        *multipart([("image", PNG, "x.png"), ("expression", b"x", "e.txt")]),
        422,
        "invalid_field",
    ),
    "text/plain": (b"hello", "text/plain", 415, "unsupported_media_type"),
}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


@pytest.mark.parametrize("case", sorted(SAME_MISTAKE))
def test_the_same_mistake_has_the_same_code_in_json_and_multipart(
    client: TestClient, model: StubModel, case: str
) -> None:
    as_json, (as_form, form_type), status, code = SAME_MISTAKE[case]
    json_error = assert_error(post(client, as_json, "application/json"), status, code)
    form_error = assert_error(post(client, as_form, form_type), status, code)
    assert json_error.get("field") == form_error.get("field")
    assert model.items == [], "a refused request reached the model"


@pytest.mark.parametrize("case", sorted(ONE_KIND_MISTAKE))
def test_each_body_mistake_is_a_documented_4xx(client: TestClient, model: StubModel, case: str) -> None:
    body, content_type, status, code = ONE_KIND_MISTAKE[case]
    assert_error(post(client, body, content_type), status, code)
    assert model.items == []


def test_good_requests_reach_the_model(client: TestClient, model: StubModel) -> None:
    for body, content_type in [(json_body(expression=" the red circle "), "application/json"), form(b"the red circle")]:
        response = post(client, body, content_type)
        assert response.status_code == 200, response.text
        assert response.json()["box"] == [1.0, 2.0, 30.0, 40.0] and response.json()["expression"] == "the red circle"
    assert [item.expression for item in model.items] == ["the red circle"] * 2
    emoji = post(client, json_body(expression="the 🐶 on the left"), "application/json")
    assert emoji.status_code == 200 and emoji.json()["expression"] == "the 🐶 on the left"


def test_http_layer_errors_are_the_documented_json(client: TestClient) -> None:
    assert_error(client.get("/v2/ground"), 404, "not_found")
    assert_error(client.post("/nope/../x"), 404, "not_found")
    error = assert_error(client.get("/v1/ground"), 405, "method_not_allowed")
    assert "POST" in error["message"]
    response = client.delete("/healthz")
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert_error(client.put("/v1/model"), 405, "method_not_allowed")
    head = client.head("/nope")
    assert head.status_code == 404 and head.content == b""


def test_health_answers_head_and_names_no_server_path(client: TestClient, model: StubModel) -> None:
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/healthz").json() == {"status": "ok", "model": {"name": "vglaw-7", "version": "3"}}
    assert client.head("/").status_code == 200
    model.info_error = BackPressureError(num_queued_requests=64, max_queued_requests=64)
    busy = client.get("/healthz")
    assert busy.status_code == 200 and busy.json()["status"] == "busy"
    model.info_error = FileNotFoundError(f"{SERVER_DIR}/weights.safetensors is gone")
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json() == {"status": "unavailable", "detail": "FileNotFoundError"}
    assert client.head("/healthz").status_code == 503


def test_model_info_shows_no_server_path(client: TestClient) -> None:
    response = client.get("/v1/model")
    assert response.status_code == 200, response.text
    assert response.json()["model"]["source"] == "vglaw-7"
    assert "/srv/" not in response.text


def test_public_source() -> None:
    assert public_source("/srv/models/vglaw/model") == "model"
    assert public_source("runs/vglaw-synthetic/model/") == "model"
    assert public_source("file:///srv/models/vg") == "vg"
    assert public_source("C:\\models\\vg") == "vg"
    for uri in ("models:/vglaw@best", "models:/vglaw/3", "runs:/0123abcd/model", "s3://bucket/models/vg"):
        assert public_source(uri) == uri
    assert public_source("https://user:secret@host/models/vg") == "https://host/models/vg"


def test_a_model_replica_refusal_is_a_server_error(client: TestClient, model: StubModel) -> None:
    model.outcome = GroundingOutcome(error=ItemError(422, "invalid_item", "canvas must be uint8"))
    assert_error(post(client, *form()), 500, "internal_error")
    model.outcome = GroundingOutcome(error=ItemError(500, "inference_failed", f"RuntimeError: {SERVER_DIR}/x.py"))
    error = assert_error(post(client, *form()), 500, "inference_failed")
    assert SERVER_DIR not in error["message"]


# --------------------------------------------------------------------------------------------------
# Clients that go away
# --------------------------------------------------------------------------------------------------


def test_a_client_leaving_during_the_body_is_one_info_line(model: StubModel, caplog: pytest.LogCaptureFixture) -> None:
    body, _ = form()
    caplog.set_level(logging.DEBUG)
    messages = [{"type": "http.request", "body": body[:100], "more_body": True}, {"type": "http.disconnect"}]
    asyncio.run(asgi_post(messages))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    (record,) = [r for r in caplog.records if "disconnect" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None and "\n" not in record.getMessage()
    assert model.items == []


def test_a_client_leaving_while_the_model_works_logs_nothing_above_info(
    model: StubModel, caplog: pytest.LogCaptureFixture
) -> None:
    body, _ = form()
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        model.ground_gate = asyncio.Event()  # never set: the model holds the request until it is cancelled
        await asgi_post([{"type": "http.request", "body": body, "more_body": False}], wait_for_model=model)

    asyncio.run(scenario())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


# --------------------------------------------------------------------------------------------------
# Through a running Serve application (slow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running application; its 1 s batch window keeps a request in the model while its client leaves."""
    import ray

    model_dir = save_tiny_model(tmp_path_factory.mktemp("errors") / "vglaw-tiny")
    # NOTE: a Ray of its own, so that the session logs read below hold only this application's workers.
    if ray.is_initialized():
        ray.shutdown()
    with running_app({"model": str(model_dir), "batch_wait_timeout_s": 1.0, **LIMITS}) as url:
        yield url


@pytest.mark.slow
def test_served_mistakes_are_documented_4xx(served: str) -> None:
    for case, (as_json, (as_form, form_type), status, code) in SAME_MISTAKE.items():
        for body, content_type in ((as_json, "application/json"), (as_form, form_type)):
            response = requests.post(f"{served}/v1/ground", data=body, headers={"Content-Type": content_type})
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (case, response.text)
    for case, (body, content_type, status, code) in ONE_KIND_MISTAKE.items():
        response = requests.post(f"{served}/v1/ground", data=body, headers={"Content-Type": content_type})
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (case, response.text)
    good = requests.post(f"{served}/v1/ground", data=json_body(), headers={"Content-Type": "application/json"})
    assert good.status_code == 200, good.text


@pytest.mark.slow
def test_served_http_layer_errors_health_and_model_info(served: str) -> None:
    for method, path, status, code in [
        ("GET", "/v2/ground", 404, "not_found"),
        ("GET", "/v1/ground", 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
        ("POST", "/v1/model", 405, "method_not_allowed"),
    ]:
        response = requests.request(method, f"{served}{path}", timeout=30)
        assert response.status_code == status and response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == code
    head = requests.head(f"{served}/healthz", timeout=30)
    assert head.status_code == 200 and head.content == b""
    info = requests.get(f"{served}/v1/model", timeout=30)
    assert info.json()["model"]["source"] == "vglaw-tiny"
    assert "/tmp" not in info.text and str(REPO) not in info.text


def _session_logs() -> Path:
    import ray

    # NOTE: Ray has no public accessor for its session directory, under which Serve and the workers log.
    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def _log_sizes(logs: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in logs.rglob("*") if path.is_file()}


def _new_log_lines(logs: Path, before: dict[Path, int]) -> dict[str, list[str]]:
    """What each log file gained since ``before``, by path relative to ``logs``."""
    gained = {}
    for path in sorted(logs.rglob("*")):
        if path.is_file() and path.stat().st_size > before.get(path, 0):
            with path.open("rb") as f:
                f.seek(before.get(path, 0))
                gained[str(path.relative_to(logs))] = f.read().decode("utf-8", "replace").splitlines()
    return gained


def _tracebacks(lines: list[str]) -> list[str]:
    """Each traceback in ``lines``: from its "Traceback" line to the first line after it that is not indented."""
    blocks, block = [], None
    for line in lines:
        if "Traceback (most recent call last)" in line:
            block = [line]
        elif block is not None:
            block.append(line)
            if line and not line[0].isspace():
                blocks.append("\n".join(block))
                block = None
    return blocks + (["\n".join(block)] if block else [])


def _proxy_lines(gained: dict[str, list[str]]) -> list[str]:
    return [line for name, lines in gained.items() if name.startswith("serve/proxy_") for line in lines]


@pytest.mark.slow
def test_served_clients_that_leave_are_logged_quietly(served: str) -> None:
    logs = _session_logs()
    before = _log_sizes(logs)
    body = json_body()
    head = b"POST /v1/ground HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    address = (urlsplit(served).hostname, urlsplit(served).port)
    with socket.create_connection(address) as sock:  # leaves while the ingress reads the body
        sock.sendall(head + body[:100])
        time.sleep(1.0)
    with socket.create_connection(address) as sock:  # leaves while the request waits in the model's batch
        sock.sendall(head + body)
        time.sleep(0.3)
    # The proxy logs each client that left (499); then give the replicas a moment to log their side.
    deadline = time.monotonic() + 30
    while sum(" 499 " in line for line in _proxy_lines(_new_log_lines(logs, before))) < 2:
        assert time.monotonic() < deadline, _proxy_lines(_new_log_lines(logs, before))
        time.sleep(0.5)
    time.sleep(2)
    gained = _new_log_lines(logs, before)
    for name, lines in gained.items():
        if name.startswith("serve/"):  # what Serve, the app and the replicas log, request by request
            loud = [line for line in lines if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line]
            if "GroundingAPI" in name or "GroundingModel" in name:
                loud += [line for line in lines if line.startswith("WARNING")]
        else:
            # NOTE: a worker's raw stderr also gets Ray's own troubles on a loaded machine (such as a metrics
            # report that timed out); only a traceback through this project's code is about the request.
            loud = [block for block in _tracebacks(lines) if "/pipelines/" in block or "/vglaw/" in block]
        assert loud == [], f"{name}: " + "\n".join(lines)
    assert requests.post(f"{served}/v1/ground", data=body, headers={"Content-Type": "application/json"}).ok
