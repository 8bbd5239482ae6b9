"""Preprocess a REFER dataset into sharded Parquet with Ray Data.

Usage::

    python -m jobs.preprocess --dataset refcoco --split-by unc --refer-root R --image-root I --out O \\
        [--image-size 448] [--rows-per-file N] [--strict] [--overwrite]
    python -m jobs.preprocess                       # the synthetic dataset, generated on first use

Runs on a local Ray instance unless ``RAY_ADDRESS`` points at a cluster (as under ``ray job submit``);
on a cluster, the REFER files, the image root and ``--out`` must be on storage every node can reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    StrictModeError,
    format_summary,
    run_preprocess,
)
from pipelines.data.refer import REFER_SPLIT_BYS
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic

DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    names = ", ".join(f"{d} ({'/'.join(s)})" for d, s in REFER_SPLIT_BYS.items())
    p = argparse.ArgumentParser(
        prog="python -m jobs.preprocess",
        description="Turn a REFER-format dataset into per-split sharded Parquet (one row per expression, "
        "image letterboxed to --image-size) plus manifest.json, with Ray Data. With no arguments, "
        f"preprocesses the built-in synthetic dataset (generated into {DEFAULT_SYNTHETIC_ROOT} if absent).",
        epilog=f"datasets (split-by): {names}. Honours RAY_ADDRESS.",
    )
    p.add_argument("--dataset", default="synthetic", choices=sorted(REFER_SPLIT_BYS), help="dataset name")
    p.add_argument("--split-by", default="unc", help="split variant: unc, google, umd, berkeley")
    p.add_argument(
        "--refer-root",
        type=Path,
        default=DEFAULT_SYNTHETIC_ROOT,
        help="folder holding <dataset>/refs(<split-by>).p and <dataset>/instances.json "
        f"(default {DEFAULT_SYNTHETIC_ROOT})",
    )
    p.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder the images' file_name are relative to (COCO train2014, saiapr_tc-12); "
        "default <refer-root>/images for the synthetic dataset, required otherwise",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default data/processed/<dataset>_<split-by>)")
    p.add_argument("--image-size", type=int, default=448, help="side of the letterboxed canvas (default 448)")
    p.add_argument("--rows-per-file", type=int, default=1000, help="most rows per Parquet file (default 1000)")
    p.add_argument(
        "--image-format",
        default="jpeg",
        choices=["jpeg", "png"],
        help="canvas encoding: jpeg (q95, 4:4:4; default) or png (lossless, ~4x larger)",
    )
    p.add_argument(
        "--images-per-task",
        type=int,
        default=PreprocessConfig.images_per_task,
        help=f"images per Ray task, which writes them as one file (default {PreprocessConfig.images_per_task})",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default all)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad item instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 also when items were skipped and listed)."""
    args = build_parser().parse_args(argv)
    image_root = args.image_root
    if image_root is None:
        if args.dataset != "synthetic":
            print("error: --image-root is required for real datasets", file=sys.stderr)
            return 2
        image_root = args.refer_root / "images"
    out = args.out or Path("data/processed") / f"{args.dataset}_{args.split_by}"
    try:
        config = PreprocessConfig(
            dataset=args.dataset,
            split_by=args.split_by,
            refer_root=args.refer_root,
            image_root=image_root,
            out=out,
            image_size=args.image_size,
            rows_per_file=args.rows_per_file,
            image_format=args.image_format,
            images_per_task=args.images_per_task,
            strict=args.strict,
            overwrite=args.overwrite,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dataset == "synthetic" and not config.source.refs_path.exists():
        print(f"generating the synthetic dataset into {args.refer_root} ...")
        generate_synthetic(args.refer_root, SyntheticConfig())
    try:
        manifest = run_preprocess(config, num_cpus=args.num_cpus)
    except (FileExistsError, FileNotFoundError, StrictModeError, PreprocessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(manifest))
    print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
