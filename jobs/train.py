"""Train VG-LAW with Ray Train, tracked in MLflow.

Usage::

    python -m jobs.train --config configs/synthetic.yaml [section.field=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/refcoco.yaml run.num_workers=8

Runs on a local Ray instance unless ``RAY_ADDRESS`` names a cluster. Submitting again with the same
``run.name`` resumes from the run's last checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.train.config import load_config


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train VG-LAW on preprocessed Parquet data with Ray Train (DDP) and MLflow tracking.",
        epilog="Examples of overrides: optim.epochs=3 run.num_workers=4 run.use_gpu=true "
        "model.overrides='{depth: 2, global_blocks: [1]}' data.path=data/processed/refcoco_unc. "
        "Honours RAY_ADDRESS and MLFLOW_TRACKING_URI.",
    )
    parser.add_argument("--config", default="configs/synthetic.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, values parsed as YAML")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from pipelines.train.driver import SetupError, run_training

    try:
        summary = run_training(config)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown = {k: round(v, 4) for k, v in summary.metrics.items() if k.startswith("val/")}
    print(f"run {summary.run_name}: {summary.steps} steps, {summary.epochs} epochs, {shown}")
    print(f"model directory: {summary.model_dir}")
    if summary.mlflow_run_id:
        print(f"MLflow run: {summary.mlflow_run_id}; registered version: {summary.registered_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
