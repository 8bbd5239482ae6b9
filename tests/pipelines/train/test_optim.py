"""The learning-rate schedules, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.train.config import OptimSection
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
