"""Forward+backward time per sample: VG-LAW vs the same model with a static backbone, low-rank vs dense qkv.

Runs on the CPU or a CUDA GPU (bf16 autocast there, optionally ``torch.compile``); PyTorch only, no Ray.

    python benchmarks/model_step.py --preset tiny --batch 8
    python benchmarks/model_step.py --preset base --batch 2 --steps 5
    python benchmarks/model_step.py --preset base --device cuda --batch 64 --compile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vglaw import create_model
from vglaw.losses import GroundingLoss
from vglaw.transforms import normalize

VARIANTS = {
    "vg-law (low-rank qkv)": {"enabled": True, "dense": False},
    "vg-law (dense per-sample qkv)": {"enabled": True, "dense": True},
    "static backbone": {"enabled": False, "dense": False},
}


def time_variant(preset: str, variant: dict, batch: int, steps: int, warmup: int, device: str, compile: bool) -> float:
    """Median seconds per training step (forward, loss, backward, optimiser step)."""
    torch.manual_seed(0)
    model = create_model(preset, enabled=variant["enabled"]).to(device).train()
    if model.weight_generator is not None:
        model.weight_generator.dense = variant["dense"]
    step_model = torch.compile(model) if compile else model
    criterion = GroundingLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, vocab = model.config.vision.image_size, model.config.text.vocab_size
    images = normalize(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device))
    ids = torch.randint(5, vocab, (batch, 20), device=device)
    mask = torch.ones(batch, 20, dtype=torch.bool, device=device)
    boxes = torch.rand(batch, 4, device=device) * 0.5 + 0.25
    masks = (torch.rand(batch, size, size, device=device) > 0.5).float()
    autocast = device == "cuda"
    timings = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = step_model(images, ids, mask)
            loss = criterion(out.boxes, out.mask_logits, boxes, masks)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (vglaw.list_models())")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"# preset={args.preset} batch={args.batch} device={args.device} ({device_name}) "
        f"threads={torch.get_num_threads()} torch={torch.__version__} compile={args.compile} "
        f"precision={'bf16 autocast' if args.device == 'cuda' else 'fp32'} median of {args.steps} after {args.warmup}"
    )
    print("| variant | s / step | ms / sample | vs static |")
    print("|---|---|---|---|")
    results = {
        name: time_variant(args.preset, v, args.batch, args.steps, args.warmup, args.device, args.compile)
        for name, v in VARIANTS.items()
    }
    static = results["static backbone"]
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.4f} | {1000 * seconds / args.batch:.2f} | {seconds / static:.3f}x |")


if __name__ == "__main__":
    main()
