"""Training-step time per sample (forward, loss, backward, AdamW), as markdown tables.

Two reports; PyTorch only, no Ray; on the CPU or a CUDA GPU.

* Variants (default): VG-LAW with the low-rank qkv update, with dense per-sample qkv weights, and the static
  backbone, at one ``--precision`` and with or without ``--compile``.
* ``--grid``: VG-LAW (low-rank) in fp32 and bf16 autocast, eager and ``torch.compile``d, for each of
  ``--presets``, against fp32 eager. On the CPU bf16 goes through CPU autocast, as the tests do; it is fast
  only where the CPU has bf16 instructions (AVX-512 BF16 or AMX), which the header lists.

    python benchmarks/model_step.py --preset tiny --batch 8
    python benchmarks/model_step.py --preset base --batch 2 --steps 5 --precision bf16
    python benchmarks/model_step.py --grid --presets tiny base --batch 2 --steps 5 --warmup 2
    python benchmarks/model_step.py --preset base --device cuda --batch 64 --compile
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vglaw import create_model
from vglaw.losses import GroundingLoss
from vglaw.precision import PRECISIONS, autocast, cpu_bf16_instructions, resolve_precision
from vglaw.transforms import normalize

VARIANTS = {
    "vg-law (low-rank qkv)": {"enabled": True, "dense": False},
    "vg-law (dense per-sample qkv)": {"enabled": True, "dense": True},
    "static backbone": {"enabled": False, "dense": False},
}
GRID = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]  # (precision, compiled)


@dataclass
class Timing:
    seconds: float  # median seconds per timed step
    first: float  # seconds of the first (untimed) step: compilation, kernel selection, allocator warm-up
    loss: float  # the first step's loss, to see that every condition trains the same model


def time_steps(
    preset: str,
    variant: dict,
    *,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    compile: bool,
) -> Timing:
    """Times training steps of a freshly seeded model on fixed random inputs."""
    torch.manual_seed(0)
    model = create_model(preset, enabled=variant["enabled"]).to(device).train()
    if model.weight_generator is not None:
        model.weight_generator.dense = variant["dense"]
    if compile:
        torch._dynamo.reset()  # a fresh cache per condition, so that no earlier model counts towards its limit
    step_model = torch.compile(model) if compile else model
    criterion = GroundingLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, vocab = model.config.vision.image_size, model.config.text.vocab_size
    images = normalize(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device))
    ids = torch.randint(5, vocab, (batch, 20), device=device)
    mask = torch.ones(batch, 20, dtype=torch.bool, device=device)
    boxes = torch.rand(batch, 4, device=device) * 0.5 + 0.25
    masks = (torch.rand(batch, size, size, device=device) > 0.5).float()
    timings, first_loss = [], float("nan")
    for i in range(max(warmup, 1) + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(precision, device):
            out = step_model(images, ids, mask)
            loss = criterion(out.boxes, out.mask_logits, boxes, masks)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        if i == 0:
            first_loss = loss.item()
    return Timing(statistics.median(timings[max(warmup, 1) :]), timings[0], first_loss)


def cpu_description() -> str:
    """The CPU's model name and its bf16 instruction sets, from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name} ({', '.join(cpu_bf16_instructions(cpuinfo)) or 'no bf16 instructions listed'})"


def conditions(args: argparse.Namespace) -> str:
    """One line with everything a reader needs to compare two tables."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    return (
        f"torch {torch.__version__}; device {args.device}: {device}; {torch.get_num_threads()} threads; "
        f"batch {args.batch}; median of {args.steps} timed steps after {max(args.warmup, 1)} warm-up; "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}"
    )


def run_variants(args: argparse.Namespace) -> None:
    precision = resolve_precision(args.precision, args.device)
    print(f"# preset {args.preset}; {precision}; compile={args.compile}; {conditions(args)}")
    print("| variant | s / step | ms / sample | vs static |")
    print("|---|---|---|---|")
    results = {
        name: time_steps(
            args.preset,
            variant,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            precision=precision,
            compile=args.compile,
        )
        for name, variant in VARIANTS.items()
    }
    static = results["static backbone"].seconds
    for name, timing in results.items():
        s = timing.seconds
        print(f"| {name} | {s:.4f} | {1000 * s / args.batch:.2f} | {s / static:.3f}x |")


def run_grid(args: argparse.Namespace) -> None:
    print(f"# VG-LAW (low-rank qkv) training step; {conditions(args)}")
    print("| preset | precision | compile | s / step | ms / sample | vs fp32 eager | first step s | loss step 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        baseline = None
        for precision, compiled in GRID:
            timing = time_steps(
                preset,
                VARIANTS["vg-law (low-rank qkv)"],
                batch=args.batch,
                steps=args.steps,
                warmup=args.warmup,
                device=args.device,
                precision=precision,
                compile=compiled,
            )
            s = timing.seconds
            baseline = s if baseline is None else baseline  # the grid starts with fp32 eager
            print(
                f"| {preset} | {precision} | {'inductor' if compiled else 'eager'} | {s:.4f} | "
                f"{1000 * s / args.batch:.2f} | {baseline / s:.2f}x faster | {timing.first:.1f} | {timing.loss:.4f} |",
                flush=True,
            )
    print(
        "\nfirst step: the untimed first step, with compilation for inductor. loss step 1: inductor draws other "
        "dropout masks than eager, so compare it between precisions of one compile mode."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset for the variants table (vglaw.list_models())")
    parser.add_argument("--grid", action="store_true", help="time fp32/bf16 x eager/compiled instead of variants")
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], help="presets of the --grid table")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=None, help="variants table: default bf16 on CUDA, fp32 on the CPU"
    )
    parser.add_argument("--compile", action="store_true", help="variants table: wrap the model in torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.grid:
        run_grid(args)
    else:
        run_variants(args)


if __name__ == "__main__":
    main()
