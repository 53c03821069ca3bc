"""Which segment each training step draws from.

A *pass* visits every training scene (in ``scene_order``), and within a scene every segment (in
``segment_order``), drawing ``batches_per_segment`` consecutive batches from each. Passes repeat without end
(nerfstudio's training is bounded by steps, not epochs); a random order is reshuffled every pass from
``(seed, pass index)``, so the whole schedule is a pure function of the seed and resuming only needs the
cursor (:meth:`state_dict`).

With several processes (distributed data parallel) every segment has one owner rank for the whole run
(:meth:`SegmentScheduler.owner`, a deterministic function of the segments, the seed and the world size), and a
rank's pass is the global pass restricted to the segments it owns. So ranks never share a segment at a step, a
segment's per-segment state (offset cache, frozen volume) only ever lives on its owner, and each rank resumes from
its own cursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.errors import ConfigError

Order = Literal["random", "sequential"]
Partition = Literal["segment", "scene"]
SegmentKey = Tuple[int, int]


@dataclass(frozen=True)
class ScheduledSegment:
    scene_id: int
    segment_id: int
    is_new_segment: bool
    """True when the previous step drew from a different segment (or this is the first step)."""
    pass_index: int
    batch_in_segment: int


class SegmentScheduler:
    """Endless, deterministic, resumable schedule of (scene, segment) per step.

    Args:
        segments: ``{scene_id: [segment_id, ...]}`` of the training scenes.
        rank, world_size: with several processes each rank owns a fixed share of the segments (see
            ``partition``) and visits only those, so ranks never share a segment at the same step.
        partition: ``"segment"``: segments are dealt out one by one (balanced to within one segment per rank);
            ``"scene"``: whole scenes are dealt out (a rank decodes only its own scenes; balanced by segment count,
            largest scenes first). The assignment is shuffled by ``seed`` and independent of the visiting order.
    """

    def __init__(
        self,
        segments: Dict[int, Sequence[int]],
        batches_per_segment: int = 20,
        segment_order: Order = "random",
        scene_order: Order = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        partition: Partition = "segment",
    ) -> None:
        if batches_per_segment < 1:
            raise ConfigError(f"batches_per_segment must be >= 1, got {batches_per_segment}")
        for name, val in (("segment_order", segment_order), ("scene_order", scene_order)):
            if val not in ("random", "sequential"):
                raise ConfigError(f"{name} must be 'random' or 'sequential', got {val!r}")
        self.segments = {int(k): [int(s) for s in v] for k, v in segments.items() if len(v) > 0}
        if not self.segments:
            raise ConfigError("the scheduler needs at least one scene with at least one segment")
        if partition not in ("segment", "scene"):
            raise ConfigError(f"partition must be 'segment' or 'scene', got {partition!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} of world size {world_size} is not a valid process")
        total = sum(len(v) for v in self.segments.values())
        units = total if partition == "segment" else len(self.segments)
        if world_size > units:
            raise ConfigError(f"{world_size} processes but only {units} training {partition}s to share among them")
        self.batches_per_segment = int(batches_per_segment)
        self.segment_order = segment_order
        self.scene_order = scene_order
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.partition = partition
        self.owners: Dict[SegmentKey, int] = self._assign_owners()
        self._pass = 0
        self._cursor = 0
        self._count = 0
        self._last: Optional[SegmentKey] = None
        self._plan_cache: Tuple[int, List[SegmentKey]] = (-1, [])

    def _assign_owners(self) -> Dict[SegmentKey, int]:
        keys = [(sc, sg) for sc in sorted(self.segments) for sg in sorted(self.segments[sc])]
        if self.world_size == 1:
            return {k: 0 for k in keys}
        if self.partition == "segment":
            units = [[k] for k in keys]
        else:
            units = [[(sc, sg) for sg in sorted(self.segments[sc])] for sc in sorted(self.segments)]
        rng = np.random.default_rng([self.seed, 0x0DD9])  # independent of the per-pass visiting orders
        order = [units[i] for i in rng.permutation(len(units))]
        order.sort(key=len, reverse=True)  # stable: largest units first, shuffled among equals
        load = [0] * self.world_size
        owners: Dict[SegmentKey, int] = {}
        for unit in order:
            r = min(range(self.world_size), key=lambda i: (load[i], i))
            load[r] += len(unit)
            owners.update((k, r) for k in unit)
        return owners

    def owner(self, scene_id: int, segment_id: int) -> int:
        """The rank that trains (scene, segment); raises KeyError for a segment that is not trained."""
        return self.owners[(int(scene_id), int(segment_id))]

    def owns(self, scene_id: int, segment_id: int) -> bool:
        return self.owners.get((int(scene_id), int(segment_id))) == self.rank

    def restart(self, pass_index: int) -> None:
        """Start pass ``pass_index`` from its beginning (used when a checkpoint of another world size is resumed)."""
        self._pass, self._cursor, self._count, self._last = int(pass_index), 0, 0, None

    def plan(self, pass_index: int) -> List[SegmentKey]:
        """The ordered segments this rank visits in one pass."""
        if self._plan_cache[0] == pass_index:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, pass_index])
        scenes = sorted(self.segments)
        if self.scene_order == "random":
            scenes = [scenes[i] for i in rng.permutation(len(scenes))]
        full: List[SegmentKey] = []
        for sc in scenes:
            segs = sorted(self.segments[sc])
            if self.segment_order == "random":
                segs = [segs[i] for i in rng.permutation(len(segs))]
            full.extend((sc, s) for s in segs)
        mine = full if self.world_size == 1 else [k for k in full if self.owners[k] == self.rank]
        self._plan_cache = (pass_index, mine)
        return mine

    def upcoming(self, steps: Optional[int] = None) -> List[SegmentKey]:
        """The distinct segments of the next ``steps`` steps (None: a whole pass from here), in the order they are
        first visited, without advancing the schedule."""
        owned = sum(1 for k in self.owners.values() if k == self.rank)
        steps = owned * self.batches_per_segment if steps is None else int(steps)
        seen: Dict[SegmentKey, None] = {}
        p, c, n = self._pass, self._cursor, self._count
        while steps > 0 and len(seen) < owned:
            plan = self.plan(p)
            seen.setdefault(plan[c])
            take = min(steps, self.batches_per_segment - n)
            steps -= take
            n += take
            if n >= self.batches_per_segment:
                n, c = 0, c + 1
                if c >= len(plan):
                    c, p = 0, p + 1
        return list(seen)

    def next(self) -> ScheduledSegment:
        """The segment of the next step, advancing the schedule."""
        plan = self.plan(self._pass)
        key = plan[self._cursor]
        out = ScheduledSegment(key[0], key[1], key != self._last, self._pass, self._count)
        self._last = key
        self._count += 1
        if self._count >= self.batches_per_segment:
            self._count = 0
            self._cursor += 1
            if self._cursor >= len(plan):
                self._cursor = 0
                self._pass += 1
        return out

    def state_dict(self) -> Dict[str, object]:
        """Plain ints/lists only, so that ``torch.load(weights_only=True)`` accepts checkpoints holding it."""
        return {
            "pass": int(self._pass),
            "cursor": int(self._cursor),
            "count": int(self._count),
            "last": [int(x) for x in self._last] if self._last is not None else [],
            "seed": int(self.seed),
            "rank": int(self.rank),
            "world_size": int(self.world_size),
            "partition": str(self.partition),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if int(state["seed"]) != self.seed:  # type: ignore[arg-type]
            raise ConfigError(f"checkpoint scheduler seed {state['seed']} differs from the configured seed {self.seed}")
        rank, world = int(state.get("rank", 0)), int(state.get("world_size", 1))  # type: ignore[arg-type]
        partition = str(state.get("partition", self.partition))
        if (rank, world) != (self.rank, self.world_size) or (world > 1 and partition != self.partition):
            raise ConfigError(
                f"checkpoint scheduler position is rank {rank} of {world} ({partition} partition) but this is rank "
                f"{self.rank} of {self.world_size} ({self.partition} partition)")
        self._pass = int(state["pass"])  # type: ignore[arg-type]
        self._cursor = int(state["cursor"])  # type: ignore[arg-type]
        self._count = int(state["count"])  # type: ignore[arg-type]
        last = list(state.get("last", []))  # type: ignore[arg-type]
        self._last = (int(last[0]), int(last[1])) if last else None
        if self._cursor >= len(self.plan(self._pass)):
            raise ConfigError("checkpoint scheduler position does not fit the current data (scenes or segments changed)")
