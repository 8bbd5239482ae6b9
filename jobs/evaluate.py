"""Evaluate a VG-LAW model on preprocessed splits with Ray Data, and log the report to MLflow.

Usage::

    python -m jobs.evaluate --model <model dir | models:/name@alias | models:/name/version | runs:/id/model> \\
        --data DIR --splits val,testA,testB [--actors N] [--batch-size B] [--out report.json] [--no-mlflow]

Runs on a local Ray instance unless ``RAY_ADDRESS`` points at a cluster (as under ``ray job submit``); the
data folder must then be on storage every node can read. MLflow goes to ``MLFLOW_TRACKING_URI`` or the
project's ``mlflow.db``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.evaluate.stage import EvaluationConfig, log_evaluation, run_evaluation
from pipelines.runtime import ensure_ray
from vglaw.precision import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Prec@0.5, mIoU and oIoU (in original image pixels) per split, with the breakdown by "
        "expression length, through Ray Data batch inference with an actor pool. Writes a JSON report, a "
        "plot and prediction overlays, and logs them to MLflow.",
        epilog="Honours RAY_ADDRESS and MLFLOW_TRACKING_URI.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (from vglaw.save_pretrained) or MLflow URI: models:/name@alias, "
        "models:/name/version, runs:/<run_id>/<path>",
    )
    p.add_argument("--data", type=Path, required=True, help="output folder of jobs.preprocess (holds manifest.json)")
    p.add_argument("--splits", default="val", help="comma-separated splits, e.g. val,testA,testB (default val)")
    p.add_argument("--actors", type=int, default=1, help="inference actors per split (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="expressions per forward pass (default 16)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor; 0 runs on CPU (default 0)")
    p.add_argument(
        "--precision",
        default=None,
        choices=list(PRECISIONS),
        help="forward-pass precision, bf16 through autocast (default: bf16 on GPUs, fp32 on the CPU)",
    )
    p.add_argument("--mask-threshold", type=float, default=None, help="mask probability threshold (default: model's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each split")
    p.add_argument("--overlays", type=int, default=8, help="examples per split in the overlay PNG; 0: none")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON report path; <stem>_by_length.png and <stem>_overlays_<split>.png go beside it "
        "(default runs/evaluation/<model>/report.json)",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all of this machine)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--experiment", default="evaluation", help="MLflow experiment of the new run (default evaluation)")
    p.add_argument("--run-id", default=None, help="log into this existing MLflow run instead of a new one")
    p.add_argument("--run-name", default=None, help="name of the new MLflow run (default eval-<model>-<time>)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = EvaluationConfig(
            model=args.model,
            data=args.data,
            splits=tuple(args.splits.split(",")),
            out=args.out,
            num_actors=args.actors,
            batch_size=args.batch_size,
            num_cpus_per_actor=args.cpus_per_actor,
            num_gpus_per_actor=args.gpus_per_actor,
            precision=args.precision,
            mask_threshold=args.mask_threshold,
            overlays=args.overlays,
            limit=args.limit,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ensure_ray(args.num_cpus)
    try:
        outputs = run_evaluation(config)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.no_mlflow:
        run_id = log_evaluation(outputs, experiment=args.experiment, run_id=args.run_id, run_name=args.run_name)
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
