"""Generate the built-in synthetic referring dataset in the REFER layout.

Usage::

    python -m jobs.synth --out data/synthetic [--images 300] [--seed 0] [--image-size 320x240]
    python -m jobs.synth --out data/synthetic_ordinal --variant ordinal [--max-objects 5]

A ``--variant`` (``pipelines/data/synthetic/variants.py``) sets several options at once; flags given
explicitly override its values. ``--help`` lists every option with its built-in default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic
from pipelines.data.synthetic.language import FAMILIES
from pipelines.data.synthetic.scene import COLOURS, SHAPES
from pipelines.data.synthetic.variants import VARIANTS

# The built-in value of every SyntheticConfig field, for the help texts (flags themselves default to None,
# so that a variant's value stands unless a flag is given).
_DEFAULTS = {f.name: f.default for f in fields(SyntheticConfig)}


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


def _names(text: str) -> tuple[str, ...]:
    """Parses a comma-separated list of names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _radius_range(text: str) -> tuple[float, float]:
    """Parses ``LOW,HIGH`` (fractions of the shorter image side)."""
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected LOW,HIGH (fractions of the shorter side), got {text!r}")


def _default(name: str) -> str:
    value = _DEFAULTS[name]
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


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
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="a named set of the options below (docs/data.md); explicit flags override its values",
    )
    w, h = _DEFAULTS["image_width"], _DEFAULTS["image_height"]
    p.add_argument("--image-size", type=_image_size, metavar="WxH", help=f"image size WxH or S (default {w}x{h})")
    for flag, name, what in (
        ("--min-objects", "min_objects", "fewest shapes per image"),
        ("--max-objects", "max_objects", "most shapes per image"),
        ("--refs-per-image", "refs_per_image", "most referred shapes per image"),
        ("--sentences-per-ref", "sentences_per_ref", "most expressions per shape"),
    ):
        p.add_argument(flag, type=int, dest=name, help=f"{what} (default {_default(name)})")
    p.add_argument(
        "--share-prob",
        type=float,
        help=f"chance that a shape copies an earlier one's shape or colour (default {_default('share_prob')})",
    )
    p.add_argument(
        "--shapes",
        type=_names,
        metavar="NAMES",
        help=f"comma-separated, from {','.join(SHAPES)} (default {_default('shapes')})",
    )
    p.add_argument(
        "--palette",
        type=_names,
        metavar="NAMES",
        help=f"comma-separated, from {','.join(COLOURS)} (default {_default('palette')})",
    )
    for flag, name, what in (("--small-radius", "small_radius", "small"), ("--big-radius", "big_radius", "big")):
        p.add_argument(
            flag,
            type=_radius_range,
            dest=name,
            metavar="LOW,HIGH",
            help=f"circumradius range LOW,HIGH of the {what} class, as fractions of the shorter side "
            f"(default {_default(name)})",
        )
    p.add_argument(
        "--size-classes",
        action=argparse.BooleanOptionalAction,
        help="draw shapes as small or big; --no-size-classes draws radii from one range and drops those words "
        "(default on)",
    )
    p.add_argument(
        "--families",
        type=_names,
        dest="expression_families",
        metavar="KINDS",
        help=f"kinds of expression, comma-separated, from {','.join(FAMILIES)} "
        f"(default {_default('expression_families')})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes drawing the images; the files do not depend on it (default: one per CPU)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return p


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    """The config the flags describe: the variant's values (if any), then every flag given explicitly.

    Raises:
        ValueError: If the resulting config is invalid.
    """
    values = dict(VARIANTS[args.variant]) if args.variant else {}
    values.update({k: v for k, v in vars(args).items() if k in _DEFAULTS and v is not None})
    if args.image_size is not None:
        values["image_width"], values["image_height"] = args.image_size
    return SyntheticConfig(**{**values, "num_images": args.images, "seed": args.seed})


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        summary = generate_synthetic(args.out, config, overwrite=args.overwrite, workers=args.workers)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    variant = f" (variant {args.variant})" if args.variant else ""
    print(f"wrote {args.images} images{variant} to {args.out} in {summary['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
