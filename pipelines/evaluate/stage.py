"""The evaluation stage: resolve a model, evaluate splits on Ray, write the report, log it to MLflow."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.parquet import split_files
from pipelines.evaluate.inference import SplitEvaluation, evaluate_splits, read_chunk
from pipelines.evaluate.report import (
    build_report,
    data_identity,
    overlay_examples,
    plot_length_breakdown,
    write_report,
)
from pipelines.runtime import ensure_ray
from vglaw.precision import check_precision

__all__ = ["EvaluationConfig", "EvaluationOutputs", "default_report_path", "log_evaluation", "run_evaluation"]


def default_report_path(model: str) -> Path:
    """``runs/evaluation/<model>/report.json``, beside the training runs and ignored by git like them.

    ``<model>`` names what was evaluated: ``vglaw-synthetic`` for ``runs/vglaw-synthetic/model``,
    ``vglaw-synthetic@best`` for ``models:/vglaw-synthetic@best``, ``vglaw-synthetic-v3`` for version 3.
    """
    if "://" in model or model.startswith(("models:/", "runs:/")):
        scheme, _, rest = model.partition(":/")
        parts = [part for part in rest.split("/") if part]
        if scheme == "models" and len(parts) == 2 and parts[1].isdigit():
            label = f"{parts[0]}-v{parts[1]}"
        else:
            label = "-".join(parts)
    else:
        path = Path(model)
        label = path.parent.name if path.name == "model" and path.parent.name else path.name
    label = re.sub(r"[^A-Za-z0-9._@-]+", "-", label).strip("-.") or "model"
    return Path("runs") / "evaluation" / label / "report.json"


@dataclass
class EvaluationConfig:
    """What to evaluate and how.

    Attributes:
        model: A model directory or an MLflow URI (``models:/name@alias``, ``models:/name/version``, ``runs:/...``).
        data: Output folder of the preprocessing job.
        splits: Splits to evaluate, in report order.
        out: Path of the JSON report; the plot and overlays are written beside it with the same stem. None:
            :func:`default_report_path` of the model.
        num_actors: Actor-pool size per split.
        batch_size: Expressions per forward pass.
        num_cpus_per_actor: CPUs per actor.
        num_gpus_per_actor: GPUs per actor (0: CPU inference).
        precision: ``fp32`` or ``bf16`` (autocast); None: bf16 on GPUs, fp32 on the CPU.
        mask_threshold: Mask probability threshold; None for the model's.
        overlays: Rows per split drawn in the overlay grid (0: none).
        limit: Evaluate only the first rows of each split (smoke tests).
    """

    model: str
    data: Path
    splits: tuple[str, ...] = ("val",)
    out: Path | None = None
    num_actors: int = 1
    batch_size: int = 16
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    precision: str | None = None
    mask_threshold: float | None = None
    overlays: int = 8
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out) if self.out is not None else default_report_path(self.model)
        self.splits = tuple(s.strip() for s in self.splits if s.strip())
        if not self.model:
            raise ValueError("model must name a directory or an MLflow URI")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be non-empty and distinct, got {self.splits}")
        if self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("num_actors and batch_size must be >= 1")
        if self.num_cpus_per_actor <= 0 or self.num_gpus_per_actor < 0:
            raise ValueError("num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0")
        check_precision(self.precision)
        if self.mask_threshold is not None and not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.overlays < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("overlays must be >= 0 and limit >= 1")

    def artifact_path(self, suffix: str) -> Path:
        """A file beside the report: ``<out stem>_<suffix>``."""
        return self.out.with_name(f"{self.out.stem}_{suffix}")


@dataclass
class EvaluationOutputs:
    """What :func:`run_evaluation` produced."""

    report: dict[str, Any]
    report_path: Path
    plot_path: Path
    overlay_paths: dict[str, Path]
    evaluations: list[SplitEvaluation]


def run_evaluation(config: EvaluationConfig, log: Callable[[str], None] = print) -> EvaluationOutputs:
    """Evaluates every split of ``config`` and writes the report, the length plot and the overlays."""
    from pipelines.tracking.registry import resolved_model

    started = time.perf_counter()
    with resolved_model(config.model) as model_dir:  # a registry model's download is removed at the end
        return _evaluate_model(config, model_dir, started, log)


def _evaluate_model(
    config: EvaluationConfig, model_dir: Path, started: float, log: Callable[[str], None]
) -> EvaluationOutputs:
    from pipelines.tracking.registry import model_identity
    from vglaw import Predictor

    resolved_s = time.perf_counter() - started
    model = asdict(model_identity(config.model, model_dir))
    data = data_identity(config.data)
    log(f"model {model['name']} ({model['num_parameters']:,} parameters) from {config.model}")
    ensure_ray()
    began = time.perf_counter()
    by_split = evaluate_splits(
        model_dir,
        config.data,
        config.splits,
        num_actors=config.num_actors,
        batch_size=config.batch_size,
        mask_threshold=config.mask_threshold,
        num_cpus_per_actor=config.num_cpus_per_actor,
        num_gpus_per_actor=config.num_gpus_per_actor,
        precision=config.precision,
        limit=config.limit,
    )
    inference_s = time.perf_counter() - began
    evaluations = list(by_split.values())
    for evaluation in evaluations:
        m = evaluation.metrics.compute()
        scores = "  ".join(f"{k} {100 * m[k]:.2f}" for k in ("prec@0.5", "miou", "oiou") if k in m)
        log(f"{evaluation.split:<8} {evaluation.count:>7} rows  {scores}")
    log(f"inference: {sum(e.count for e in evaluations)} rows in {inference_s:.1f} s with {config.num_actors} actor(s)")
    settings = {k: v for k, v in asdict(config).items() if k not in ("extra",)} | dict(config.extra)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    report = build_report(evaluations, model, data, settings=settings | evaluations[0].settings)
    overlay_paths = {}
    if config.overlays:
        predictor = Predictor.from_pretrained(model_dir, precision=config.precision)
        for split in config.splits:
            files = split_files(config.data, split)
            if files:
                grid = overlay_examples(predictor, read_chunk(str(files[0]), 0, config.overlays), config.overlays)
                overlay_paths[split] = config.artifact_path(f"overlays_{split}.png")
                overlay_paths[split].parent.mkdir(parents=True, exist_ok=True)
                grid.save(overlay_paths[split])
    plot_path = config.artifact_path("by_length.png")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_length_breakdown(report).savefig(plot_path, dpi=110)
    report["timing"].update(
        resolve_model_s=round(resolved_s, 3),
        inference_wall_s=round(inference_s, 3),
        total_s=round(time.perf_counter() - started, 3),
    )
    report["artifacts"] = {"plot": plot_path.name, "overlays": {k: p.name for k, p in overlay_paths.items()}}
    report_path = write_report(report, config.out)
    log(f"wrote {report_path}")
    return EvaluationOutputs(report, report_path, plot_path, overlay_paths, evaluations)


def log_evaluation(
    outputs: EvaluationOutputs, experiment: str = "evaluation", run_id: str | None = None, run_name: str | None = None
) -> str:
    """Logs a finished evaluation to MLflow: params, ``<split>/<metric>`` metrics, the report, plot and overlays.

    Args:
        outputs: :func:`run_evaluation`'s result.
        experiment: Experiment of the new run (ignored with ``run_id``).
        run_id: Log into this existing run (e.g. the training run) instead of a new one.
        run_name: Name of the new run; defaults to ``eval-<model name>-<UTC time>``.

    Returns:
        The run id.
    """
    import mlflow

    from pipelines.tracking.runs import configure_mlflow, ensure_experiment, log_metrics, log_params, metric_key

    configure_mlflow()
    report = outputs.report
    if run_id is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        name = run_name or f"eval-{report['model'].get('name')}-{stamp}"
        run = mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=name)
    else:
        run = mlflow.start_run(run_id=run_id)
    with run:
        rid = run.info.run_id
        prefix = "eval" if run_id is not None else ""
        params = {"model": report["model"], "data": {k: report["data"].get(k) for k in ("dir", "dataset", "split_by")}}
        log_params({prefix: params} if prefix else params, run_id=rid)
        for split, section in report["splits"].items():
            log_metrics(section["metrics"], prefix=f"{prefix}/{split}/" if prefix else f"{split}/", run_id=rid)
            for bucket, values in section["by_length"].items():
                log_metrics(values, prefix=f"{prefix + '/' if prefix else ''}{split}/len_{bucket}/", run_id=rid)
        mlflow.set_tag(metric_key("vglaw.model_source"), str(report["model"]["source"]))
        folder = "evaluation" if run_id is not None else None
        mlflow.log_artifact(str(outputs.report_path), artifact_path=folder)
        # The plot as a figure (the UI renders it inline); the same chart as the PNG beside the report.
        mlflow.log_figure(plot_length_breakdown(report), f"{folder + '/' if folder else ''}{outputs.plot_path.name}")
        for path in outputs.overlay_paths.values():
            mlflow.log_artifact(str(path), artifact_path=folder)
    return rid
