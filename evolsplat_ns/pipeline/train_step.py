"""The train step of a feed-forward model: one segment batch -> gradients on the parameters, or none.

Shared extraction once; every target view rendered from the cut leaves and its loss / T backpropagated into them;
the accumulated leaf gradients backpropagated through the shared graph once
(:mod:`evolsplat_ns.pipeline.multiview_backward`). A non-finite loss or gradient (with ``skip_non_finite``) clears
every gradient and puts back what the forward pass changed besides the weights (BatchNorm statistics, the segment's
offset cache), so the optimizers' step leaves weights and moments unchanged.

Multi-GPU is handed in as hooks (:class:`DistributedHooks`); this module knows neither the pipeline nor the viewer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.pipeline.multiview_backward import multiview_backward

logger = logging.getLogger(__name__)


@dataclass
class DistributedHooks:
    """How a multi-GPU step differs (:mod:`evolsplat_ns.pipeline.distributed`): ``no_sync`` and ``final_backward``
    make the step's gradient all-reduce happen once, on the last backward; ``reduce_status(finite, loss, device)``
    agrees on skipping and averages the logged loss over the ranks; ``after_step()`` syncs the replicas' buffers."""

    no_sync: Callable[[], Any]
    final_backward: Callable[..., Any]
    reduce_status: Callable[[bool, float, torch.device], Tuple[bool, float]]
    after_step: Callable[[], None]


class TrainStep:
    """``step(model, batch, step) -> (metrics, shared)``; counts extractions and skipped steps."""

    def __init__(self, skip_non_finite: bool = True) -> None:
        self.skip_non_finite = skip_non_finite
        self.skipped_steps = 0
        self.shared_extractions = 0

    def __call__(self, model, activate: Callable[[], Any], batch: SegmentBatch, step: int, grad_scaler=None,
                 ddp: Optional[DistributedHooks] = None):
        """Train ``model`` (the unwrapped nerfstudio Model) on ``batch``; ``activate()`` makes the batch's segment the
        model's active one. Returns the step's metrics (``loss_value``: the loss the trainer logs, 0 when skipped)
        and the shared state of the extraction (with its graph; detach it to keep it)."""
        model.train()
        model.step = step
        activate()
        before = forward_side_effects(model) if self.skip_non_finite else None
        shared = model.extract_shared(batch)
        self.shared_extractions += 1
        tgt = batch.target
        T, H, W = len(tgt), tgt.height, tgt.width
        parts: List[Dict[str, torch.Tensor]] = []

        def view_loss(leaves, v):  # rendered from the state with its gradient fields cut (leaves)
            out = model.render_view(shared.with_outputs(leaves), tgt.extrinsics[v], tgt.intrinsics[v], H, W)
            ld = model.view_loss(out, tgt.image[v], step)
            parts.append({k: x.detach() for k, x in ld.items()})  # read back once, after all views
            return sum(ld.values())

        scaler = grad_scaler if (grad_scaler is not None and grad_scaler.is_enabled()) else None
        losses = multiview_backward(shared.outputs(), view_loss, T, scale=scaler.scale if scaler else None,
                                    no_sync=ddp.no_sync if ddp is not None else None,
                                    final_backward=ddp.final_backward if ddp is not None else None)
        total = sum(losses) / T
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = math.isfinite(total) and (
            not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))  # one host sync
        total_all = total
        if ddp is not None:  # every rank skips, or none does; the logged loss is the mean over the ranks' batches
            finite, total_all = ddp.reduce_status(finite, total, tgt.image.device)
        if not finite and self.skip_non_finite:
            for p in model.parameters():
                p.grad = None  # Adam skips parameters without gradient: weights and moments stay unchanged
            restore_forward_side_effects(model, before)
            self.skipped_steps += 1
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", step, self.skipped_steps)
        if ddp is not None:
            ddp.after_step()
        metrics: Dict[str, Any] = {
            "loss_value": total_all if finite else 0.0,
            "view_loss_mean": total,
            "view_loss_min": min(losses),
            "view_loss_max": max(losses),
            "num_gaussians": shared.num_gaussians,
            "skipped_steps": self.skipped_steps,
        }
        for key in parts[0]:
            metrics[key] = float(sum(p[key] for p in parts if key in p)) / T
        return metrics, shared


def forward_side_effects(model) -> Dict[str, Any]:
    """What a training forward pass changes besides the weights: BatchNorm running statistics, and the active
    segment's offset cache (written during extraction). A skipped step puts them back, so that a NaN forward
    cannot poison evaluation (running statistics) or every later step on that segment (offsets)."""
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()
            if "running_" in n or n.endswith("num_batches_tracked")}
    offset = model.segments.current.get("offset") if model.segments.current_key is not None else None
    return {"buffers": bufs, "offset": offset.detach().clone() if offset is not None else None}


@torch.no_grad()
def restore_forward_side_effects(model, before: Optional[Dict[str, Any]]) -> None:
    if before is None:
        return
    live = dict(model.named_buffers())
    for n, v in before["buffers"].items():
        live[n].copy_(v)
    if before["offset"] is not None and model.segments.current_key is not None:
        model.segments.current["offset"].copy_(before["offset"])
