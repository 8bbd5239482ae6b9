"""How fast the demo-size model learns to ground, against the same model trained without language.

::

    python -m benchmarks.convergence [--images 4000] [--epochs N] [--blind-epochs N] [--write-docs]

Generates the synthetic dataset, preprocesses it with Ray Data and trains the demo's model with the
convergence schedule (``configs/synthetic_convergence.yaml``) twice with the real training job (Ray Train,
MLflow):

- **language**: the dataset as it is;
- **language-blind**: the same rows with every expression replaced by one constant word, so that the model
  sees the image alone. It must stay near the dataset's chance level (``chance_uniform_object`` in the
  generator's statistics), which is what shows that the synthetic task needs language.

Both runs go to the MLflow experiment ``vglaw-convergence``. The script reads their per-epoch val Prec@0.5
back from MLflow, reports the wall time at which the language run first reaches ``--target``, draws both
curves (``docs/images/convergence.png``) and, with ``--write-docs``, rewrites the convergence section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.docs_section import write_generated
from pipelines.data.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent
PLOT = REPO / "docs" / "images" / "convergence.png"
EXPERIMENT = "vglaw-convergence"
BLIND_EXPRESSION = "object"  # one word for every row: no information about which object is meant


@dataclass
class Curve:
    """One run's validation curve: per evaluation, the step, minutes since the run started and Prec@0.5."""

    name: str
    run_id: str
    steps: list[int]
    minutes: list[float]
    prec: list[float]
    miou: list[float]
    epochs: int

    def first_reaching(self, target: float) -> tuple[int, float] | None:
        """(step, minutes) of the first evaluation at or above ``target``."""
        for step, minutes, value in zip(self.steps, self.minutes, self.prec):
            if value >= target:
                return step, minutes
        return None


def run_logged(args: list[str], env: dict[str, str], log: Path) -> None:
    """Runs a job with its output in ``log``; exits naming the log if it fails."""
    print("$", " ".join(args), flush=True)
    with log.open("w") as out:
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"{args[2]} failed ({proc.returncode}); see {log}")


def synthetic_parquet(
    raw: Path, data: Path, synth_args: list[str], image_size: int, env: dict[str, str], logs: Path
) -> dict[str, Any]:
    """Generates a synthetic dataset into ``raw`` (``jobs.synth`` with ``synth_args``) and preprocesses it into
    ``data`` (``jobs.preprocess``), each only when missing; returns the generator's statistics."""
    stats = raw / "synthetic" / "generator.json"
    if not stats.is_file():
        run_logged(
            [sys.executable, "-m", "jobs.synth", "--out", str(raw), *synth_args, "--overwrite"],
            env, logs / f"{raw.parent.name}-synth.log",
        )  # fmt: skip
    if not (data / "manifest.json").is_file():
        run_logged(
            [sys.executable, "-m", "jobs.preprocess", "--refer-root", str(raw), "--out", str(data),
             "--image-size", str(image_size), "--overwrite"],
            env, logs / f"{raw.parent.name}-preprocess.log",
        )  # fmt: skip
    return json.loads(stats.read_text())


def train_run(
    config: str, name: str, data: Path, experiment: str, storage: Path, overrides: list[str], env: dict[str, str]
) -> float:
    """Trains ``config`` on ``data`` as the run ``name`` (unregistered, no overlays), its output in
    ``<storage>/../<name>.log``; returns its wall time in seconds, Ray start-up included."""
    started = time.perf_counter()
    run_logged(
        [sys.executable, "-m", "jobs.train", "--config", config, f"data.path={data}", f"run.name={name}",
         f"run.experiment={experiment}", f"run.storage_path={storage}", "run.registered_model_name=null",
         "run.overlays=0", *overrides],
        env, storage.parent / f"{name}.log",
    )  # fmt: skip
    return time.perf_counter() - started


def _prepare_data(
    work: Path, args: argparse.Namespace, image_size: int, env: dict[str, str]
) -> tuple[Path, dict[str, Any]]:
    """The preprocessed dataset (made when missing) and the generator's statistics of its source."""
    raw, data = work / "raw", work / f"parquet_{image_size}"
    wanted = {
        "num_images": args.images,
        "seed": args.seed,
        "min_objects": args.min_objects,
        "max_objects": args.max_objects,
    }
    synth_args = ["--images", str(args.images), "--seed", str(args.seed), "--min-objects", str(args.min_objects),
                  "--max-objects", str(args.max_objects)]  # fmt: skip
    stats = synthetic_parquet(raw, data, synth_args, image_size, env, work)
    made = stats["config"]
    if any(made[k] != v for k, v in wanted.items()):
        raise SystemExit(f"{raw} holds another dataset ({made}); pick another --work or remove it")
    return data, stats


def blind_copy(data: Path, out: Path) -> Path:
    """A copy of a preprocessed dataset whose expressions are all :data:`BLIND_EXPRESSION`."""
    if (out / "manifest.json").is_file():
        return out
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    for file in sorted(data.rglob("*.parquet")):
        table = pq.read_table(file)
        column = table.schema.get_field_index("expression")
        blank = [BLIND_EXPRESSION] * table.num_rows
        target = stage / file.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.set_column(column, table.schema.field(column), [blank]), target)
    manifest = read_manifest(data)
    manifest["note"] = f"every expression replaced by {BLIND_EXPRESSION!r} (language-blind baseline)"
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(stage, out)
    return out


def _train(name: str, data: Path, work: Path, args: argparse.Namespace, epochs: int, env: dict[str, str]) -> None:
    train_run(args.config, name, data, EXPERIMENT, work / "runs", [f"optim.epochs={epochs}", *args.override], env)


def read_curve(name: str, experiment_name: str = EXPERIMENT) -> Curve:
    """The latest run called ``name`` in the experiment, from MLflow (``name`` ends the run's name, which starts
    with the date and time of the benchmark)."""
    from pipelines.tracking.runs import client

    mlflow = client()
    experiment = mlflow.get_experiment_by_name(experiment_name)
    runs = (
        mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.run_name LIKE '%-{name}'",
            order_by=["start_time DESC"],
        )
        if experiment is not None
        else []
    )
    if not runs:
        raise SystemExit(f"no MLflow run named {name} in {experiment_name}")
    run = runs[0]
    prec = sorted(mlflow.get_metric_history(run.info.run_id, "val/prec_at_0.5"), key=lambda m: m.step)
    miou = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "val/miou")}
    start = run.info.start_time
    return Curve(
        name=name,
        run_id=run.info.run_id,
        steps=[m.step for m in prec],
        minutes=[(m.timestamp - start) / 60000 for m in prec],
        prec=[m.value for m in prec],
        miou=[miou.get(m.step, float("nan")) for m in prec],
        epochs=int(run.data.params["optim.epochs"]),
    )


def plot(curves: list[Curve], chance: float, target: float, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve.minutes, curve.prec, marker="o", label=curve.name)
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
    ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target ({target:.2f})")
    ax.set_xlabel("wall time (min, 2 training workers)")
    ax.set_ylabel("val Prec@0.5")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _table(curves: list[Curve]) -> str:
    lines = ["| run | step | minutes | val Prec@0.5 | val mIoU |", "|---|---|---|---|---|"]
    for curve in curves:
        for step, minutes, prec, miou in zip(curve.steps, curve.minutes, curve.prec, curve.miou):
            lines.append(f"| {curve.name} | {step} | {minutes:.1f} | {prec:.3f} | {miou:.3f} |")
    return "\n".join(lines)


def render_section(result: dict[str, Any], curves: list[Curve]) -> str:
    reached = result["reached"]
    verdict = (
        f"**Reached val Prec@0.5 >= {result['target']} at step {reached[0]}, {reached[1]:.1f} min** into the run."
        if reached
        else f"**Did not reach val Prec@0.5 >= {result['target']}** within {result['epochs']} epochs "
        f"(best {max(curves[0].prec):.3f})."
    )
    category = f", category loss weight {result['category']}" if result.get("category") else ""
    return f"""`{result["command"]}`: the demo
configuration (`{result["config"]}`: preset `{result["preset"]}`, {result["image_size"]} px, global batch
{result["batch"]} on 2 CPU training workers, LAP attention loss weight {result["attention"]}{category}) on the synthetic
dataset with {result["images"]} images of {result["min_objects"]}-{result["max_objects"]} shapes
({result["train_rows"]} training expressions, {result["val_rows"]} val). Machine: {result["cpus"]} CPU cores, no
GPU, Python {result["python"]}, torch {result["torch"]}, Ray {result["ray"]}; {result["date"]}; 1-minute load
average {result["load_before"]} before the runs (other work on the machine slows the runs). Minutes count from the
MLflow run's start (Ray Train start-up and step-0 validation included).

{verdict} The language-blind run (every expression replaced by "{BLIND_EXPRESSION}",
{result["blind_epochs"]} epoch{"s" if result["blind_epochs"] != 1 else ""}) ends at {curves[1].prec[-1]:.3f}; a
blind model that picks a uniformly random object would score
{result["chance"]:.3f} on this dataset (`chance_uniform_object`): not knowing which shape is meant, the
blind model learns to mask every shape (its mIoU ends at {curves[1].miou[-1]:.3f}, about one over the number
of shapes) and to put its box between them, which rarely overlaps any one shape by half. Both runs are in
the MLflow experiment `{EXPERIMENT}`.

![convergence](images/convergence.png)

{_table(curves)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/synthetic_convergence.yaml", help="training config (the demo's model)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each run (default: the config's)")
    parser.add_argument(
        "--blind-epochs", type=int, default=None, help="epochs of the language-blind run (default: as the other)"
    )
    parser.add_argument("--images", type=int, default=4000, help="synthetic images over all splits")
    parser.add_argument("--min-objects", type=int, default=2, help="fewest shapes per image")
    parser.add_argument("--max-objects", type=int, default=3, help="most shapes per image")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--target", type=float, default=0.9, help="val Prec@0.5 to reach")
    parser.add_argument(
        "--work", default=None, help="data, checkpoints and logs (default: runs/benchmarks/convergence<images>)"
    )
    parser.add_argument("--skip-blind", action="store_true", help="reuse the last language-blind run")
    parser.add_argument("--skip-language", action="store_true", help="reuse the last language run")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    parser.add_argument("override", nargs="*", help="training overrides, section.field=value")
    args = parser.parse_args(argv)

    import ray
    import torch

    from pipelines.train.config import load_config

    config = load_config(REPO / args.config, args.override)
    epochs = args.epochs or config.optim.epochs
    image_size = config.model.vglaw_config().vision.image_size
    work = (REPO / (args.work or f"runs/benchmarks/convergence{args.images}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_ADDRESS="", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    load_before = round(os.getloadavg()[0], 2)
    data, stats = _prepare_data(work, args, image_size, env)
    blind = blind_copy(data, work / f"parquet_{image_size}_blind")
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M")  # a new run name each time: an existing name would resume that run
    if not args.skip_language:
        _train(f"{stamp}-language", data, work, args, epochs, env)
    if not args.skip_blind:
        _train(f"{stamp}-language-blind", blind, work, args, args.blind_epochs or epochs, env)
    curves = [read_curve("language"), read_curve("language-blind")]
    manifest = read_manifest(data)
    result = {
        "target": args.target,
        "reached": curves[0].first_reaching(args.target),
        # From the runs themselves: with --skip-* a run comes from an earlier invocation.
        "epochs": curves[0].epochs,
        "blind_epochs": curves[1].epochs,
        "command": "python -m benchmarks.convergence " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "images": args.images,
        "min_objects": args.min_objects,
        "max_objects": args.max_objects,
        "config": args.config,
        "preset": config.model.preset,
        "image_size": image_size,
        "batch": config.optim.global_batch_size,
        "attention": config.loss.attention,
        "category": config.loss.category,
        "train_rows": manifest["splits"]["train"]["rows"],
        "val_rows": manifest["splits"]["val"]["rows"],
        "chance": stats["chance_uniform_object"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_before": load_before,
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    plot(curves, result["chance"], args.target, PLOT)
    print(_table(curves))
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    from pipelines.tracking.runs import client

    client().log_artifact(curves[0].run_id, str(PLOT), "convergence")
    if args.write_docs:
        write_generated("convergence", render_section(result, curves))
    return 0 if result["reached"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
