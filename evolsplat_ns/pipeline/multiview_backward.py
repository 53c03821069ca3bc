"""Exact multi-view backward with the shared graph traversed once.

The design document runs the shared extraction once and calls ``backward()`` per target view without
``retain_graph``; the second view then fails because the shared graph is already freed, and recomputing the
shared part per view multiplies its cost by the number of views. Instead:

1. cut the graph at the shared outputs: ``leaf = shared.detach().requires_grad_()``;
2. for each view, render from the leaves and backpropagate ``loss_v / T`` — this reaches the per-view
   parameters directly and accumulates ``d loss_v / d leaf`` in ``leaf.grad``; each view's graph is freed
   right after its backward, so memory holds one view's graph at a time;
3. backpropagate the accumulated leaf gradients through the shared graph once:
   ``torch.autograd.backward(shared, leaf.grad)``.

By the chain rule the parameter gradients equal those of ``sum_v loss_v / T`` from one joint backward.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, List, Optional

import torch
from torch import Tensor


def cut(shared: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Detached leaves of the shared outputs; the ones that carry gradient require grad."""
    return {k: (v.detach().requires_grad_(True) if v.requires_grad else v.detach()) for k, v in shared.items()}


def multiview_backward(
    shared: Dict[str, Tensor],
    view_loss: Callable[[Dict[str, Tensor], int], Tensor],
    num_views: int,
    scale: Optional[Callable[[Tensor], Tensor]] = None,
    no_sync: Optional[Callable[[], ContextManager]] = None,
    final_backward: Optional[Callable[[List[Tensor], List[Tensor]], None]] = None,
) -> List[float]:
    """Backpropagate ``sum_v view_loss(leaves, v) / num_views`` exactly, traversing ``shared``'s graph once.

    Args:
        shared: the outputs of the shared extraction (tensors with a graph to the shared parameters).
        view_loss: ``(leaves, v) -> scalar loss of view v`` computed from the cut leaves.
        scale: e.g. a GradScaler's ``scale`` (applied to every backward, so gradients stay consistently scaled).
        no_sync: e.g. DDP's ``no_sync``; the per-view backwards run inside it so that only the final backward
            synchronises gradients across processes.
        final_backward: ``(outputs, grads) -> None`` runs the backward through the shared graph (default
            ``torch.autograd.backward``); given, it is called even when no output carries gradient. Multi-GPU:
            :func:`evolsplat_ns.pipeline.distributed.final_backward` (the one synchronised backward).

    Returns:
        The per-view losses (unscaled, before the division by ``num_views``) as floats.
    """
    scale = scale or (lambda x: x)
    leaves = cut(shared)
    losses: List[Tensor] = []
    ctx = no_sync if no_sync is not None else contextlib.nullcontext
    with ctx():
        for v in range(num_views):
            loss = view_loss(leaves, v)
            losses.append(loss.detach())
            scale(loss / num_views).backward()
    outs, grads = [], []
    for k, t in shared.items():
        g = leaves[k].grad
        if t.requires_grad and g is not None:
            outs.append(t)
            grads.append(g)
    if final_backward is not None:
        final_backward(outs, grads)
    elif outs:
        torch.autograd.backward(outs, grads)
    return torch.stack(losses).tolist()  # one host sync for all views
