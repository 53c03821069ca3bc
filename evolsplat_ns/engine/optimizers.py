"""Adam with torch's fused implementation (``evolsplat-ft``'s optimisers).

A fine-tuning step updates six parameter groups (means, colours, opacities, scales, rotations), each with its own
optimiser, as splatfacto does. torch's default Adam (``foreach``) launches about a dozen kernels per group and
spends ~0.5 ms of host time per group and step on the H200 machine (``benchmarks/profile_finetune_step.py``); the
fused one does the update of a group in one kernel. Same algorithm and hyper-parameters; results differ from the
``foreach`` path by float rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nerfstudio.engine.optimizers import AdamOptimizerConfig


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """nerfstudio's Adam config, with torch's ``fused`` flag (None: torch's default implementation)."""

    fused: Optional[bool] = True
