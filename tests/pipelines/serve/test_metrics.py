"""The application's Serve metrics: requests by route, status and error code, request latency, batch sizes.

The fast test runs the real ingress in-process (a stub in place of the model deployment's handle) and reads
what its middleware records; the slow one reads the metrics back from the Prometheus endpoint of a Ray of its
own, after real requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from starlette.testclient import TestClient

from pipelines.serve.app import GroundingAPI, RequestMetrics, app
from pipelines.serve.model import GroundingOutcome
from tests.pipelines.serve_harness import APP_NAME, encode, free_port, running_app, save_tiny_model, shapes_image

PNG = encode(shapes_image(48, 36))
TOKEN = "metrics-test-token"


# --------------------------------------------------------------------------------------------------
# In-process: what the middleware records for each kind of answer
# --------------------------------------------------------------------------------------------------


class _Method:
    """One method of a deployment handle: ``remote(*args)`` gives an awaitable, as Serve's responses are."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        async def call() -> Any:
            return self.fn(*args)

        return call()


class StubModel:
    """The model deployment's handle: a fixed grounding, or ``failure`` raised from ``ground``."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.info = _Method(lambda: {"name": "stub", "version": "1", "source": "stub", "image_size": 32})
        self.stats = _Method(lambda: {"replica": "stub"})
        self.ground = _Method(self._ground)

    def _ground(self, item: Any) -> GroundingOutcome:
        if self.failure is not None:
            raise self.failure
        return GroundingOutcome(box=[1.0, 2.0, 3.0, 4.0], box_normalized=[0.0, 0.0, 0.1, 0.1], batch_size=1)


class RecordingMetrics(RequestMetrics):
    """The real metrics (outside Ray they record nowhere), and a list of what was recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, str]] = []
        self.latencies: list[float] = []

    def record(self, route: str, status: int, code: str, latency_ms: float) -> None:
        super().record(route, status, code, latency_ms)
        self.records.append((route, status, code))
        self.latencies.append(latency_ms)


def test_the_middleware_records_route_status_and_code(monkeypatch: pytest.MonkeyPatch) -> None:
    model = StubModel()
    # NOTE: serve.ingress wraps the class in a subclass whose async __init__ Serve awaits; the routes need only
    # an instance of the class as written, the wrapper's first base (as in test_errors.py).
    ingress = GroundingAPI.func_or_class.__mro__[1](model, TOKEN)
    ingress.reconfigure({})
    assert isinstance(ingress.metrics, RequestMetrics)
    ingress.metrics = recorder = RecordingMetrics()
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def ground(expression: str, headers: dict[str, str] = auth) -> int:
        files = {"image": ("x.png", PNG)}
        return client.post("/v1/ground", files=files, data={"expression": expression}, headers=headers).status_code

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        assert ground("the circle") == 200
        assert ground(" ") == 422
        assert ground("the circle", headers={}) == 401
        assert client.get("/v2/nothing/here").status_code == 404
        assert client.delete("/v1/ground", headers=auth).status_code == 405
        assert (
            client.post("/v1/ground", content=b"{}", headers={**auth, "Content-Type": "text/plain"}).status_code == 415
        )
        model.failure = RuntimeError("a bug")
        assert ground("the circle") == 500
    assert recorder.records == [
        ("/healthz", 200, "none"),
        ("/v1/ground", 200, "none"),
        ("/v1/ground", 422, "empty_expression"),
        ("/v1/ground", 401, "unauthorized"),
        ("unmatched", 404, "not_found"),
        ("/v1/ground", 405, "method_not_allowed"),
        ("/v1/ground", 415, "unsupported_media_type"),
        ("/v1/ground", 500, "internal_error"),
    ]
    assert all(0 < latency < 30_000 for latency in recorder.latencies)


# --------------------------------------------------------------------------------------------------
# Through a running application, read back from Ray's Prometheus endpoint (slow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A running application on a Ray of its own, whose metrics are exported on a known port every 4 s;
    yields the application's URL and that port."""
    import ray

    model_dir = save_tiny_model(tmp_path_factory.mktemp("metrics") / "vglaw-tiny")
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        # NOTE: Ray's default is 10 s. With 1 s, a run on the loaded 2-core machine lost a report for good: a
        # worker sends the increments since its last report, and a report's deadline is below the interval.
        _system_config={"metrics_report_interval_ms": 4000},
    )
    try:
        with running_app({"model": str(model_dir)}) as url:
            yield url, port
    finally:
        ray.shutdown()


def _samples(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on Ray's Prometheus endpoint."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def _send_each_kind(url: str) -> None:
    """Three groundings answered 200, two empty expressions 422 (one of them only invisible), one unknown path 404."""
    for expression in ("the circle", "the square", "the left one", "", "\u200b"):
        response = requests.post(f"{url}/v1/ground", files={"image": ("x.png", PNG)}, data={"expression": expression})
        assert response.status_code == (200 if expression.strip("\u200b") else 422), response.text
    assert requests.get(f"{url}/v2/nothing", timeout=30).status_code == 404


@pytest.mark.slow
def test_requests_by_status_latency_and_batch_sizes_reach_prometheus(served: tuple[str, int]) -> None:
    url, port = served
    expected = (
        ("/v1/ground", "200", "none"),
        ("/v1/ground", "422", "empty_expression"),
        ("unmatched", "404", "not_found"),
    )
    # NOTE: only the application's own series count. The in-process test above records through the same metric
    # objects in this process; once this process joins Ray, those records are exported too, under empty
    # application, deployment and replica labels (CI runs counted one more of each kind than was sent).
    # How many of each reach Prometheus is Ray's transport: a worker sends the increments since its last report,
    # and on a loaded machine a report can be lost for good. Exact counts are the in-process test's. Here every
    # series must show up, with the labels and buckets Serve adds and each histogram whole within one scrape; a
    # round of requests is sent again while one is missing, so that one lost report does not fail the test.
    ingress = {"application": APP_NAME, "deployment": "GroundingAPI"}
    _send_each_kind(url)
    rounds, last_round = 1, time.monotonic()
    deadline = last_round + 120  # the workers report every 4 s
    while True:
        try:
            samples = _samples(port)
        except requests.RequestException:  # the metrics agent is slow to answer on a loaded machine
            samples = []
        counts = {
            key: _total(samples, "ray_vglaw_requests_total", route=key[0], status=key[1], code=key[2], **ingress)
            for key in expected
        }
        batches = _total(samples, "ray_vglaw_batch_size_count", application=APP_NAME)
        if (all(counts[key] >= 1 for key in expected) and batches >= 1) or time.monotonic() > deadline:
            break
        if time.monotonic() - last_round > 12 and rounds < 5:
            _send_each_kind(url)
            rounds, last_round = rounds + 1, time.monotonic()
        time.sleep(1)
    shown = json.dumps([s for s in samples if "vglaw" in s[0]], indent=1)
    assert all(counts[key] >= 1 for key in expected), (counts, shown)
    # No answer under another route, status or code than the ones sent.
    assert _total(samples, "ray_vglaw_requests_total", **ingress) == sum(counts.values()), shown
    # Latency: every request in the +Inf bucket, none of these few under a millisecond.
    latency = "ray_vglaw_request_latency_ms_bucket"
    ok = _total(samples, "ray_vglaw_request_latency_ms_count", route="/v1/ground", status="200", **ingress)
    assert ok >= 1 and _total(samples, latency, route="/v1/ground", status="200", le="+Inf", **ingress) == ok, shown
    assert _total(samples, latency, route="/v1/ground", status="200", le="1.0", **ingress) == 0, shown
    assert _total(samples, latency, route="/v1/ground", status="422", le="+Inf", **ingress) >= 1, shown
    # Batch sizes: the three requests were sent one after another, so batches of one.
    model = {"application": APP_NAME, "deployment": "GroundingModel"}
    assert batches >= 1 and _total(samples, "ray_vglaw_batch_size_count", **model) == batches, shown
    assert _total(samples, "ray_vglaw_batch_size_bucket", le="1.0", **model) == batches, shown


def test_docs_name_the_metrics() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "api.md").read_text()
    section = text.split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    for name in ("ray_vglaw_requests_total", "ray_vglaw_request_latency_ms", "ray_vglaw_batch_size"):
        assert f"`{name}" in section, name
