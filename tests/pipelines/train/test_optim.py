"""The learning-rate schedules, against values worked out by hand, and the plan a resumed run must keep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipelines.train.config import OptimSection, load_config
from pipelines.train.optim import build_scheduler, lr_factor


def test_step_schedule_warms_up_then_decays_at_the_named_epochs() -> None:
    optim = OptimSection(epochs=4, warmup_steps=4, decay_epochs=(2, 3), decay_factor=0.1)
    # 10 steps per epoch: steps 0-3 warm up by quarters, epoch 2 starts at step 20, epoch 3 at step 30
    factors = [lr_factor(step, 10, optim) for step in (0, 1, 3, 19, 20, 29, 30, 39)]
    assert factors == pytest.approx([0.25, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_falls_from_the_peak_to_zero_over_the_run() -> None:
    optim = OptimSection(epochs=2, warmup_steps=10, schedule="cosine", decay_epochs=())
    # 50 steps per epoch: 100 in all, 90 of them after the warm-up
    assert lr_factor(0, 50, optim) == pytest.approx(0.1)
    assert lr_factor(10, 50, optim) == pytest.approx(1.0)
    assert lr_factor(55, 50, optim) == pytest.approx(0.5)  # half way through the 90: cos(pi / 2) = 0
    assert lr_factor(40, 50, optim) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))  # 30 of 90: 0.75
    assert lr_factor(99, 50, optim) == pytest.approx(0.5 * (1 - math.cos(math.pi / 90)))
    assert lr_factor(100, 50, optim) == 0.0  # a step past the end stays at zero


def test_linear_schedule_falls_in_a_straight_line_to_zero_over_the_run() -> None:
    optim = OptimSection(epochs=2, warmup_steps=10, schedule="linear", decay_epochs=())
    # 50 steps per epoch: 100 in all, 90 of them after the warm-up
    assert lr_factor(0, 50, optim) == pytest.approx(0.1)
    assert lr_factor(10, 50, optim) == pytest.approx(1.0)
    assert lr_factor(40, 50, optim) == pytest.approx(2 / 3)  # 30 of 90 done
    assert lr_factor(55, 50, optim) == pytest.approx(0.5)
    assert lr_factor(99, 50, optim) == pytest.approx(1 / 90)
    assert lr_factor(100, 50, optim) == 0.0


def test_the_scheduler_sets_each_groups_rate_from_its_own_peak() -> None:
    optim = OptimSection(epochs=1, warmup_steps=0, schedule="cosine", decay_epochs=(), lr_backbone=1e-3, lr_head=4e-3)
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 4e-3}])
    scheduler = build_scheduler(optimizer, 4, optim)
    rates = []
    for _ in range(4):
        rates += [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    half = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # 1, 0.854, 0.5, 0.146
    assert rates == pytest.approx([peak * f for f in half for peak in (1e-3, 4e-3)])


def test_a_schedule_is_one_of_three_and_only_step_has_decay_epochs() -> None:
    with pytest.raises(ValueError, match="'step', 'cosine' or 'linear'"):
        OptimSection(schedule="exponential")
    for schedule in ("cosine", "linear"):
        with pytest.raises(ValueError, match="decay_epochs belong to the step schedule"):
            OptimSection(schedule=schedule)  # the paper's (10, 60) are the default


def test_a_run_resumes_only_on_the_plan_it_started_with(tmp_path: Path) -> None:
    from pipelines.train.driver import SetupError, check_resume_plan, training_plan
    from pipelines.train.worker import PLAN_FILE

    config = load_config(Path(__file__).resolve().parents[3] / "configs" / "synthetic.yaml")
    plan = training_plan(config, steps_per_epoch=325)
    assert plan["optim.epochs"] == 6 and plan["optim.lr_head"] == 1e-3 and plan["optim.decay_epochs"] == []
    run = tmp_path / "vglaw-synthetic"
    check_resume_plan(run, plan)  # nothing to resume
    (run / "checkpoint_2026-12-03_18-40-00.000001").mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, beside its checkpoints
    with pytest.raises(SetupError, match=r"from before runs saved their plan.*another run.name, or remove"):
        check_resume_plan(run, plan)  # a checkpoint from before plans were saved: no telling what it was
    eight = {**plan, "optim.epochs": 8}
    (run / "checkpoint_2026-12-03_18-41-00.000001").mkdir()
    (run / "checkpoint_2026-12-03_18-41-00.000001" / PLAN_FILE).write_text(json.dumps(eight))
    with pytest.raises(SetupError, match=r"another plan \(optim.epochs 8 -> 6\).*another run.name, or remove"):
        check_resume_plan(run, plan)
    check_resume_plan(run, eight)
    latest = run / "checkpoint_2026-12-03_18-42-00.000001"  # the latest checkpoint is the one that counts
    latest.mkdir()
    (latest / PLAN_FILE).write_text(json.dumps(plan))
    check_resume_plan(run, plan)
    with pytest.raises(ValueError, match=r"steps_per_epoch 325 -> 300, optim.lr_backbone 0.001 -> 0.002"):
        check_resume_plan(run, {**plan, "steps_per_epoch": 300, "optim.lr_backbone": 2e-3})


def test_jobs_train_reports_a_run_that_cannot_start_as_an_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import jobs.train
    import pipelines.train.driver as driver

    def refuse(config: object) -> None:
        raise driver.SetupError("run r in runs was started on another plan (optim.epochs 6 -> 8)")

    monkeypatch.setattr(driver, "run_training", refuse)
    assert jobs.train.main(["--config", str(Path(__file__).resolve().parents[3] / "configs" / "synthetic.yaml")]) == 2
    assert capsys.readouterr().err == "error: run r in runs was started on another plan (optim.epochs 6 -> 8)\n"
