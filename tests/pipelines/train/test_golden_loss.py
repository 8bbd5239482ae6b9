"""A short ``tiny`` training on fixed rows, compared step by step with a golden loss curve kept as a text asset.

Any change that alters training numerics (model, losses, optimiser, schedule, collation, flips, seeding) moves the
curve and fails here. When a change is meant to do that, regenerate the asset deliberately and commit it with the
change::

    .venv/bin/python -m tests.pipelines.train.test_golden_loss

The test itself only reads the asset.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.data.encode import encode_canvas
from pipelines.data.schema import TRAINING_COLUMNS
from pipelines.train.config import REPO_ROOT, TrainConfig, load_config
from pipelines.train.ingest import collate_rows, flip_decisions
from pipelines.train.worker import start_training, train_step
from vglaw.losses import GroundingLoss
from vglaw.precision import resolve_precision
from vglaw.rle import encode_mask
from vglaw.tokenizer import SPECIAL_TOKENS, ExpressionTokenizer

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "losses"
BASE_CONFIG = "configs/test.yaml"
# One worker of configs/test.yaml, cut down to 4 epochs x 4 batches of 4 rows. The learning rate warms up over the
# first 10 steps and drops x0.1 for the last epoch, so both parts of the schedule are on the curve.
OVERRIDES = (
    "run.num_workers=1",
    "optim.global_batch_size=4",
    "optim.epochs=4",
    "optim.decay_epochs=[3]",
    "run.seed=0",
)
STEPS_PER_EPOCH = 4
THREADS = 1  # also the fastest here: about 1 s for the 16 steps
# NOTE: how tight the comparison can be, measured with the pinned torch on a 2-core AVX-512 x86 CPU: three runs
# with 1 thread gave bit-identical curves, as did repeated runs with 2 threads; 2 threads against 1 (other
# reduction splits) moved the terms by at most 1.6e-6 relative, and so did other kernel sets on the same CPU
# (ATEN_CPU_CAPABILITY=avx2 or default, ONEDNN_MAX_CPU_ISA=AVX2 or SSE41: at most 2.2e-6), with no growth over the
# 16 steps. Another CPU or BLAS changes the last bits the same way, so rtol 1e-4 leaves 45x room for it, while the
# smallest change tried, +0.1% on one learning rate, moves the terms by 5e-3 (the total loss by 4e-4) by step 2.
RTOL = 1e-4
# NOTE: no bf16 curve. CPU autocast is deterministic at a fixed thread count, but 2 threads against 1 already move
# its total loss by up to 7e-4 relative (grad_norm by 1.3e-2), the same order as bf16 against fp32 on this model
# (2e-3): a tolerance that holds across machines could not tell a bf16 run from an fp32 one.

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("block", "disc")
WORDS = ("the", "on", "left", "right", *COLOURS, *SHAPES)


def _shape_mask(shape: str, x0: int, y0: int, w: int, h: int, size: int) -> np.ndarray:
    """A block (rectangle) or a disc (ellipse) inside the box ``(x0, y0, w, h)``; [S, S] uint8 {0, 1}."""
    ys, xs = np.mgrid[0:size, 0:size]
    if shape == "block":
        inside = (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
    else:
        cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
        inside = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
    return inside.astype(np.uint8)


def fixed_rows(count: int, size: int) -> list[dict[str, Any]]:
    """``count`` training rows (the columns of ``TRAINING_COLUMNS``) of two shapes on a gradient, one referred to.

    Every pixel and word is arithmetic on the row index (no RNG, no JPEG, whose decoders differ between library
    versions), so the rows are the same everywhere; canvases go through the preprocessing's own PNG encoder.
    """
    ys, xs = np.mgrid[0:size, 0:size]
    background = np.stack([40 + xs // 4, 60 + ys // 4, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    names = list(COLOURS)
    rows = []
    for i in range(count):
        target_left = (i // 2) % 2 == 0
        colour, other = names[i % 4], names[(i + 1 + i // 4) % 4]
        shape = SHAPES[(i // 3) % 2]
        w, h = size // 5 + 4 * (i % 5), size // 6 + 5 * (i % 3)
        x_left, x_right = 6 + 3 * (i % 7), size // 2 + 8 + 2 * (i % 5)
        y_target, y_other = 10 + 7 * (i % 9), 20 + 5 * (i % 11)
        x_target, x_other = (x_left, x_right) if target_left else (x_right, x_left)
        target = _shape_mask(shape, x_target, y_target, w, h, size)
        distractor = _shape_mask(SHAPES[1 - SHAPES.index(shape)], x_other, y_other, h, w, size)
        canvas = background.copy()
        canvas[distractor.astype(bool)] = COLOURS[other]
        canvas[target.astype(bool)] = COLOURS[colour]
        mask_ys, mask_xs = np.nonzero(target)
        x0, x1, y0, y1 = mask_xs.min(), mask_xs.max() + 1, mask_ys.min(), mask_ys.max() + 1
        rows.append(
            {
                "ref_id": 100 + i,
                "sent_id": 1000 + i,
                "expression": f"the {colour} {shape} on the {'left' if target_left else 'right'}",
                "image": encode_canvas(Image.fromarray(canvas), "png"),
                "canvas_size": size,
                "box_cxcywh_norm": [(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size],
                "mask_canvas_rle": encode_mask(target)["counts"],
                "category_id": SHAPES.index(shape),
            }
        )
    return rows


def golden_config(precision: str) -> TrainConfig:
    return load_config(REPO_ROOT / BASE_CONFIG, [*OVERRIDES, f"run.precision={precision}"])


@contextlib.contextmanager
def deterministic_cpu(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count; the process's previous settings and RNGs come back after."""
    threads_before, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(strict, warn_only=warn_only)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])


def run_curve(precision: str = "fp32", threads: int = THREADS) -> list[dict[str, float]]:
    """The per-step loss terms of one worker's run (rank 0, no Ray, no DDP), following ``train_loop_per_worker``."""
    config = golden_config(precision)
    model_config = config.model.vglaw_config()
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *WORDS))}  # fixed: no WordPiece training
    tokenizer = ExpressionTokenizer(vocab, max_tokens=model_config.text.max_tokens)
    batch_size = config.batch_per_worker
    rows = fixed_rows(STEPS_PER_EPOCH * batch_size, model_config.vision.image_size)  # in the same order every epoch
    device = torch.device("cpu")
    curve = []
    with deterministic_cpu(threads):
        model, optimizer, scheduler = start_training(config, tokenizer.vocab_size, STEPS_PER_EPOCH, rank=0)
        model.to(device)
        criterion = GroundingLoss(config.loss)
        step_precision = resolve_precision(config.run.precision, device)
        for epoch in range(config.optim.epochs):
            for index in range(STEPS_PER_EPOCH):
                chunk = rows[index * batch_size : (index + 1) * batch_size]
                columns = {name: [row[name] for row in chunk] for name in TRAINING_COLUMNS}
                flips = flip_decisions(
                    config.run.seed, epoch, columns["ref_id"], columns["sent_id"], config.data.hflip_prob
                )
                batch = collate_rows(columns, tokenizer, flips, device)
                losses = train_step(
                    model, batch, criterion, optimizer, scheduler, config.optim.grad_clip, step_precision
                )
                curve.append({k: float(v) for k, v in losses.items()})
    return curve


def asset_path(precision: str) -> Path:
    return ASSETS / f"tiny_{precision}.txt"


def format_curve(curve: list[dict[str, float]], precision: str) -> str:
    """The asset's text: ``#`` comments saying what wrote it, a line of column names, then one line per step."""
    names = ["loss", *sorted(k for k in curve[0] if k != "loss")]
    header = [
        f"# Golden loss curve of tests/pipelines/train/test_golden_loss.py (compared with rtol {RTOL:g}).",
        f"# Run: one worker of {BASE_CONFIG}, {precision}, with",
        f"#   {' '.join(OVERRIDES)}",
        f"# on the test's fixed rows, {STEPS_PER_EPOCH} steps per epoch, on the CPU "
        f"({torch.backends.cpu.get_cpu_capability()}) with {THREADS} thread and deterministic algorithms,",
        f"# written with torch {torch.__version__}. Regenerate, only for a change meant to alter training numerics:",
        "#   .venv/bin/python -m tests.pipelines.train.test_golden_loss",
        "# One line per optimiser step: the step (from 1), then each loss term train_step returns.",
        " ".join(["step", *names]),
    ]
    lines = [" ".join([str(step), *(f"{values[k]:.9e}" for k in names)]) for step, values in enumerate(curve, 1)]
    return "\n".join(header + lines) + "\n"


def read_curve(path: Path) -> list[dict[str, float]]:
    lines = [line.split() for line in path.read_text().splitlines() if line and not line.startswith("#")]
    (_, *names), data = lines[0], lines[1:]
    assert [int(row[0]) for row in data] == list(range(1, len(data) + 1)), f"{path}: steps are not 1..n"
    return [dict(zip(names, map(float, row[1:]), strict=True)) for row in data]


def test_tiny_fp32_training_follows_the_golden_loss_curve() -> None:
    path = asset_path("fp32")
    golden = read_curve(path)
    curve = run_curve("fp32")
    assert len(curve) == len(golden) and set(curve[0]) == set(golden[0]), (
        f"the run's steps or loss terms differ from {path.name}: {len(curve)} steps of {sorted(curve[0])} against "
        f"{len(golden)} of {sorted(golden[0])}"
    )
    off = [
        f"step {step} {name}: {run[name]:.9e} against {gold[name]:.9e}"
        for step, (run, gold) in enumerate(zip(curve, golden, strict=True), 1)
        for name in gold
        if not np.isclose(run[name], gold[name], rtol=RTOL, atol=0.0)
    ]
    assert not off, (
        f"the run left the golden curve {path} (rtol {RTOL:g}) in {len(off)} values, first at\n  "
        + "\n  ".join(off[:6])
        + "\nIf the change is meant to alter training numerics, regenerate the asset: "
        "python -m tests.pipelines.train.test_golden_loss"
    )


def test_the_golden_curve_learns() -> None:
    # The asset is only worth guarding if the run it records learns: the loss ends well below where it started.
    loss = [values["loss"] for values in read_curve(asset_path("fp32"))]
    assert np.isfinite(loss).all()
    assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3]), loss


def main() -> None:
    """Rewrites the asset from a fresh run and prints how far it moved."""
    path = asset_path("fp32")
    started = time.perf_counter()
    curve = run_curve("fp32")
    print(f"{len(curve)} steps in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if path.is_file():
        old = read_curve(path)
        if len(old) == len(curve) and set(old[0]) == set(curve[0]):
            moved = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(curve, old) for k in b)
            print(f"largest relative change against the previous asset: {moved:.3e}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_curve(curve, "fp32"))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
