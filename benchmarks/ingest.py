"""Training ingest: the per-row decode on the training step's thread (the old design) against Ray Data tasks
that decode ahead of the step (the new one), on the synthetic dataset letterboxed to 448 px.

Three tables:

* **Rate**: training rows (one canvas, its mask, one expression; "images" below) per second of
  :func:`pipelines.train.ingest.collate_rows` inline on one thread, as the old worker ran it before each step,
  and of the new path end to end: ``read_split`` -> ``map_batches(encode_training_rows, num_cpus=1)`` ->
  ``iter_torch_batches(prefetch_batches=2)`` -> ``flip_decisions`` + ``to_training_batch``, on a local Ray
  with each of ``--cpus`` CPUs. The first Ray pass starts the workers and imports torch in them; the second
  is the one timed.
* **Per-image cost** of each part of the new path, timed inline on one thread, against ``collate_rows``.
* **Simulated trainer**: a loop that takes each batch, prepares it on its own thread and then sleeps one "device
  step" (no CPU used), so the ingest has the CPUs to itself. Reported are the shares of wall time spent blocked on
  the next batch (what the worker's ``data_wait_fraction`` counts) and preparing it (old design: all of
  ``collate_rows``; new: ``flip_decisions`` and ``to_training_batch``), old design against new (Ray Data with
  prefetch). By default the step lasts ``1.2 * batch_size / (rate_per_core * N)``: at the new path's per-core
  rate measured on N = max(--cpus) CPUs, the ingest feeds 20 % more than the step consumes. Target: the new
  design waits less than 5 % of the wall time.
* **Epochs as the worker runs them**: ``--epochs`` passes of the simulated trainer, each preceded by a simulated
  validation (a sleep as long as scoring the val split would take at a third of a training step per batch,
  the forward pass alone) during which that epoch's stream is already filling (``started_ahead``, as the
  worker starts each epoch before validating the last). Reported: the share of the training wall time
  (validation excluded, as in the worker's ``train/epoch_data_wait_fraction``) spent waiting for data.

Flips are drawn with probability 0.5 (``flip_decisions``, as the worker does); the worker's local shuffle
buffer is left out. Threads: the driver runs torch with one thread and every tokenizer without its thread pool,
so "per core" means per core.

Usage::

    python -m benchmarks.ingest [--images 400] [--batch-size 32] [--cpus 1 2] [--step-ms MS] [--epochs 3]
                                [--workdir DIR]
    python -m benchmarks.ingest --quick   # tiny sizes: a smoke run of every path
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pyarrow
import ray
import torch
from ray.data import DataContext

from pipelines.data.manifest import read_manifest
from pipelines.data.parquet import decode_image, read_split, read_split_table
from pipelines.data.preprocess import PreprocessConfig, run_preprocess
from pipelines.data.schema import TRAINING_COLUMNS
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic
from pipelines.train.config import DataSection, ModelSection
from pipelines.train.ingest import (
    TrainingBatch,
    collate_rows,
    encode_training_rows,
    flip_decisions,
    started_ahead,
    to_training_batch,
)
from vglaw.config import TextConfig
from vglaw.geometry import swap_spatial_words
from vglaw.rle import decode_rle
from vglaw.tokenizer import ExpressionTokenizer

IMAGE_SIZE = 448
# NOTE: small Parquet files, so that the train split has many blocks and two Ray CPUs share the work evenly, as
# they do on a full dataset (the job's default of 128 images per file leaves a few hundred images in 2-3 files).
IMAGES_PER_FILE = 16
COST_ROWS = 320  # rows of the per-image cost table
HEADROOM = 1.2  # the default step: ingest feeds 20 % more than the step consumes
TARGET_WAIT = 0.05
SEED, EPOCH = 0, 0
FLIP_PROB = 0.5
SINGLE_THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false"}  # Hugging Face tokenizers otherwise batch on every core


def prepare_data(workdir: Path, images: int) -> Path:
    """The synthetic dataset preprocessed at :data:`IMAGE_SIZE` px, made under ``workdir`` unless already there."""
    home = workdir / f"synthetic_{images}"
    raw, data = home / "raw", home / f"parquet_{IMAGE_SIZE}"
    if not (raw / "synthetic" / "generator.json").is_file():  # written last
        print(f"generating {images} synthetic images in {raw}", flush=True)
        generate_synthetic(raw, SyntheticConfig(num_images=images, seed=SEED), overwrite=True)
    if not (data / "manifest.json").is_file():  # committed atomically
        print(f"preprocessing them into {data}", flush=True)
        config = PreprocessConfig(
            "synthetic", "unc", raw, raw / "images", data, IMAGE_SIZE, images_per_task=IMAGES_PER_FILE, overwrite=True
        )
        with local_ray(os.cpu_count() or 1):
            run_preprocess(config)
    return data


def train_tokenizer(data: Path) -> ExpressionTokenizer:
    """WordPiece trained on the training expressions, as the driver does when no BERT is configured."""
    expressions = read_split_table(data, "train", columns=["expression"]).column("expression").to_pylist()
    return ExpressionTokenizer.train(expressions, vocab_size=ModelSection.vocab_size, max_tokens=TextConfig.max_tokens)


def row_batches(data: Path, batch_size: int) -> list[dict[str, list[Any]]]:
    """The train split's full batches of raw rows, in memory: what the old worker's ``iter_batches`` handed it."""
    table = read_split_table(data, "train", columns=TRAINING_COLUMNS)
    starts = range(0, table.num_rows - batch_size + 1, batch_size)
    return [table.slice(start, batch_size).to_pydict() for start in starts]


# Each path is a stream of batches as the training loop receives them, and what the loop's own thread does to
# each before the step ("prepare").


def collate_on_step_thread(rows: dict[str, list[Any]], tokenizer: ExpressionTokenizer) -> TrainingBatch:
    """The old design's preparation: all of the decode, tokenisation and flipping."""
    flips = flip_decisions(SEED, EPOCH, rows["ref_id"], rows["sent_id"], FLIP_PROB)
    return collate_rows(rows, tokenizer, flips)


def encoded_batches(
    data: Path, tokenizer: ExpressionTokenizer, batch_size: int, prefetch: int
) -> Iterable[dict[str, torch.Tensor]]:
    """The new design's stream: decode and tokenisation in Ray Data tasks, batches prefetched during the step."""
    encoded = read_split(data, "train", columns=TRAINING_COLUMNS).map_batches(
        encode_training_rows,
        fn_kwargs={"vocab": tokenizer.vocab, "max_tokens": tokenizer.max_tokens},
        batch_size=batch_size,
        num_cpus=1,
    )
    return encoded.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch, device="cpu", drop_last=True)


def flip_and_move(arrays: dict[str, torch.Tensor]) -> TrainingBatch:
    """The new design's preparation, as the worker does it (``device="cpu"`` here)."""
    flips = flip_decisions(SEED, EPOCH, arrays["ref_id"], arrays["sent_id"], FLIP_PROB)
    return to_training_batch(arrays, flips, "cpu")


@dataclass
class Pass:
    """One pass of a training loop over a stream of batches (times in seconds)."""

    rows: int
    wall: float  # from asking for the first batch to the end of the last step
    waits: list[float]  # per batch: blocked on the stream's next batch (what the worker's data_wait_fraction counts)
    preps: list[float]  # per batch: the loop's own thread preparing it (old design: all of the decode work)
    cpu: float  # CPU time of this process, all threads (the loop and Ray Data's iterator threads)

    @property
    def batches(self) -> int:
        return len(self.waits)

    @property
    def first(self) -> float:
        """Until the first batch was ready: the pipeline filling, once per epoch."""
        return self.waits[0] + self.preps[0]

    @property
    def rate(self) -> float:
        return self.rows / self.wall

    @property
    def steady_rate(self) -> float:
        """Rows per second once the first batch was ready."""
        return self.rows * (self.batches - 1) / self.batches / max(self.wall - self.first, 1e-9)

    def share(self, seconds: list[float], steady: bool = False) -> float:
        """The sum of ``seconds`` (per batch) as a share of the wall time, or of the time after the first batch."""
        return sum(seconds[1:]) / max(self.wall - self.first, 1e-9) if steady else sum(seconds) / self.wall

    def idle(self) -> list[float]:
        """Per batch: the device idle, waiting and preparing."""
        return [wait + prep for wait, prep in zip(self.waits, self.preps, strict=True)]


def consume(batches: Iterable[Any], prepare: Callable[[Any], TrainingBatch], step_s: float = 0.0) -> Pass:
    """Takes every batch, prepares it on this thread, then sleeps ``step_s``: a device step that leaves the CPUs
    to the ingest. With no step this measures the ingest's own rate."""
    rows, waits, preps = 0, [], []
    cpu, started = time.process_time(), time.perf_counter()
    iterator = iter(batches)  # NOTE: Ray Data starts executing on the first next(), within the timing
    while True:
        asked = time.perf_counter()
        item = next(iterator, None)
        got = time.perf_counter()
        if item is None:
            break
        rows += len(prepare(item))
        waits.append(got - asked)
        preps.append(time.perf_counter() - got)
        time.sleep(step_s)
    return Pass(rows, time.perf_counter() - started, waits, preps, time.process_time() - cpu)


def consume_epochs(
    stream: Callable[[], Iterable[Any]],
    prepare: Callable[[Any], TrainingBatch],
    step_s: float,
    epochs: int,
    val_s: float,
) -> list[Pass]:
    """``epochs`` passes of :func:`consume`, each stream started ahead during a simulated validation of ``val_s``
    (the worker validates the epoch before; before the first, step 0)."""
    passes = []
    for _ in range(epochs):
        upcoming = started_ahead(stream())
        time.sleep(val_s)
        passes.append(consume(upcoming, prepare, step_s))
    return passes


COST_PARTS = {  # part -> where the new design runs it
    "decode image (JPEG)": "Ray Data task",
    "decode mask (RLE)": "Ray Data task",
    "tokenise (as written + mirrored)": "Ray Data task",
    "rest of encode_training_rows": "Ray Data task",
    "flip_decisions": "step thread",
    "to_training_batch (flips, copy)": "step thread",
}


def cost_per_image(batches: list[dict[str, list[Any]]], tokenizer: ExpressionTokenizer) -> dict[str, float]:
    """Milliseconds per image of each part of the new path (:data:`COST_PARTS`), and of ``collate_rows`` (with
    the same flips) under ``"old"``, all inline on this thread."""
    vocab, spent = tokenizer.vocab, dict.fromkeys([*COST_PARTS, "encode_training_rows", "old"], 0.0)

    @contextmanager
    def clock(part: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        spent[part] += time.perf_counter() - started

    for batch in batches:
        size, expressions = int(batch["canvas_size"][0]), batch["expression"]
        with clock("decode image (JPEG)"):
            for data in batch["image"]:
                decode_image(data)
        with clock("decode mask (RLE)"):
            for counts in batch["mask_canvas_rle"]:
                decode_rle(counts, [size, size])
        with clock("tokenise (as written + mirrored)"):
            tokenizer(expressions)
            tokenizer([swap_spatial_words(e) for e in expressions])
        with clock("encode_training_rows"):
            arrays = encode_training_rows(batch, vocab, tokenizer.max_tokens)
        tensors = {name: torch.from_numpy(values) for name, values in arrays.items()}  # as iter_torch_batches yields
        with clock("flip_decisions"):
            flips = flip_decisions(SEED, EPOCH, batch["ref_id"], batch["sent_id"], FLIP_PROB)
        with clock("to_training_batch (flips, copy)"):
            to_training_batch(tensors, flips, "cpu")
        with clock("old"):
            collate_rows(batch, tokenizer, flips)
    inside = ("decode image (JPEG)", "decode mask (RLE)", "tokenise (as written + mirrored)")
    spent["rest of encode_training_rows"] = spent.pop("encode_training_rows") - sum(spent[p] for p in inside)
    spent["old"] += spent["flip_decisions"]  # the old step thread drew the flips too
    rows = sum(len(batch["expression"]) for batch in batches)
    return {part: 1000 * seconds / rows for part, seconds in spent.items()}


def device_step(args: argparse.Namespace, rate: float) -> float:
    """Seconds of the simulated device step: ``--step-ms``, else :data:`HEADROOM` * batch / ``rate``, where
    ``rate`` = rate_per_core * N is the new path's measured rate on N CPUs."""
    return args.step_ms / 1000 if args.step_ms is not None else HEADROOM * args.batch_size / rate


@contextmanager
def local_ray(cpus: int) -> Iterator[None]:
    """A local Ray with ``cpus`` logical CPUs for the block."""
    # NOTE: address="local" starts a new instance even where another Ray runs on this machine, which a plain
    # ray.init() would join instead.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def conditions(data: Path, args: argparse.Namespace, rows: int) -> str:
    """One line with everything a reader needs to compare two runs."""
    manifest = read_manifest(data)
    source = json.loads((data.parent / "raw" / "synthetic" / "generator.json").read_text())["config"]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
        f"ray {ray.__version__}, numpy {np.__version__}, pyarrow {pyarrow.__version__}, Pillow {PIL.__version__}; "
        f"synthetic {source['image_width']}x{source['image_height']} images letterboxed to "
        f"{manifest['image_size']} px, {manifest['image_format']} canvases; train split {rows} rows from "
        f"{args.images} images; batch {args.batch_size}; prefetch {args.prefetch}; "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}"
    )


def print_rate(old: Pass, new: dict[int, tuple[Pass, Pass]]) -> None:
    print("\n## Rate of the ingest work\n")
    print(
        "| path | CPUs | images | s | images/s | images/s per core | images/s after the 1st batch | "
        "this process: CPU s | preparing on the loop's thread: s | warm-up pass s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [("old: collate_rows inline (on the step thread)", 1, old, None)]
    runs += [("new: Ray Data map_batches + iter_torch_batches", cpus, run, warm) for cpus, (warm, run) in new.items()]
    for name, cpus, run, warm in runs:
        print(
            f"| {name} | {cpus} | {run.rows} | {run.wall:.2f} | {run.rate:.1f} | {run.rate / cpus:.1f} | "
            f"{run.steady_rate:.1f} | {run.cpu:.2f} | {sum(run.preps):.2f} | {f'{warm.wall:.2f}' if warm else '-'} |"
        )
    print(
        "\nimages/s per core: over the local Ray's CPUs (the old design's one thread); this process's CPU time "
        "(the loop, Ray Data's iterator threads) comes on top. A CPU time below the preparing time means that "
        "other work on the machine took the core."
    )


def print_costs(costs: dict[str, float], rows: int) -> None:
    print(f"\n## Per-image cost, inline on one thread ({rows} rows)\n")
    print("| part | new design runs it in | ms / image |")
    print("|---|---|---|")
    for part, place in COST_PARTS.items():
        print(f"| {part} | {place} | {costs[part]:.3f} |")
    on_loop = sum(costs[part] for part, place in COST_PARTS.items() if place == "step thread")
    print(f"| **new: on the step thread** | step thread | **{on_loop:.3f}** |")
    print(f"| **new: all parts** | | **{sum(costs[part] for part in COST_PARTS):.3f}** |")
    print(f"| **old: collate_rows + flip_decisions** | (old design: step thread) | **{costs['old']:.3f}** |")


def print_trainer(old: Pass, new: Pass, step_s: float, args: argparse.Namespace, cpus: int, rate: float) -> None:
    if args.step_ms is None:
        why = (
            f"step_s = {HEADROOM} * batch_size / (rate_per_core * N) = {HEADROOM} * {args.batch_size} / "
            f"({rate / cpus:.1f} * {cpus}) = {step_s:.4f} s: at the new path's per-core rate measured on N = {cpus} "
            f"CPUs, the ingest feeds {HEADROOM - 1:.0%} more than the step consumes"
        )
    else:
        why = f"step_s = --step-ms = {step_s:.4f} s"
    print(f"\n## Simulated trainer: take a batch, prepare it, sleep one device step\n\n{why}.\n")
    print(
        "| design | batches | wall s | 1st batch s | waiting for the batch | preparing it on the loop's thread | "
        "device idle (both) | device idle after the 1st batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, run in (
        ("old: collate_rows inline, then step", old),
        (f"new: Ray Data (num_cpus={cpus}), prefetch {args.prefetch}, then step", new),
    ):
        print(
            f"| {name} | {run.batches} | {run.wall:.2f} | {run.first:.2f} | {run.share(run.waits):.1%} | "
            f"{run.share(run.preps):.1%} | {run.share(run.idle()):.1%} | {run.share(run.idle(), steady=True):.1%} |"
        )
    print(
        f"\nTarget: the new design waits < {TARGET_WAIT:.0%} of the wall time. Waiting for the batch (what the "
        f"worker's data_wait_fraction counts): {verdict(new.share(new.waits))} over the whole pass, "
        f"{verdict(new.share(new.waits, steady=True))} after the 1st batch (the share a long epoch approaches). "
        f"Device idle, preparation included: {verdict(new.share(new.idle()))} / "
        f"{verdict(new.share(new.idle(), steady=True))}. The old design prepares everything on the loop's thread; "
        "the new one runs flip_decisions and to_training_batch there, here on the CPU (device='cpu'): on a GPU, "
        "to_training_batch's flips and layout copy run on the device."
    )


def print_epochs(passes: list[Pass], val_s: float, val_rows: int, step_s: float, args: argparse.Namespace) -> None:
    waits = sum(sum(run.waits) for run in passes)
    wall = sum(run.wall for run in passes)
    print(
        f"\n## Epochs as the worker runs them: each stream started during the validation before it\n\n"
        f"validation: {val_rows} val rows / {args.batch_size} * step_s / 3 = {val_s:.2f} s per epoch.\n"
    )
    print("| epoch | batches | training wall s | 1st batch s | waiting for the batch |")
    print("|---|---|---|---|---|")
    for epoch, run in enumerate(passes, 1):
        print(f"| {epoch} | {run.batches} | {run.wall:.2f} | {run.first:.2f} | {run.share(run.waits):.1%} |")
    print(f"| all | {sum(r.batches for r in passes)} | {wall:.2f} | | **{waits / wall:.1%}** |")
    print(f"\nTarget: < {TARGET_WAIT:.0%} of the training wall time: {verdict(waits / wall)}.")


def verdict(share: float) -> str:
    return f"{share:.1%}, **{'met' if share < TARGET_WAIT else 'missed'}**"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="synthetic images over all splits (default 400)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="local Ray CPUs to measure (default 1 2)")
    p.add_argument("--prefetch", type=int, default=DataSection.prefetch_batches, help="iter_torch_batches prefetch")
    p.add_argument("--step-ms", type=float, default=None, help="simulated device step (default: from the rate)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vglaw-bench-ingest",
        help="where the dataset is made, and kept for reruns",
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs of the started-ahead simulation (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 images, batches of 8")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size = 30, 8
    torch.set_num_threads(1)
    os.environ.update(SINGLE_THREAD_ENV)  # before ray.init: the local Ray's workers inherit it

    data = prepare_data(args.workdir, args.images)
    tokenizer = train_tokenizer(data)
    rows = row_batches(data, args.batch_size)
    if not rows:
        raise SystemExit(f"the train split of {data} has fewer rows than one batch; raise --images")
    header = conditions(data, args, len(rows) * args.batch_size)
    print(f"\n# Training ingest: decode on the step thread vs in Ray Data\n\n{header}")
    old_prepare = functools.partial(collate_on_step_thread, tokenizer=tokenizer)
    old = consume(rows, old_prepare)
    cost_rows = rows[: max(1, COST_ROWS // args.batch_size)]
    costs = cost_per_image(cost_rows, tokenizer)

    trainer_cpus, new = max(args.cpus), {}
    stream = functools.partial(encoded_batches, data, tokenizer, args.batch_size, args.prefetch)
    for cpus in sorted(set(args.cpus)):
        with local_ray(cpus):
            new[cpus] = (consume(stream(), flip_and_move), consume(stream(), flip_and_move))  # warm-up, timed
            if cpus == trainer_cpus:
                step_s = device_step(args, new[cpus][1].rate)
                new_trainer = consume(stream(), flip_and_move, step_s)
                val_rows = read_manifest(data)["splits"]["val"]["rows"]
                val_s = val_rows / args.batch_size * step_s / 3
                epochs = consume_epochs(stream, flip_and_move, step_s, args.epochs, val_s)
    old_trainer = consume(rows, old_prepare, step_s)

    print_rate(old, new)
    print_costs(costs, len(cost_rows) * args.batch_size)
    print_trainer(old_trainer, new_trainer, step_s, args, trainer_cpus, new[trainer_cpus][1].rate)
    print_epochs(epochs, val_s, val_rows, step_s, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
