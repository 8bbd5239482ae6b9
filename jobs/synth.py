"""Generate the built-in synthetic referring dataset in the REFER layout.

Usage::

    python -m jobs.synth --out data/synthetic [--images 300] [--seed 0] [--image-size 320x240]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic


def _image_size(text: str) -> tuple[int, int]:
    """Parses ``WxH`` or a single side ``S`` (square)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected WxH or S, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.synth",
        description="Write the synthetic shapes dataset as <out>/synthetic/refs(unc).p, "
        "<out>/synthetic/instances.json and <out>/images/*.jpg (the REFER layout).",
    )
    p.add_argument("--out", required=True, help="output folder (created; refused if it holds a dataset)")
    p.add_argument("--images", type=int, default=300, help="number of images over all splits (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed; same seed and options give identical files")
    p.add_argument("--image-size", type=_image_size, default=(320, 240), help="image size WxH or S (default 320x240)")
    p.add_argument("--min-objects", type=int, default=3, help="fewest shapes per image (default 3)")
    p.add_argument("--max-objects", type=int, default=6, help="most shapes per image (default 6)")
    p.add_argument("--refs-per-image", type=int, default=3, help="most referred shapes per image (default 3)")
    p.add_argument("--sentences-per-ref", type=int, default=3, help="most expressions per shape (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = SyntheticConfig(
            num_images=args.images,
            seed=args.seed,
            image_width=args.image_size[0],
            image_height=args.image_size[1],
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            refs_per_image=args.refs_per_image,
            sentences_per_ref=args.sentences_per_ref,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        summary = generate_synthetic(args.out, config, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print(f"wrote {args.images} images to {args.out} in {summary['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
