"""The paper's optimiser and learning-rate schedule."""

from __future__ import annotations

import math

from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from pipelines.train.config import OptimSection
from vglaw.model import VGLAW


def build_optimizer(model: VGLAW, optim: OptimSection) -> AdamW:
    """AdamW with the backbones at ``lr_backbone`` and the rest (generator, heads) at ``lr_head``."""
    return AdamW(
        [
            {"params": list(model.backbone_parameters()), "lr": optim.lr_backbone, "name": "backbone"},
            {"params": list(model.head_parameters()), "lr": optim.lr_head, "name": "head"},
        ],
        weight_decay=optim.weight_decay,
    )


def lr_factor(step: int, steps_per_epoch: int, optim: OptimSection) -> float:
    """Linear warm-up over ``warmup_steps``, then the schedule's factor of the peak learning rate.

    ``step``: x``decay_factor`` at each of ``decay_epochs``. ``cosine``: half a cosine from 1 after the
    warm-up to 0 at the run's last step (``epochs * steps_per_epoch``). ``linear``: a straight line over the same.
    """
    warmup = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule in ("cosine", "linear"):
        total = max(1, optim.epochs * steps_per_epoch - optim.warmup_steps)
        done = min(1.0, max(0, step - optim.warmup_steps) / total)
        return warmup * (0.5 * (1.0 + math.cos(math.pi * done)) if optim.schedule == "cosine" else 1.0 - done)
    epoch = step // max(1, steps_per_epoch)
    decays = sum(1 for e in optim.decay_epochs if epoch >= e)
    return warmup * optim.decay_factor**decays


def build_scheduler(optimizer: AdamW, steps_per_epoch: int, optim: OptimSection) -> LambdaLR:
    """A per-step schedule (call ``scheduler.step()`` after every optimiser step)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, optim))
