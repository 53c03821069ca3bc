"""Exponential learning-rate decay whose state holds plain Python floats.

nerfstudio 1.1.5's ``ExponentialDecayScheduler`` computes its factor with numpy, so numpy scalars end up in
the optimizer's and scheduler's state; since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which
rejects them, and nerfstudio's own trainer / ns-eval / ns-viewer then cannot load the checkpoint. Same schedule
(linear or cosine warm-up to ``lr_init``, then log-linear decay to ``lr_final`` at ``max_steps``), computed with
``math``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Type

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from torch.optim import Optimizer, lr_scheduler


@dataclass
class FloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    """nerfstudio's exponential decay with warm-up; checkpoint-safe (plain floats)."""

    _target: Type = field(default_factory=lambda: FloatExponentialDecayScheduler)


class FloatExponentialDecayScheduler(ExponentialDecayScheduler):
    config: FloatExponentialDecaySchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        c = self.config
        lr_init = float(lr_init)
        lr_final = lr_init if c.lr_final is None else float(c.lr_final)

        def factor(step: int) -> float:
            if step < c.warmup_steps:
                frac = min(max(step / c.warmup_steps, 0.0), 1.0)
                ramp = math.sin(0.5 * math.pi * frac) if c.ramp == "cosine" else frac
                lr = c.lr_pre_warmup + (lr_init - c.lr_pre_warmup) * ramp
            else:
                span = max(c.max_steps - c.warmup_steps, 1)
                t = min(max((step - c.warmup_steps) / span, 0.0), 1.0)
                lr = math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)
            return float(lr / lr_init)

        return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
