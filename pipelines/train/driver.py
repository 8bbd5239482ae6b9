"""The training stage's driver: plan the run, start Ray Train's TorchTrainer, record everything in MLflow."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from ray.data import DataContext, RandomSeedConfig
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.data.manifest import read_manifest
from pipelines.data.parquet import read_split, read_split_table
from pipelines.data.schema import EVAL_COLUMNS, TRAINING_COLUMNS
from pipelines.runtime import ensure_ray
from pipelines.train.config import TrainConfig
from pipelines.train.ingest import encode_training_rows
from pipelines.train.worker import PLAN_FILE, STATE_FILE, train_loop_per_worker
from vglaw import ExpressionTokenizer
from vglaw.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from vglaw.tokenizer import VOCAB_FILE


@dataclass
class TrainingSummary:
    """What a finished run produced."""

    run_name: str
    steps: int
    epochs: int
    model_dir: Path
    metrics: dict[str, float]
    mlflow_run_id: str | None
    registered_version: str | None


class SetupError(ValueError):
    """A run that cannot start as configured, found before any training; the message says what to change."""


def plan_steps_per_epoch(config: TrainConfig, train_rows: int) -> int:
    """Full global batches per epoch (capped by ``optim.max_steps_per_epoch``)."""
    steps = train_rows // config.optim.global_batch_size
    if config.optim.max_steps_per_epoch is not None:
        steps = min(steps, config.optim.max_steps_per_epoch)
    if steps <= 0:
        raise SetupError(
            f"the training split has {train_rows} rows, fewer than one global batch "
            f"({config.optim.global_batch_size}); lower optim.global_batch_size"
        )
    return steps


def build_tokenizer(config: TrainConfig, max_tokens: int) -> ExpressionTokenizer:
    """A local BERT's vocab when one is configured, else WordPiece trained on the training expressions."""
    if config.model.pretrained_bert:
        return ExpressionTokenizer.from_vocab_file(config.model.pretrained_bert, max_tokens=max_tokens)
    table = read_split_table(config.data.path, config.data.train_split, columns=["expression"])
    return ExpressionTokenizer.train(
        table.column("expression").to_pylist(), vocab_size=config.model.vocab_size, max_tokens=max_tokens
    )


def _check_categories(config: TrainConfig, categories: int) -> None:
    """Every training row's category id must be a class of the model's category classifier."""
    ids = read_split_table(config.data.path, config.data.train_split, columns=["category_id"]).column("category_id")
    low, high = pc.min_max(ids).values()
    if len(ids) and (low.as_py() < 0 or high.as_py() >= categories):
        raise SetupError(
            f"category ids in {config.data.path} run from {low.as_py()} to {high.as_py()}, but the model's "
            f"category classifier has {categories} classes; set model.overrides.categories to at least "
            f"{high.as_py() + 1}"
        )


def run_training(config: TrainConfig) -> TrainingSummary:
    """Train ``config`` to the end (resuming a run of the same name), then log and register the model."""
    # NOTE: the training workers hold their CPUs for the whole run and Ray Data's read and decode tasks need
    # CPUs too: a local instance advertises two logical CPUs beyond the workers' so the data side can run.
    ensure_ray(max(os.cpu_count() or 1, math.ceil(config.run.num_workers * config.run.cpus_per_worker) + 2))
    manifest = read_manifest(config.data.path)
    for split in (config.data.train_split, config.data.val_split):
        if split not in manifest["splits"]:
            raise SetupError(f"split '{split}' is not in {config.data.path}: {sorted(manifest['splits'])}")
    model_config = config.model.vglaw_config()
    if manifest["image_size"] != model_config.vision.image_size:
        raise SetupError(
            f"the data was letterboxed to {manifest['image_size']} px but model '{config.model.preset}' takes "
            f"{model_config.vision.image_size}; preprocess with --image-size {model_config.vision.image_size}"
        )
    if model_config.head.categories:
        _check_categories(config, model_config.head.categories)
    if config.data.image_decode == "device" and manifest["image_format"] != "jpeg":
        raise SetupError(
            f"data.image_decode=device decodes JPEG canvases, {config.data.path} holds {manifest['image_format']}; "
            "preprocess with --image-format jpeg or set data.image_decode=ingest"
        )
    steps_per_epoch = plan_steps_per_epoch(config, manifest["splits"][config.data.train_split]["rows"])
    tokenizer = build_tokenizer(config, model_config.text.max_tokens)
    print(
        f"[vglaw-train] {config.run.name}: {config.optim.epochs} epochs x {steps_per_epoch} steps of "
        f"{config.optim.global_batch_size} on {config.run.num_workers} workers; vocab {tokenizer.vocab_size}",
        flush=True,
    )

    plan = training_plan(config, steps_per_epoch)
    check_resume_plan(config.run.storage_dir / config.run.name, plan)

    tracker = _Tracker(config, manifest) if config.run.mlflow else None
    # The run prints one progress line per epoch; Ray Data's per-operator bars would bury them.
    DataContext.get_current().enable_progress_bars = False
    train = read_split(config.data.path, config.data.train_split, columns=TRAINING_COLUMNS)
    # NOTE: one block order fixed by the seed, streamed in that order, so that each worker receives the same rows
    # in the same order every epoch and after every restart; the per-epoch shuffle is the workers' local one,
    # seeded by (seed, epoch, rank). A resumed run thus sees exactly the batches the uninterrupted run would.
    block_seed = RandomSeedConfig(seed=config.run.seed, reseed_after_execution=False)
    # Exactly steps_per_epoch global batches per epoch: every worker reports equally often.
    train = train.randomize_block_order(seed=block_seed).limit(steps_per_epoch * config.optim.global_batch_size)
    # The per-row decode and tokenisation run here, in Ray Data tasks, not on the workers' step thread.
    train = train.map_batches(
        encode_training_rows,
        fn_kwargs={
            "vocab": tokenizer.vocab,
            "max_tokens": tokenizer.max_tokens,
            "decode_images": config.data.image_decode == "ingest",
        },
        batch_size=config.batch_per_worker,
        num_cpus=config.data.ingest_cpus,
    )
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True  # the splitter then deals blocks to workers by row count, not by timing
    val = read_split(config.data.path, config.data.val_split, columns=list(EVAL_COLUMNS))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "vocab": tokenizer.vocab,
            "max_tokens": tokenizer.max_tokens,
            "steps_per_epoch": steps_per_epoch,
            "plan": plan,
            "mlflow_run_id": tracker.run_id if tracker else None,
            # A progress bar when this process writes to a terminal, plain lines for logs and ray job submit.
            "interactive": sys.stdout.isatty(),
            "tracking_uri": tracker.uri if tracker else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": config.run.cpus_per_worker, **config.run.worker_resources},
            placement_strategy=config.run.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=str(config.run.storage_dir),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.num_checkpoints_to_keep),
        ),
        datasets={"train": train, "val": val},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": ordered}),
    )
    try:
        result = trainer.fit()
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {config.run.name} finished without a checkpoint")
    model_dir = config.run.storage_dir / config.run.name / "model"
    with result.checkpoint.as_directory() as directory:
        _copy_model_dir(Path(directory), model_dir)
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    version = tracker.finish(model_dir, metrics, int(state["step"])) if tracker else None
    print(f"[vglaw-train] done: step {state['step']}, model in {model_dir}", flush=True)
    return TrainingSummary(
        run_name=config.run.name,
        steps=int(state["step"]),
        epochs=int(state["epoch"]),
        model_dir=model_dir,
        metrics=metrics,
        mlflow_run_id=tracker.run_id if tracker else None,
        registered_version=version,
    )


def training_plan(config: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """The settings that fix a run's steps, batches and learning rates: a resumed run must keep them all."""
    optim = config.optim
    return {
        "optim.epochs": optim.epochs,
        "steps_per_epoch": steps_per_epoch,
        "optim.global_batch_size": optim.global_batch_size,
        "optim.schedule": optim.schedule,
        "optim.warmup_steps": optim.warmup_steps,
        "optim.decay_epochs": list(optim.decay_epochs),
        "optim.decay_factor": optim.decay_factor,
        "optim.lr_backbone": optim.lr_backbone,
        "optim.lr_head": optim.lr_head,
        "run.seed": config.run.seed,
    }


def check_resume_plan(run_dir: Path, plan: dict[str, Any]) -> None:
    """Refuses to resume ``run_dir`` (a run of the same name) when its latest checkpoint was made on another plan.

    NOTE: a resumed run takes its step and optimiser from the checkpoint and its schedule from the config: with,
    say, more epochs than it started with, its learning rate would jump back up from where it had decayed to.
    A checkpoint written before runs saved their plan cannot be checked, so it is not resumed either.
    """
    # Ray names them by time, so the last is the latest; beside them lies its checkpoint_manager_snapshot.json
    checkpoints = sorted(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    if not checkpoints:
        return
    advice = f"give this one another run.name, or remove {run_dir} to start it over"
    if not (checkpoints[-1] / PLAN_FILE).is_file():
        raise SetupError(
            f"run {run_dir.name} in {run_dir.parent} has a checkpoint from before runs saved their plan "
            f"({PLAN_FILE}), so whether this config continues it cannot be checked: {advice}"
        )
    saved = json.loads((checkpoints[-1] / PLAN_FILE).read_text())
    changed = {key: (saved.get(key), value) for key, value in plan.items() if saved.get(key) != value}
    if changed:
        differences = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        raise SetupError(
            f"run {run_dir.name} in {run_dir.parent} was started on another plan ({differences}); a run resumes "
            f"only on its own plan: {advice}"
        )


def _copy_model_dir(checkpoint: Path, target: Path) -> None:
    """Keep the checkpoint's model files (not the optimiser) as the run's model directory, atomically."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE):
        shutil.copy2(checkpoint / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


MODEL_STEP_TAG = "vglaw.model_step"  # the step whose weights the run's logged model holds
MODEL_VERSION_TAG = "vglaw.model_version"  # its registered version ("" when not registered)


class _Tracker:
    """The run's MLflow record, kept by the driver: one run per run name, reused on resume.

    The run is the driver's active run while training runs: MLflow's context tags (git commit, source, user) on
    a new run, system metrics sampled meanwhile, and the dataset logged as its input. The workers log metrics and
    overlays into it by id.
    """

    def __init__(self, config: TrainConfig, manifest: dict[str, Any]) -> None:
        import mlflow

        from pipelines.tracking import runs

        self.config = config
        self.uri = runs.configure_mlflow()
        if mlflow.active_run() is not None:  # e.g. a caller's run left open: this run is its own
            mlflow.end_run()
        run, resumed = runs.start_named_run(config.run.experiment, config.run.name, system_metrics=True)
        self.run_id = run.info.run_id
        if not resumed:
            runs.log_params(config.to_dict(), run_id=self.run_id)
            runs.log_dataset_input(config.data.path, manifest, context="training")
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
                (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
                mlflow.log_artifact(str(Path(tmp) / "config.json"))
                mlflow.log_artifact(str(Path(tmp) / "manifest.json"), artifact_path="data")
        else:
            print(f"[vglaw-train] resuming MLflow run {self.run_id} ({config.run.name})", flush=True)

    def finish(self, model_dir: Path, metrics: dict[str, float], step: int) -> str | None:
        """Logs the model, links the final validation metrics to it (the model's page shows them), registers it,
        and ends the run. A rerun that trained nothing (the run's model was logged at this step) logs and
        registers nothing new and returns the version registered then."""
        import mlflow

        from pipelines.tracking import registry, runs

        tags = mlflow.get_run(self.run_id).data.tags
        if tags.get(MODEL_STEP_TAG) == str(step):
            print(f"[vglaw-train] nothing trained since step {step}: its model stays the run's model", flush=True)
            mlflow.end_run()
            return tags.get(MODEL_VERSION_TAG) or None
        name = self.config.run.registered_model_name
        logged = registry.log_vglaw_model(model_dir, registered_model_name=name, run_id=self.run_id)
        validation = {k: v for k, v in metrics.items() if k.startswith("val/") and math.isfinite(v)}
        if logged.model_id and validation:
            runs.log_metrics(validation, step=step, run_id=self.run_id, model_id=logged.model_id)
        score = metrics.get("val/prec@0.5", metrics.get("val/miou"))
        if name and logged.version is not None and score is not None:
            registry.set_alias_if_best(name, logged.version, "val_score", score)
        mlflow.set_tags({MODEL_STEP_TAG: str(step), MODEL_VERSION_TAG: logged.version or ""})
        mlflow.end_run()
        return logged.version

    def fail(self) -> None:
        """Ends the run as failed (a rerun of the same name resumes it)."""
        import mlflow

        mlflow.end_run(status="FAILED")
