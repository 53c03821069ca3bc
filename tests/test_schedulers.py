"""The learning-rate schedule equals nerfstudio's and its state loads with weights_only=True."""

import io

import pytest
import torch

from evolsplat_ns.engine.schedulers import FloatExponentialDecaySchedulerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig


@pytest.mark.parametrize("warmup,ramp", [(0, "cosine"), (50, "cosine"), (50, "linear")])
def test_same_schedule_and_loadable_state(warmup, ramp):
    def run(cfg_cls):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.Adam([p], lr=1e-3)
        sched = cfg_cls(lr_final=5e-7, warmup_steps=warmup, max_steps=300, ramp=ramp).setup().get_scheduler(opt, 1e-3)
        lrs = []
        for _ in range(320):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, opt, sched

    ours, opt, sched = run(FloatExponentialDecaySchedulerConfig)
    ref, _, _ = run(ExponentialDecaySchedulerConfig)
    assert ours == pytest.approx(ref, rel=1e-9)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # raises on numpy scalars
