"""Multi-GPU state of one process: its rank, its share of the training segments, and its resumable state in
checkpoints (which rank 0 alone writes).

:class:`RankState` is owned by the pipeline (:class:`~evolsplat_ns.pipeline.pipeline.EvolSplatPipeline`), which
delegates nerfstudio's state hooks to it. At the steps where the trainer saves, every rank's scheduler position and
segment store are gathered to rank 0 (:meth:`RankState.gather`) and written in the pipeline's ``_extra_state``
(:meth:`RankState.extra_state`); on resume every rank takes its own back (:meth:`RankState.resume`), merging the
saved ranks' segment stores when the number of processes changed. The collectives themselves are in
:mod:`evolsplat_ns.pipeline.distributed`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import torch

from evolsplat_ns.pipeline import distributed as ddp_utils

logger = logging.getLogger(__name__)


class RankState:
    """This process's rank and the gathered states of all ranks (rank 0)."""

    def __init__(self, local_rank: int, world_size: int) -> None:
        self.local_rank = int(local_rank)
        self.rank, self.world_size = ddp_utils.resolve_rank(local_rank, world_size)
        self.gathered: Optional[List[Dict[str, Any]]] = None
        """Rank 0: every rank's state at the last gather, for its next checkpoint."""
        self.object_group = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup(self, datamanager, model: torch.nn.Module, device: Any) -> torch.nn.Module:
        """Give the datamanager this rank's share of the segments; returns the model wrapped in DDP (unchanged in
        a single process). nerfstudio's own wrap (``VanillaPipeline``) passes ``device_ids`` also for CPU modules,
        which DDP rejects, and hands the datamanager the *local* rank; segment ownership needs the global one."""
        if not self.distributed:
            return model
        datamanager.set_partition(self.rank, self.world_size)
        wrapped = ddp_utils.wrap_ddp(model, device)
        self.object_group = ddp_utils.object_group()
        torch.distributed.barrier()
        return wrapped

    @staticmethod
    def save_callback(steps_per_save: int, num_iterations: int, first_step: Callable[[], int],
                      gather: Callable[[int], None]) -> Callable[[int], None]:
        """A training callback (after each iteration) that runs ``gather(step)`` at the steps where nerfstudio's
        trainer saves (right after the callbacks): every ``steps_per_save`` steps and at the last of the
        ``num_iterations`` steps it runs from ``first_step()`` (where this run started or resumed)."""
        from nerfstudio.utils.misc import step_check

        def before_save(step: int) -> None:
            if step_check(step, steps_per_save) or step == first_step() + num_iterations - 1:
                gather(step)

        return before_save

    def gather(self, step: int, datamanager, store) -> None:
        """Collective (every rank calls it at the same step): every rank's scheduler position and segment store to
        rank 0 (rank 0's own store is the model's ``segments`` entry already)."""
        mine = {"rank": self.rank, "step": int(step), "scheduler": datamanager.scheduler.state_dict(),
                "train_count": int(datamanager.train_count),
                "segments": None if self.rank == 0 else store.get_extra_state()}
        states = ddp_utils.gather_to_rank0(mine, self.object_group)
        if states is not None:
            self.gathered = states

    def extra_state(self, partition: str) -> Dict[str, Any]:
        """What multi-GPU checkpoints add to the pipeline's state (plain types only); empty in a single process."""
        if not self.distributed or self.gathered is None:
            return {}
        return {"format": ddp_utils.RANKS_FORMAT, "version": ddp_utils.RANKS_VERSION, "world_size": self.world_size,
                "partition": str(partition), "ranks": self.gathered}

    def resume(self, ddp_state: Optional[Dict[str, Any]], dm_state: Optional[Dict[str, Any]],
               store0: Optional[Dict[str, Any]], datamanager, store, training: bool) -> None:
        """Give this rank its own scheduler position and segment store out of a checkpoint written by rank 0.

        Same number of processes (and partition): rank r takes exactly rank r's state. Otherwise (resuming on
        more or fewer GPUs, or evaluating a multi-GPU checkpoint) the segment stores of all saved ranks are merged,
        a training rank keeps the segments it owns now, and the schedule restarts at the pass after the furthest
        saved one."""
        ranks = None
        if ddp_state and ddp_state.get("format") == ddp_utils.RANKS_FORMAT:
            ranks = [dict(r) for r in ddp_state["ranks"]]
        if ranks is None:
            if not self.distributed:
                return  # a single-process checkpoint into a single process: loaded as it is
            ranks = [{"rank": 0, "scheduler": (dm_state or {}).get("scheduler"),
                      "train_count": int((dm_state or {}).get("train_count", 0)), "segments": None}]
        ranks[0]["segments"] = store0  # rank 0's store is the model's own entry
        dm = datamanager
        same = (len(ranks) == self.world_size and
                (not self.distributed or (ddp_state or {}).get("partition") == dm.config.ddp_partition))
        if same:
            mine = ranks[self.rank]
            if self.rank != 0 and mine.get("segments"):
                store.set_extra_state(mine["segments"])
            if training and mine.get("scheduler"):
                dm.scheduler.load_state_dict(mine["scheduler"])
                dm.train_count = int(mine.get("train_count", 0))
            return
        keep = (lambda key: dm.scheduler.owns(*key)) if training else None
        merged = ddp_utils.merge_segment_states([r.get("segments") for r in ranks], keep=keep)
        if merged is not None:
            store.set_extra_state(merged)
        if training:
            passes = [int(r["scheduler"]["pass"]) for r in ranks if r.get("scheduler")]
            dm.scheduler.restart(max(passes) + 1 if passes else 0)
            logger.warning("checkpoint of %d process(es) resumed by %d: segment states merged, the schedule restarts "
                           "at pass %d", len(ranks), self.world_size, dm.scheduler.state_dict()["pass"])
