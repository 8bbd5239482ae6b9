"""The grounding endpoint under load, on loopback: autoscaling up and back down without a failed request, a
full model queue shed as prompt 503s with Retry-After, and slow or oversized clients cut off at their limits
while a well-behaved client is served.

Each test starts its own small application (the tiny model, fractional CPUs) and keeps its load bounded: a
few client threads, a burst of a few dozen requests, a few dozen slow sockets; the timing bounds are
generous because the machine may be busy with other work.
"""

from __future__ import annotations

import asyncio
import io
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from starlette.requests import Request

import pipelines.serve.app as serve_app
from pipelines.serve.errors import ApiError
from pipelines.serve.model import MODEL_DEPLOYMENT, GroundingModel
from pipelines.serve.settings import ConnectionLimits, ServeSettings
from tests.pipelines.serve_harness import APP_NAME, EXPRESSIONS, encode, running_app, save_tiny_model, shapes_image
from vglaw import Predictor

IMAGES = [encode(shapes_image(96 + 16 * i, 80 + 8 * i, seed=i)) for i in range(len(EXPRESSIONS))]
SLOW_FORWARD_S = 0.5
STALLED_FORWARD_S = 8.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve-load") / "model")


def ground(session: requests.Session, url: str, index: int, timeout: float = 60) -> requests.Response:
    """``POST /v1/ground`` with image and expression number ``index`` (of :data:`IMAGES`, :data:`EXPRESSIONS`)."""
    index %= len(IMAGES)
    files = {"image": ("x.png", IMAGES[index])}
    data = {"expression": EXPRESSIONS[index], "return_mask": "false"}
    return session.post(f"{url}/v1/ground", files=files, data=data, timeout=timeout)


def model_replicas() -> dict[str, int]:
    """The model deployment's replicas by state (``RUNNING``, ``STARTING``, ``STOPPING``, ...), from Serve's status."""
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[MODEL_DEPLOYMENT]
    return {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items() if count}


def wait_for(condition: Callable[[], bool], timeout: float, period: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(period)
    return condition()


class ClosedLoop:
    """``clients`` threads, each sending its next request as soon as its previous answer arrived, until stopped.

    Every answer is recorded: ``(status, seconds)``, status 0 for an exception (refused, reset, timed out).
    """

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.results: list[tuple[int, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = ground(session, self.url, index).status_code
                except requests.RequestException:
                    status = 0
                with self._lock:
                    self.results.append((status, time.perf_counter() - start))

    def __enter__(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"

    def statuses(self) -> list[int]:
        with self._lock:
            return [status for status, _ in self.results]


@pytest.mark.slow
def test_the_model_scales_out_under_load_and_back_in_without_failed_requests(model_dir: Path) -> None:
    # Short delays and window so that the test sees both directions within a minute or two; the defaults
    # (docs/api.md) are minutes. A window shorter than Serve's 10 s metrics push is warned about and fine here.
    args = {
        "model": str(model_dir),
        "device": "cpu",
        "min_replicas": 1,
        "max_replicas": 2,
        "num_cpus": 0.25,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        "look_back_period_s": 2,
        "max_batch_size": 4,
    }
    with pytest.warns(FutureWarning, match="look_back_period_s"), running_app(args) as url:
        assert model_replicas() == {"RUNNING": 1}
        seen: list[dict[str, int]] = []

        def scaled_out() -> bool:
            seen.append(model_replicas())
            return seen[-1].get("RUNNING", 0) >= 2

        # Four closed-loop clients keep about four requests ongoing: four times the target of one replica.
        with ClosedLoop(url, clients=4) as heavy:
            assert wait_for(scaled_out, 90), f"no second replica under load; states seen last: {seen[-5:]}"
            served_before = len(heavy.results)
            time.sleep(3)  # both replicas serve for a while
            assert len(heavy.results) > served_before
        # One sequential client keeps at most one request ongoing, within the target of one replica: the
        # deployment scales back in while that client's requests keep arriving.
        with ClosedLoop(url, clients=1) as light:
            assert wait_for(lambda: model_replicas() == {"RUNNING": 1}, 90), f"still {model_replicas()}"
            time.sleep(2)
        statuses = heavy.statuses() + light.statuses()
        assert len(light.results) > 0
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


@pytest.fixture
def slow_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_app deploys a GroundingModel whose every forward pass takes at least :data:`SLOW_FORWARD_S` longer."""
    monkeypatch.setattr(serve_app, "GroundingModel", GroundingModel.options(func_or_class=SlowGroundingModel))


class SlowGroundingModel(GroundingModel.func_or_class):  # type: ignore[misc, name-defined]
    def _predict(self, items: list[Any]) -> list[Any]:
        time.sleep(SLOW_FORWARD_S)  # in the batch's worker thread, as a slow forward pass would be
        return super()._predict(items)


@pytest.mark.slow
def test_a_full_queue_is_answered_503_with_retry_after_promptly(model_dir: Path, slow_model: None) -> None:
    # One replica holding two requests (one batch) and two more queued: a burst of 24 overflows it.
    args = {
        "model": str(model_dir),
        "device": "cpu",
        "max_ongoing_requests": 2,
        "max_batch_size": 2,
        "max_queued_requests": 2,
        "retry_after_s": 1,
    }
    burst = 24
    with running_app(args) as url:
        with requests.Session() as session:
            assert ground(session, url, 0).status_code == 200  # the ingress knows the model before the burst
        barrier = threading.Barrier(burst)
        answers: list[tuple[int, requests.Response | None, float]] = []
        lock = threading.Lock()

        def send(index: int) -> None:
            with requests.Session() as session:
                barrier.wait(timeout=30)
                start = time.perf_counter()
                try:
                    response: requests.Response | None = ground(session, url, index)
                except requests.RequestException:
                    response = None
                with lock:
                    answers.append((index, response, time.perf_counter() - start))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(burst)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads) and len(answers) == burst
        assert all(response is not None for _, response, _ in answers), "a request failed without an answer"
        statuses = sorted(response.status_code for _, response, _ in answers)
        assert set(statuses) <= {200, 503}, statuses
        shed = [(response, seconds) for _, response, seconds in answers if response.status_code == 503]
        served = [(index, response) for index, response, _ in answers if response.status_code == 200]
        assert shed and served, statuses
        for response, seconds in shed:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            # Shed at once, not after waiting for the slow replica (each of its batches takes SLOW_FORWARD_S).
            assert seconds < 2.0, f"a 503 took {seconds:.2f} s"
        assert min(seconds for _, seconds in shed) < 1.0

        predictor = Predictor.from_pretrained(model_dir)
        for index, response in served:
            i = index % len(IMAGES)
            expected = predictor.predict(Image.open(io.BytesIO(IMAGES[i])), EXPRESSIONS[i])
            np.testing.assert_allclose(response.json()["box"], expected.box, atol=1e-3)

        # The burst is over: the service answers normally again.
        with requests.Session() as session:
            for index in range(3):
                assert ground(session, url, index).status_code == 200
            assert session.get(f"{url}/healthz", timeout=30).status_code == 200


class StalledGroundingModel(GroundingModel.func_or_class):  # type: ignore[misc, name-defined]
    def _predict(self, items: list[Any]) -> list[Any]:
        time.sleep(STALLED_FORWARD_S)
        return super()._predict(items)


@pytest.mark.slow
def test_a_request_without_an_answer_in_time_is_504_under_serve_run_too(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is the application's: it holds with no proxy deadline, as under ``serve run <import path>``."""
    monkeypatch.setattr(serve_app, "GroundingModel", GroundingModel.options(func_or_class=StalledGroundingModel))
    args = {"model": str(model_dir), "device": "cpu", "request_timeout_s": 2, "body_timeout_s": 1}
    # running_app is serve.run(build_app(args)): no http_options.request_timeout_s
    with running_app(args) as url, requests.Session() as session:
        start = time.perf_counter()
        response = ground(session, url, 0)
        seconds = time.perf_counter() - start
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        assert 1.9 < seconds < STALLED_FORWARD_S, seconds
        assert session.get(f"{url}/healthz", timeout=30).status_code == 200


def test_the_request_deadline_answers_504_and_cancels_what_it_awaited() -> None:
    cancelled = asyncio.Event()

    async def stalled_model_call() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def handle() -> None:
        async with serve_app.request_deadline(0.05):
            await stalled_model_call()

    async def main() -> ApiError:
        with pytest.raises(ApiError) as caught:
            await handle()
        assert cancelled.is_set()
        return caught.value

    err = asyncio.run(main())
    assert (err.status, err.code) == (504, "request_timeout")

    async def in_time() -> int:
        async with serve_app.request_deadline(None):
            await asyncio.sleep(0.01)
        return 1

    assert asyncio.run(in_time()) == 1


def _head(url: str, length: int) -> bytes:
    """The request line and headers of a JSON ``POST /v1/ground`` whose body will have ``length`` bytes."""
    host = urlsplit(url).netloc
    return (
        f"POST /v1/ground HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _slow_client(url: str, give_up_s: float) -> tuple[bytes, float]:
    """Sends headers, then a body of 100 kB one byte per 0.2 s; returns what the server answered and when."""
    parts = urlsplit(url)
    start = time.monotonic()
    received = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(_head(url, 100_000) + b'{"image": "')
        while time.monotonic() - start < give_up_s:
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    break  # the server closed the connection
                received += chunk
                continue
            try:
                sock.sendall(b"A")
            except OSError:  # reset once the server has answered and closed
                break
    return received, time.monotonic() - start


@pytest.fixture(scope="module")
def deadline_url(model_dir: Path) -> Iterator[str]:
    args = {"model": str(model_dir), "device": "cpu", "body_timeout_s": 3, "max_header_bytes": 8192}
    with running_app(args) as url:
        yield url


@pytest.mark.slow
def test_slow_clients_are_cut_off_at_the_body_deadline_while_others_are_served(deadline_url: str) -> None:
    url, slow_clients, body_timeout_s = deadline_url, 30, 3.0
    outcomes: list[tuple[bytes, float]] = []
    lock = threading.Lock()

    def slow() -> None:
        outcome = _slow_client(url, give_up_s=body_timeout_s + 30)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(slow_clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the slow clients hold their connections
    latencies = []
    with requests.Session() as session:
        while len(outcomes) < slow_clients and len(latencies) < 20:
            start = time.perf_counter()
            response = ground(session, url, len(latencies), timeout=30)
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == slow_clients
    # Served while the slow clients were connected, at a normal latency (a few tens of ms when idle).
    assert len(latencies) >= 3 and max(latencies) < 5.0, latencies
    for received, seconds in outcomes:
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        assert b'"body_timeout"' in received and b"connection: close" in received.lower()
        assert body_timeout_s - 0.5 < seconds < body_timeout_s + 10, seconds


@pytest.mark.slow
def test_oversized_headers_are_431_even_though_the_proxy_takes_them(deadline_url: str) -> None:
    # 64 KiB of headers pass Ray's proxy (httptools has no limit) and are refused by the ingress.
    for size in (9000, 64 * 1024):
        response = requests.post(f"{deadline_url}/v1/ground", headers={"X-Padding": "p" * size}, json={}, timeout=30)
        assert response.status_code == 431, response.text
        assert response.json()["error"]["code"] == "headers_too_large"
        response = requests.get(f"{deadline_url}/v1/model", headers={"X-Padding": "p" * size}, timeout=30)
        assert response.status_code == 431
    with requests.Session() as session:
        assert ground(session, deadline_url, 0).status_code == 200


# --------------------------------------------------------------------------------------------------
# Without Serve: the options build_app sets, the settings' checks, the body deadline and header limit
# --------------------------------------------------------------------------------------------------


def test_build_app_sets_queues_backpressure_and_autoscaling() -> None:
    settings = ServeSettings(model="m", min_replicas=1, max_replicas=3, max_queued_requests=8, retry_after_s=3)
    # NOTE: Serve has no public accessor for a built application's deployments, hence the private attributes.
    ingress = serve_app.build_app(settings)._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert ingress.init_args[2] == ConnectionLimits(60.0, 30.0, 16 * 1024, 3)
    assert (model.max_queued_requests, ingress.max_queued_requests) == (8, 256)
    for deployment in (model, ingress):
        assert (deployment.backpressure_config.status_code, deployment.backpressure_config.retry_after_s) == (503, 3)
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 16)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.look_back_period_s) == (10, 300, 20)
    fixed = serve_app.build_app(ServeSettings(model="m", max_queued_requests=-1))._bound_deployment
    model = fixed.init_args[0]._bound_deployment
    assert model._deployment_config.autoscaling_config is None and model.max_queued_requests == -1


def test_load_settings_are_checked() -> None:
    for bad, message in [
        ({"max_queued_requests": 0}, "max_queued_requests must be -1"),
        ({"ingress_max_queued_requests": -2}, "greater than or equal to -1"),
        ({"body_timeout_s": 60}, "body_timeout_s < request_timeout_s"),
        ({"body_timeout_s": 0}, "body_timeout_s must be a positive"),
        ({"max_header_bytes": 0}, "max_header_bytes must be an int >= 1"),
        ({"request_timeout_s": 0}, "greater than 0"),
        ({"downscale_delay_s": -1}, "greater than or equal to 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServeSettings.model_validate({"model": "m", **bad})
    # Without a request deadline, any body deadline will do.
    settings = ServeSettings.model_validate({"model": "m", "request_timeout_s": "none", "body_timeout_s": "600"})
    assert settings.connection_limits() == ConnectionLimits(request_timeout_s=None, body_timeout_s=600.0)
    assert settings.proxy_request_timeout_s() is None
    with pytest.raises(ValueError, match="request_timeout_s"):
        ConnectionLimits(request_timeout_s=0)
    with pytest.raises(ValueError, match="retry_after_s"):
        ConnectionLimits(retry_after_s=1.5)  # type: ignore[arg-type]


def _request(headers: list[tuple[bytes, bytes]], chunks: list[bytes], stall: bool) -> Request:
    """A Starlette request whose body arrives as ``chunks``, then (``stall``) never finishes."""
    queue = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/ground", "headers": headers}, receive)


def test_a_stalled_body_is_408_and_a_complete_one_is_read() -> None:
    stalled = _request([(b"content-type", b"application/json")], [b'{"image": '], stall=True)
    start = time.perf_counter()
    with pytest.raises(ApiError) as caught:
        asyncio.run(serve_app.read_body(stalled, limit=1000, timeout_s=0.3))
    assert 0.25 < time.perf_counter() - start < 5
    err = caught.value
    assert (err.status, err.code, err.headers) == (408, "body_timeout", {"Connection": "close"})
    assert "10 bytes received" in err.message
    complete = _request([], [b"ab", b"cd"], stall=False)
    assert asyncio.run(serve_app.read_body(complete, limit=1000, timeout_s=5)) == b"abcd"
    with pytest.raises(ApiError, match="exceeds the limit"):
        asyncio.run(serve_app.read_body(_request([], [b"x" * 600, b"x" * 600], stall=True), limit=1000, timeout_s=5))


def test_headers_over_the_limit_are_431() -> None:
    headers = [(b"host", b"127.0.0.1"), (b"x-padding", b"p" * 100)]
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    serve_app.check_header_size(headers, size)
    with pytest.raises(ApiError) as caught:
        serve_app.check_header_size(headers, size - 1)
    assert (caught.value.status, caught.value.code) == (431, "headers_too_large")


def test_jobs_serve_starts_the_proxy_with_the_request_timeout_plus_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from ray import serve

    import jobs.serve

    started: list[dict[str, Any]] = []

    def interrupted_run(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # as Ctrl-C while the application starts

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(jobs.serve, "ensure_ray", lambda num_cpus: None)
    monkeypatch.setattr(serve, "start", lambda http_options: started.append(http_options))
    monkeypatch.setattr(serve, "run", interrupted_run)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert jobs.serve.main(["--model", "models:/m@best", "--port", "8123", "--request-timeout-s", "45"]) == 0
        assert jobs.serve.main(["--model", "models:/m@best", "--request-timeout-s", "none"]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert started[0] == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 50.0}  # 45 + PROXY_GRACE_S
    assert started[1]["request_timeout_s"] is None
