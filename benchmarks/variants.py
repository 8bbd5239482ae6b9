"""The demo's recipe on synthetic grammars it was not tuned on: does it learn grounding, or one dataset?

::

    python -m benchmarks.variants [--variants builtin ordinal crowded newlook] [--write-docs]

For each dataset (``builtin``: the demo's own, then the named variants of
``pipelines.data.synthetic.variants``), with the demo's image count and seed: generate it (``jobs.synth``),
preprocess it (``jobs.preprocess``) and train the demo's model on it with the demo's config and budget
(``jobs.train --config configs/synthetic.yaml``, Ray Train, MLflow experiment ``vglaw-variants``). It prints,
and with ``--write-docs`` writes into ``docs/benchmarks.md``, one row per dataset: the random-object chance
the generator reports, the final val Prec@0.5 and mIoU, and the training's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.convergence import read_curve, synthetic_parquet, train_run
from benchmarks.docs_section import write_generated
from jobs.demo import CONFIG, IMAGE_SIZE, SYNTH
from pipelines.data.synthetic.variants import VARIANTS

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "vglaw-variants"
BUILTIN = "builtin"  # the demo's dataset: the generator's defaults with the demo's object count


def _synth_flags(name: str) -> list[str]:
    if name == BUILTIN:
        return ["--min-objects", str(SYNTH["min_objects"]), "--max-objects", str(SYNTH["max_objects"])]
    return ["--variant", name]


def _row(name: str, stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    curve = read_curve(name, EXPERIMENT)
    config = stats["config"]
    return {
        "dataset": name,
        "objects": f"{config['min_objects']}-{config['max_objects']}",
        "image": f"{config['image_width']}x{config['image_height']}",
        "shapes": len(config["shapes"]),
        "colours": len(config["palette"]),
        "families": ", ".join(config["expression_families"]),
        "train_rows": stats["counts"]["expressions/train"],
        "chance": stats["chance_uniform_object"],
        "prec": curve.prec[-1],
        "miou": curve.miou[-1],
        "epochs": curve.epochs,
        "minutes": seconds / 60,
    }


def render(rows: list[dict[str, Any]], conditions: str) -> str:
    lines = [
        "| dataset | objects | image px | shapes | colours | expression kinds | training expressions | chance "
        "(random object) | val Prec@0.5 | val mIoU | training wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['objects']} | {r['image']} | {r['shapes']} | {r['colours']} | {r['families']} | "
            f"{r['train_rows']} | {r['chance']:.3f} | **{r['prec']:.3f}** | {r['miou']:.3f} | {r['minutes']:.1f} min |"
        )
    return f"{conditions}\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", nargs="+", default=[BUILTIN, *VARIANTS], choices=[BUILTIN, *VARIANTS], help="datasets to run"
    )
    parser.add_argument("--work", default="runs/benchmarks/variants", help="data, checkpoints and logs")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    parser.add_argument("override", nargs="*", help="training overrides, section.field=value")
    args = parser.parse_args(argv)

    import ray
    import torch

    from pipelines.train.config import load_config

    config = load_config(REPO / CONFIG, args.override)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_ADDRESS="", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    load_before = round(os.getloadavg()[0], 2)
    stamp = time.strftime("%Y%m%d-%H%M")  # a new run name each time: an existing name would resume that run
    rows = []
    for name in args.variants:
        raw, data = work / name / "raw", work / name / f"parquet_{IMAGE_SIZE}"
        synth_args = ["--images", str(SYNTH["num_images"]), "--seed", str(SYNTH["seed"]), *_synth_flags(name)]
        stats = synthetic_parquet(raw, data, synth_args, IMAGE_SIZE, env, work)
        seconds = train_run(CONFIG, f"{stamp}-{name}", data, EXPERIMENT, work / "runs", args.override, env)
        rows.append(_row(name, stats, seconds))
        print(json.dumps(rows[-1]), flush=True)
    conditions = (
        f"`python -m benchmarks.variants {' '.join(argv if argv is not None else sys.argv[1:])}`: each dataset "
        f"with {SYNTH['num_images']} images (seed {SYNTH['seed']}), preprocessed at {IMAGE_SIZE} px, trained with the "
        f"demo's config `{CONFIG}` (preset `{config.model.preset}`, {config.optim.epochs} epochs, global batch "
        f"{config.optim.global_batch_size} on {config.run.num_workers} CPU workers, precision "
        f"{config.run.precision or 'fp32'}). Machine: {os.cpu_count()} CPU cores, no GPU, Python "
        f"{platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}; {time.strftime('%Y-%m-%d')}; "
        f"1-minute load average {load_before} before the runs. Training wall time includes Ray start-up and the "
        "step-0 and per-epoch validations, as the demo's training stage does."
    )
    section = render(rows, conditions)
    print(section)
    if args.write_docs:
        write_generated("variants", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
