"""Multi-GPU training inside nerfstudio's distributed data parallel (``ns-train ... --machine.num-devices N``).

nerfstudio starts one process per GPU, initialises ``torch.distributed`` (NCCL; gloo on the CPU), builds the
pipeline in every process with ``world_size`` / ``local_rank``, steps the optimizers in every process and writes
checkpoints from rank 0 only. :class:`~evolsplat_ns.pipeline.pipeline.EvolSplatPipeline` adds what the
feed-forward train step needs on top, with the helpers of this module:

**One gradient all-reduce per step, on the final backward.** The train step backpropagates every target view into
the cut leaves of the shared extraction, then the accumulated leaf gradients through the shared graph once
(:mod:`~evolsplat_ns.pipeline.multiview_backward`). The model is wrapped in ``DistributedDataParallel``
(``find_unused_parameters=True``, as nerfstudio does); the shared extraction and the per-view backwards run on the
unwrapped model inside ``no_sync()`` (gradients accumulate locally), then the shared outputs pass through DDP's
``forward`` unchanged (:func:`final_backward`): that is what arms DDP's reducer for exactly the next backward, the
one through the shared graph. DDP then all-reduces every parameter's gradient once: parameters reached by that
backward through their autograd hooks, the others (the per-view colour head and background, whose gradients were
accumulated under ``no_sync``) as "unused in this forward", with their accumulated gradient; a parameter that no
rank used keeps no gradient, as in a single process.

**Gradient convention.** A rank's loss is the mean over its T target views of the per-view loss (one segment
batch); DDP averages gradients over the W ranks. So a step follows the gradient of
``(1/W) sum_r (1/T) sum_v loss_{r,v}``, the mean over all W*T views, which is exactly a single-process step over
the union of the W batches with the batches' losses averaged (every rank has the same T: it is fixed by the
config). The learning rate is not scaled with W.

**Identical replicas.** DDP broadcasts rank 0's weights when it wraps the model, and its persistent buffers
(BatchNorm running statistics) at every synchronised forward; the skip-on-non-finite decision is taken jointly
(:func:`reduce_step_status`), so no rank steps while another skips.

**Per-segment state and resuming.** Every training segment has one owner rank for the whole run
(:class:`~evolsplat_ns.data.scheduler.SegmentScheduler`), so its offset cache only ever lives there. At the steps
where the trainer saves, every rank's resumable state (scheduler position, segment store) is gathered to rank 0
over a gloo group (:func:`gather_to_rank0`) and written in the pipeline's ``_extra_state``; on resume every rank
takes its own (:func:`merge_segment_states` when the number of processes changed).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

logger = logging.getLogger(__name__)

RANKS_FORMAT = "evolsplat-ddp-ranks"
RANKS_VERSION = 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_rank(local_rank: int, world_size: int) -> Tuple[int, int]:
    """(global rank, world size) of this process. nerfstudio hands the pipeline its *local* rank; with several
    machines the global rank (what segment ownership must use) comes from ``torch.distributed``."""
    if world_size <= 1:
        return 0, 1
    if not is_distributed():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised: start multi-GPU "
                           f"training with ns-train ... --machine.num-devices N")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"world_size={world_size} but the process group has {dist.get_world_size()} processes")
    return dist.get_rank(), world_size


def wrap_ddp(model: nn.Module, device: Any) -> DDP:
    """``model`` (already on ``device``) in DistributedDataParallel; on CUDA it also becomes this process's current
    device, so that collectives without an explicit device (barriers, object gathers) use the right GPU."""
    # Non-persistent buffers (the background's Fibonacci dome, device probes) are constants every rank builds
    # identically; keep them out of DDP's buffer broadcasts (the dome alone is ~6 MB at the default size).
    derived = [f"{name}.{b}" if name else b for name, mod in model.named_modules()
               for b in getattr(mod, "_non_persistent_buffers_set", ())]
    DDP._set_params_and_buffers_to_ignore_for_model(model, derived)
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        return DDP(model, device_ids=[index], find_unused_parameters=True, broadcast_buffers=False)
    # CPU (gloo): DDP takes no device ids. broadcast_buffers=False: DDP would overwrite the BatchNorm statistics in
    # place at its forward, which here comes after the shared extraction whose BatchNorm backward (on some torch
    # versions) saved them -> "modified by an inplace operation"; sync_buffers() does it after the backward instead.
    return DDP(model, find_unused_parameters=True, broadcast_buffers=False)


def sync_buffers(ddp: DDP) -> None:
    """Broadcast rank 0's buffers (BatchNorm statistics) to every rank, as DDP's ``broadcast_buffers`` does at its
    forward, but at the end of a train step, once no backward can need the old values. Collective."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    for name, b in ddp.module.named_buffers():
        if name not in ignored and b is not None and b.numel() > 0:
            dist.broadcast(b.data, src=0)


def object_group() -> Optional[Any]:
    """A gloo process group for pickled objects (checkpoint state), so that NCCL never carries them; ``None``
    (the default group) when the default backend is gloo already. Collective: every rank must call it."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def final_backward(ddp: DDP) -> Callable[[List[Tensor], List[Tensor]], None]:
    """The last backward of a train step, through DDP: ``run(outs, grads)`` passes ``outs`` through DDP's forward
    (the model's ``forward(ddp_sync=...)`` returns them unchanged) and backpropagates ``grads`` from what comes out.

    DDP decides at ``forward`` time whether the next backward synchronises, and (``find_unused_parameters``) which
    parameters that backward will reach; all others are reduced with the gradient they already hold. When nothing
    carries gradient a zero through one parameter still runs the (synchronising) backward, so that no rank is left
    waiting in the all-reduce.
    """

    def run(outs: List[Tensor], grads: List[Tensor]) -> None:
        if not outs:
            p = next(p for p in ddp.module.parameters() if p.requires_grad and p.numel() > 0)
            outs = [(p.reshape(-1)[:1] * 0.0).sum()]
            grads = [torch.ones((), device=p.device, dtype=p.dtype)]
        passed = ddp(ddp_sync=list(outs))
        torch.autograd.backward(list(passed), list(grads))

    return run


def train_step_hooks(ddp: DDP) -> "DistributedHooks":
    """What the train step does differently in a multi-GPU run (:class:`~evolsplat_ns.pipeline.train_step.
    DistributedHooks`): one gradient all-reduce on the last backward, a joint skip decision, buffers synced after."""
    from evolsplat_ns.pipeline.train_step import DistributedHooks

    return DistributedHooks(no_sync=ddp.no_sync, final_backward=final_backward(ddp), reduce_status=reduce_step_status,
                            after_step=lambda: sync_buffers(ddp))


def reduce_step_status(finite: bool, loss: float, device: Any) -> Tuple[bool, float]:
    """Joint decision and logging value over all ranks: (every rank finite, mean loss over the ranks)."""
    t = torch.tensor([0.0 if finite else 1.0, float(loss) if finite else 0.0], dtype=torch.float64,
                     device=torch.device(device))
    dist.all_reduce(t)
    bad, total = t.tolist()
    return bad == 0.0, total / dist.get_world_size()


def gather_to_rank0(obj: Any, group: Optional[Any] = None) -> Optional[List[Any]]:
    """Every rank's ``obj`` (picklable; CPU tensors) as a list on rank 0, ``None`` elsewhere. Collective."""
    world = dist.get_world_size()
    out: Optional[List[Any]] = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


def merge_segment_states(states: Sequence[Optional[Mapping[str, Any]]],
                         keep: Optional[Callable[[Tuple[int, int]], bool]] = None,
                         active: Optional[Sequence[int]] = None) -> Optional[dict]:
    """One :class:`~evolsplat_ns.model.segment_state.SegmentStateStore` state out of several ranks' states: the
    segments of all of them (a segment held by several, e.g. an evaluation segment every rank reconstructed, is
    taken from the first), those for which ``keep((scene, segment))`` holds; ``active`` stays active if kept."""
    present = [s for s in states if s]
    if not present:
        return None
    segments, seen = [], set()
    for st in present:
        for seg in st["segments"]:
            key = (int(seg["scene_id"]), int(seg["segment_id"]))
            if key in seen or (keep is not None and not keep(key)):
                continue
            seen.add(key)
            segments.append(seg)
    act = [int(x) for x in active] if active else []
    return {"format": present[0]["format"], "version": present[0]["version"],
            "active": act if tuple(act) in seen else [], "segments": segments}


# --------------------------------------------------------------------------------------------------- local launches
def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_local(fn: Callable[..., None], world_size: int, args: tuple = (), timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes (spawn) and wait for all of them.

    For tests and benchmarks; ``ns-train --machine.num-devices N`` is the way to train. A failing process raises
    here with its traceback (the others are stopped); past ``timeout_s`` every process is terminated, then killed,
    and TimeoutError is raised. No process outlives the call.
    """
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} processes still running after {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
