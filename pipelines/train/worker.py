"""What each Ray Train worker runs: build, resume, train, validate across workers, checkpoint, report."""

from __future__ import annotations

import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file
from torch import nn

from pipelines.train.config import TrainConfig
from pipelines.train.ingest import TrainingBatch, flip_decisions, started_ahead, tensors_of, to_training_batch
from pipelines.train.optim import build_optimizer, build_scheduler
from pipelines.train.validation import validate_on_worker
from vglaw import ExpressionTokenizer, create_model, save_pretrained
from vglaw.checkpoint import WEIGHTS_FILE
from vglaw.losses import GroundingLoss
from vglaw.model import VGLAW
from vglaw.precision import Precision, autocast, resolve_precision
from vglaw.transforms import normalize
from vglaw.weights import load_bert_weights, load_vit_weights

STATE_FILE = "train_state.json"
PLAN_FILE = "plan.json"  # what the run was started with: a run resumes only on its own plan (driver.py)


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # optimiser steps done in total
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed


def train_step(
    model: nn.Module,
    batch: TrainingBatch,
    criterion: GroundingLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float | None,
    precision: Precision = "fp32",
) -> dict[str, torch.Tensor]:
    """One optimiser step; returns the loss terms as device tensors (no host sync here).

    The forward pass runs under ``precision``'s autocast; the losses leave it and stay fp32.
    """
    images = normalize(batch.images)
    with autocast(precision, images.device):
        out = model(images, batch.input_ids, batch.attention_mask)
    losses = criterion(
        out.boxes,
        out.mask_logits,
        batch.boxes if out.boxes is not None else None,
        batch.masks.float() if out.mask_logits is not None else None,
        box_attention=out.box_attention,
        attention_masks=batch.masks,
        category_logits=out.category_logits,
        target_categories=batch.categories,
    )
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip is not None:
        losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: v.detach() for k, v in losses.items()}


def build_model(config: TrainConfig, vocab_size: int) -> VGLAW:
    """The model with its pretrained parts loaded (strictly) when the config names them."""
    model = create_model(config.model.preset, vocab_size=vocab_size, **config.model.overrides)
    if config.model.pretrained_vit:
        load_vit_weights(model.visual, config.model.pretrained_vit)
    if config.model.pretrained_bert:
        load_bert_weights(model.language, config.model.pretrained_bert)
    return model


def start_training(
    config: TrainConfig, vocab_size: int, steps_per_epoch: int, rank: int = 0
) -> tuple[VGLAW, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A worker's fresh state, before any resume or wrapping: its RNGs seeded, then model, optimiser and schedule.

    NOTE: the order matters: seeding first makes the initial weights a function of ``run.seed + rank``.
    """
    _seed_everything(config.run.seed + rank)
    model = build_model(config, vocab_size)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, steps_per_epoch, config.optim)
    return model, optimizer, scheduler


def say(line: str) -> None:
    """One line of the run's output, once.

    NOTE: not ``print``: Ray Train 2.60 patches ``print`` in its workers to log the line *and*, because Ray
    replaces ``sys.stdout`` in every worker process, to print it too, so the driver showed each line twice.
    """
    sys.stdout.write(f"[vglaw-train] {line}\n")
    sys.stdout.flush()


def _quiet_report_logs() -> None:
    """Ray Train 2.60 logs every ``report`` with its whole metrics dict, from every rank, at INFO; the epoch line
    says what matters once, so its log of reports shows warnings only."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # that module's logger is named by its file


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train entry point. ``loop_config`` holds the resolved config, the vocab and the plan."""
    _quiet_report_logs()
    config = TrainConfig.from_dict(loop_config["config"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    tokenizer = ExpressionTokenizer(loop_config["vocab"], max_tokens=loop_config["max_tokens"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model, optimizer, scheduler = start_training(config, tokenizer.vocab_size, steps_per_epoch, rank)
    position = Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            position = _load_training_state(Path(directory), model, optimizer, scheduler, rank)
        if rank == 0:
            say(f"resuming from step {position.step} (epoch {position.epoch + 1}, batch {position.batch_in_epoch})")
    # NOTE: wrapping happens here and only here: device placement, then DDP (prepare_model), then compile.
    device = ray.train.torch.get_device()
    ddp_model = ray.train.torch.prepare_model(model)
    if config.model.compile:
        ddp_model = torch.compile(ddp_model)
    precision = resolve_precision(config.run.precision, device)
    criterion = GroundingLoss(config.loss)
    logger = _RankZeroLogger(loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri"), rank)
    nodes = _worker_nodes(world)
    logger.say(f"{world} workers on {len(set(nodes))} node(s), {precision}, compile {config.model.compile}")
    logger.tag("ray.worker_nodes", json.dumps(nodes))

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    total_steps = steps_per_epoch * config.optim.epochs

    def epoch_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        batches = train_shard.iter_torch_batches(
            batch_size=config.batch_per_worker,
            device="cpu",  # to_training_batch moves each batch, after picking its tokens on the host
            pin_memory=device.type == "cuda",
            prefetch_batches=config.data.prefetch_batches,
            drop_last=True,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=_seed_of(config.run.seed, epoch, rank),
            # JPEG bytes differ in length per row: collated as a list, decoded on the device by to_training_batch
            collate_fn=tensors_of if config.data.image_decode == "device" else None,
        )
        return started_ahead(batches)

    # The first epoch's stream fills during the step-0 validation, each later one during the validation before it.
    upcoming = epoch_batches(position.epoch) if position.epoch < config.optim.epochs else iter(())
    if position.step == 0:
        metrics = validate_on_worker(model, tokenizer, val_data, rank, world, config.batch_per_worker, precision)
        logger.log({f"val/{k}": v for k, v in metrics.items()}, step=0)
        logger.say(f"step 0: val {_fmt(metrics)}")
        ray.train.report({"epoch": 0, "step": 0, **{f"val/{k}": v for k, v in metrics.items()}})

    started = time.perf_counter()
    steps_at_start = position.step
    progress = _Progress(
        rank == 0, loop_config.get("interactive", False), config.run.progress_every_s, config.optim.epochs, total_steps
    )
    while position.epoch < config.optim.epochs:
        epoch_start, epoch_images = time.perf_counter(), 0
        running: dict[str, float] = {}
        wait = _DataWait()
        progress.start_epoch(position.epoch, steps_per_epoch, position.batch_in_epoch)
        batches = upcoming
        for index, (arrays, waited) in enumerate(_timed(batches)):
            if index < position.batch_in_epoch or index >= steps_per_epoch:
                continue  # already trained on before a restart, or beyond the planned steps
            step_start = time.perf_counter()
            flips = flip_decisions(
                config.run.seed, position.epoch, arrays["ref_id"], arrays["sent_id"], config.data.hflip_prob
            )
            batch = to_training_batch(arrays, flips, device, full_tokens=config.model.compile)
            losses = train_step(ddp_model, batch, criterion, optimizer, scheduler, config.optim.grad_clip, precision)
            position.step += 1
            position.batch_in_epoch = index + 1
            epoch_images += len(batch) * world
            wait.add(waited, time.perf_counter() - step_start)
            progress.step(position.step, losses["loss"], epoch_images / max(time.perf_counter() - epoch_start, 1e-9))
            if position.step % config.run.log_every_steps == 0 or position.batch_in_epoch == steps_per_epoch:
                values = {k: float(v) for k, v in losses.items()}
                for k, v in values.items():
                    running[k] = v
                values["lr/backbone"], values["lr/head"] = (g["lr"] for g in optimizer.param_groups)
                values["images_per_s"] = len(batch) * world / max(time.perf_counter() - step_start, 1e-9)
                values["data_wait_fraction"] = wait.interval_fraction()
                logger.log({f"train/{k}": v for k, v in values.items()}, step=position.step)
            every = config.run.checkpoint_every_steps
            if every and position.step % every == 0 and position.batch_in_epoch < steps_per_epoch:
                _report_with_checkpoint(model, tokenizer, optimizer, scheduler, position, rank, {}, loop_config["plan"])
        progress.end_epoch()
        position.epoch += 1
        position.batch_in_epoch = 0
        if position.epoch < config.optim.epochs:
            # NOTE: the next epoch's stream fills while this one is validated; the split starts its next epoch
            # once every worker asks for it, which they all do here.
            upcoming = epoch_batches(position.epoch)
        val = validate_on_worker(model, tokenizer, val_data, rank, world, config.batch_per_worker, precision)
        elapsed = time.perf_counter() - epoch_start
        throughput = epoch_images / max(elapsed, 1e-9)
        done = position.step - steps_at_start
        eta = (time.perf_counter() - started) / max(done, 1) * (total_steps - position.step)
        epoch_metrics = {f"val/{k}": v for k, v in val.items()} | {
            "epoch": position.epoch,
            "step": position.step,
            "epoch_images_per_s": throughput,
            "train/epoch_data_wait_fraction": wait.fraction(),
            **{f"train/{k}": v for k, v in running.items()},
        }
        logger.log({k: v for k, v in epoch_metrics.items() if k not in ("epoch", "step")}, step=position.step)
        logger.say(
            f"epoch {position.epoch}/{config.optim.epochs} step {position.step}/{total_steps} "
            f"loss {running.get('loss', float('nan')):.4f} val {_fmt(val)} {throughput:.1f} img/s "
            f"data wait {wait.fraction():.0%} ETA {eta:.0f}s"
        )
        if rank == 0 and config.run.overlays:
            logger.log_overlays(model, tokenizer, val_data, config.run.overlays, position.epoch)
        _report_with_checkpoint(
            model, tokenizer, optimizer, scheduler, position, rank, epoch_metrics, loop_config["plan"]
        )


def _report_with_checkpoint(
    model: VGLAW,
    tokenizer: ExpressionTokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    rank: int,
    metrics: dict[str, Any],
    plan: dict[str, Any],
) -> None:
    """Every rank writes its RNG state; rank 0 also writes a loadable model directory, the optimiser and the plan."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
        if rank == 0:
            save_pretrained(model, tokenizer, directory)  # the checkpoint is itself a model directory
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "optim.pt"
            )
            (directory / STATE_FILE).write_text(json.dumps(position.__dict__))
            (directory / PLAN_FILE).write_text(json.dumps(plan))
        report = {"epoch": position.epoch, "step": position.step, **metrics}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _load_training_state(
    directory: Path,
    model: VGLAW,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> Position:
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    state = torch.load(directory / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_path = directory / f"rng_rank{rank}.pt"
    if rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=False))  # our own file: python/numpy RNG objects
    return Position(**json.loads((directory / STATE_FILE).read_text()))


BAR_TEXT_EVERY_S = 1.0  # how often the bar's loss and images/s are refreshed


class _Progress:
    """Rank 0's progress through an epoch: a bar in the driver's terminal (Ray's tqdm, drawn by the driver) with
    step, loss and images/s, and its ETA; when the output goes to a log or ``ray job logs``, a plain line every
    ``every_s`` seconds instead. The other ranks show nothing."""

    def __init__(self, active: bool, interactive: bool, every_s: float, epochs: int, total_steps: int) -> None:
        self.active, self.interactive, self.every_s = active, interactive, every_s
        self.epochs, self.total_steps = epochs, total_steps
        self.bar: Any = None
        self.epoch = 0
        self.started = self.last_line = time.monotonic()
        self.steps_done = 0

    def start_epoch(self, epoch: int, steps: int, done: int) -> None:
        if not self.active:
            return
        self.epoch, self.started, self.last_line, self.steps_done = epoch, time.monotonic(), time.monotonic(), 0
        if self.interactive:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step")
            self.bar.update(done)

    def step(self, step: int, loss: torch.Tensor, images_per_s: float) -> None:
        """One step done. The loss is read (a device sync) only when a line or the bar's text is due."""
        if not self.active:
            return
        self.steps_done += 1
        if self.bar is not None:
            self.bar.update(1)
        now = time.monotonic()
        if now - self.last_line < (BAR_TEXT_EVERY_S if self.bar is not None else self.every_s):
            return
        self.last_line = now
        if self.bar is not None:
            self.bar.set_description(
                f"epoch {self.epoch + 1}/{self.epochs} loss {float(loss):.4f} {images_per_s:.1f} img/s"
            )
            return
        eta = (now - self.started) / self.steps_done * (self.total_steps - step)
        say(
            f"epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total_steps} loss {float(loss):.4f} "
            f"{images_per_s:.1f} img/s ETA {eta:.0f}s"
        )

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _timed(batches: Iterable[Any]) -> Iterator[tuple[Any, float]]:
    """Each item of ``batches`` with the seconds spent blocked waiting for it."""
    iterator = iter(batches)
    while True:
        began = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - began


class _DataWait:
    """Time blocked on the next batch against time in the step, for the epoch and since the last log line."""

    def __init__(self) -> None:
        self.waited = self.stepped = 0.0
        self._mark = (0.0, 0.0)

    def add(self, waited: float, stepped: float) -> None:
        self.waited += waited
        self.stepped += stepped

    def fraction(self) -> float:
        """Share of the epoch's wall time so far spent waiting for data."""
        return self.waited / max(self.waited + self.stepped, 1e-9)

    def interval_fraction(self) -> float:
        """The same share since the previous call."""
        waited, stepped = self.waited - self._mark[0], self.stepped - self._mark[1]
        self._mark = (self.waited, self.stepped)
        return waited / max(waited + stepped, 1e-9)


def _seed_of(*parts: int) -> int:
    """A 32-bit seed derived from ``parts`` (Ray Data's shuffle takes a plain integer)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, in rank order (a collective: every rank calls it)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fmt(metrics: dict[str, float]) -> str:
    keys = ("prec@0.5", "miou", "oiou")
    return " ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


OVERLAYS_KEY = "val_overlays"  # the MLflow image key of the per-epoch validation overlays


class _RankZeroLogger:
    """MLflow logging and progress lines from rank 0 only; the other ranks stay silent."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, rank: int) -> None:
        self.active = rank == 0
        self.client = None
        self.run_id = run_id
        if self.active and run_id is not None:
            import mlflow
            from mlflow.tracking import MlflowClient

            mlflow.set_tracking_uri(tracking_uri)  # this worker's process: where pipelines.tracking logs
            self.client = MlflowClient(tracking_uri)

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    def say(self, line: str) -> None:
        if self.active:
            say(line)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from pipelines.tracking.runs import log_metrics

        log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=step, run_id=self.run_id)

    def log_overlays(self, model: VGLAW, tokenizer: ExpressionTokenizer, val_data: Any, count: int, epoch: int) -> None:
        if self.client is None:
            return
        from pipelines.train.validation import overlay_figure

        # A step-indexed image: the run page's image view walks through the epochs with its step slider.
        grid = overlay_figure(model, tokenizer, val_data, count)
        self.client.log_image(self.run_id, grid, key=OVERLAYS_KEY, step=epoch)
