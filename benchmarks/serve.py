"""Latency and throughput of the Serve grounding endpoint against concurrency, batching on and off, and the
overhead of Serve over calling :class:`vglaw.Predictor` directly.

Closed loop: N clients (aiohttp, in this process) each send ``POST /v1/ground`` (multipart, a 640x480 JPEG, RLE
mask returned) as soon as their previous answer arrives, for ``--duration`` seconds after a short warm-up.
The same load also goes to the model deployment alone, through a ``DeploymentHandle`` with an already
letterboxed item, which shows what batching does where the model, not the HTTP path, is the bottleneck.
"Batching off" is the same application with ``max_batch_size=1``. The direct baseline does the server's work
(decode, letterbox, forward, map back, RLE) in this process with the replica's torch thread count. Without
``--model`` the model is a randomly initialised ``--preset`` (throughput does not depend on the weights).

Usage::

    python -m benchmarks.serve [--preset tiny] [--concurrency 1,4,16,64] [--duration 10] [--num-cpus 2]
    python -m benchmarks.serve --preset base --device cuda --num-gpus 1 --replica-cpus 4 --max-batch-size 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import ray
import torch
from PIL import Image, ImageDraw
from ray import serve

import vglaw
from pipelines.serve.app import build_app, prepare_item
from pipelines.serve.model import MODEL_DEPLOYMENT, GroundingItem, mask_payload
from pipelines.serve.requests import GroundRequest, RequestLimits
from pipelines.serve.settings import ServeSettings

EXPRESSION = "the small red circle left of the blue square"


@dataclass
class Point:
    """One measured configuration."""

    mode: str
    clients: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    server: dict[str, float] = field(default_factory=dict)  # mean server-side timings

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def sample_image(width: int = 640, height: int = 480) -> bytes:
    """A COCO-sized JPEG with a few shapes."""
    image = Image.new("RGB", (width, height), (120, 130, 140))
    draw = ImageDraw.Draw(image)
    draw.ellipse([80, 120, 240, 280], fill=(220, 40, 40))
    draw.rectangle([340, 160, 520, 340], fill=(40, 60, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def random_model(preset: str, directory: Path) -> Path:
    """A randomly initialised ``preset`` with a small fitted tokenizer."""
    torch.manual_seed(0)
    texts = [EXPRESSION, "the blue square", "a big green triangle on the right", "the rightmost shape"] * 4
    tokenizer = vglaw.ExpressionTokenizer.train(texts, vocab_size=200)
    return vglaw.save_pretrained(vglaw.create_model(preset, vocab_size=tokenizer.vocab_size), tokenizer, directory)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def direct_baseline(model_dir: Path, device: str, threads: int, data: bytes, duration: float, batch: int) -> Point:
    """The server's work per request, in this process, one request at a time; also one batched call."""
    torch.set_num_threads(threads)
    predictor = vglaw.Predictor.from_pretrained(model_dir, device=device)

    def one() -> None:
        result = predictor.predict(Image.open(io.BytesIO(data)), EXPRESSION)
        mask_payload(result.mask, "rle")

    for _ in range(3):
        one()
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        one()
        latencies.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - start
    images = [Image.open(io.BytesIO(data)) for _ in range(batch)]
    predictor.batch_size = batch
    t = time.perf_counter()
    for result in predictor.predict(images, [EXPRESSION] * batch):
        mask_payload(result.mask, "rle")
    batched = batch / (time.perf_counter() - t)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    point = Point("direct Predictor", 1, len(latencies), 0, elapsed, p50, p99, mean_batch=1)
    point.server = {"batched_images_per_s": batched, "batch": batch}
    return point


Sender = Callable[[], Awaitable[dict[str, float] | None]]  # server timings of one answer, None on an error


async def closed_loop(send: Sender, clients: int, duration: float, warmup: float) -> Point:
    """``clients`` concurrent senders for ``duration`` seconds after ``warmup`` seconds of the same load."""
    latencies: list[float] = []
    timings: dict[str, list[float]] = {}
    errors = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    stop_at = measure_from + duration

    async def client() -> None:
        nonlocal errors
        while loop.time() < stop_at:
            sent = loop.time()
            answer = await send()
            if sent < measure_from:
                continue
            if answer is None:
                errors += 1
                continue
            latencies.append((loop.time() - sent) * 1000)
            for key, value in answer.items():
                timings.setdefault(key, []).append(value)

    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = loop.time() - measure_from
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    batches = timings.get("batch_size", [])
    point = Point("", clients, len(latencies), errors, elapsed, p50, p99, statistics.fmean(batches) if batches else 0)
    point.server = {k: statistics.fmean(v) for k, v in timings.items()}
    return point


async def http_point(url: str, data: bytes, clients: int, duration: float, warmup: float) -> Point:
    """The whole endpoint: multipart ``POST /v1/ground`` through Serve's HTTP proxy and the ingress."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def send() -> dict[str, float] | None:
            form = aiohttp.FormData()
            form.add_field("image", data, filename="image.jpg", content_type="image/jpeg")
            form.add_field("expression", EXPRESSION)
            try:
                async with session.post(f"{url}/v1/ground", data=form) as response:
                    body = await response.json()
                    return body["timings"] if response.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None

        return await closed_loop(send, clients, duration, warmup)


async def handle_point(handle: Any, item: GroundingItem, clients: int, duration: float, warmup: float) -> Point:
    """The model deployment alone, through a ``DeploymentHandle`` with an already letterboxed item (no HTTP)."""

    async def send() -> dict[str, float] | None:
        outcome = await handle.ground.remote(item)
        if outcome.error is not None:
            return None
        return {"batch_size": outcome.batch_size, "queue_ms": outcome.queue_ms, "inference_ms": outcome.inference_ms}

    return await closed_loop(send, clients, duration, warmup)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    """Runs the direct baseline, then every (batching, concurrency) point; prints a Markdown table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: a random --preset model)")
    p.add_argument("--preset", default="tiny", help="preset of the random model (default tiny)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="model device (default cpu)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (default 0)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per model replica (default 1)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default all)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point (default 2)")
    p.add_argument("--max-batch-size", type=int, default=16, help="batch size with batching on (default 16)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="batch window (default 0.01)")
    p.add_argument("--port", type=int, default=8123, help="HTTP port on 127.0.0.1 (default 8123)")
    p.add_argument("--out", type=Path, default=None, help="also write the points as JSON here")
    args = p.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    data = sample_image()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model(args.preset, Path(tmp) / "model")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        url = f"http://127.0.0.1:{args.port}"
        points: list[Point] = []
        info: dict[str, Any] = {}
        try:
            for mode, batch_size in (("batching on", args.max_batch_size), ("batching off", 1)):
                settings = ServeSettings(
                    model=str(model_dir),
                    device=args.device,
                    num_gpus=args.num_gpus,
                    num_cpus=args.replica_cpus,
                    max_ongoing_requests=max(64, 2 * args.max_batch_size),
                    max_batch_size=batch_size,
                    batch_wait_timeout_s=args.batch_wait_timeout_s,
                )
                serve.run(build_app(settings), name="bench", route_prefix="/")
                info = asyncio.run(_model_info(url))
                request = GroundRequest(data, EXPRESSION)
                item = prepare_item(request, RequestLimits(), info["image_size"])[0]
                handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name="bench")
                for path in ("http", "handle"):
                    for clients in concurrency:
                        if path == "http":
                            point = asyncio.run(http_point(url, data, clients, args.duration, args.warmup))
                        else:
                            point = asyncio.run(handle_point(handle, item, clients, args.duration, args.warmup))
                        point.mode = f"{mode}, {path}"
                        points.append(point)
                        print(
                            f"{point.mode:22s} clients={clients:3d} rps={point.rps:7.1f} p50={point.p50_ms:7.1f} ms "
                            f"p99={point.p99_ms:7.1f} ms batch={point.mean_batch:5.2f} errors={point.errors}",
                            flush=True,
                        )
        finally:
            serve.shutdown()
            ray.shutdown()
        threads = int(info.get("torch_threads", max(1, int(args.replica_cpus))))
        direct = direct_baseline(model_dir, args.device, threads, data, args.duration, args.max_batch_size)
    load_after = load_average()
    _report(args, info, direct, points, load_before, load_after)
    if args.out:
        payload = {"direct": asdict(direct), "points": [asdict(p) for p in points], "model": info}
        args.out.write_text(json.dumps(payload, indent=2))
    return 0


async def _model_info(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/model") as response:
        return (await response.json())["model"]


def _report(args, info: dict[str, Any], direct: Point, points: list[Point], before: str, after: str) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"\n# preset={info.get('preset')} ({info.get('image_size')} px) device={args.device} ({device}); "
        f"{os.cpu_count()} CPU cores, Ray num_cpus={args.num_cpus}, model replica {args.replica_cpus} CPU "
        f"({info.get('torch_threads')} torch threads), 1 ingress replica; torch {torch.__version__}, "
        f"Ray {ray.__version__}; {args.duration:g} s per point after {args.warmup:g} s warm-up; "
        f"load average before {before}, after {after}"
    )
    print("| path | batching | clients | req/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for point in points:
        batching, path = point.mode.removeprefix("batching ").split(", ")
        path = "HTTP (whole endpoint)" if path == "http" else "handle (model deployment only)"
        print(
            f"| {path} | {batching} | {point.clients} | {point.rps:.1f} | {point.p50_ms:.1f} | "
            f"{point.p99_ms:.1f} | {point.mean_batch:.2f} | {point.errors} |"
        )
    print(
        f"| direct Predictor, no Serve | - | 1 | {direct.rps:.1f} | {direct.p50_ms:.1f} | {direct.p99_ms:.1f} | 1 | 0 |"
    )
    batched = direct.server["batched_images_per_s"]
    print(f"\ndirect Predictor, one call with {direct.server['batch']:.0f} images: {batched:.1f} images/s")
    single = next((p for p in points if p.mode == "batching off, http" and p.clients == 1), None)
    if single is not None:
        s = single.server
        print(
            f"Serve overhead at 1 client, batching off: p50 {single.p50_ms:.1f} ms vs {direct.p50_ms:.1f} ms direct "
            f"(+{single.p50_ms - direct.p50_ms:.1f} ms). Server-side means: ingress total {s['total_ms']:.1f} ms "
            f"= read {s['read_ms']:.1f} + decode {s['decode_ms']:.1f} + model call {s['model_ms']:.1f} "
            f"(queue {s['queue_ms']:.1f}, inference {s['inference_ms']:.1f}, mask encoding "
            f"{s['postprocess_ms']:.1f}); HTTP and proxy outside the ingress "
            f"{single.p50_ms - s['total_ms']:.1f} ms (p50 minus mean)."
        )


if __name__ == "__main__":
    raise SystemExit(main())
