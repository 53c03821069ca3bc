"""Which segment each training step draws from.

A *pass* visits every training scene (in ``scene_order``), and within a scene every segment (in
``segment_order``), drawing ``batches_per_segment`` consecutive batches from each. Passes repeat without end
(nerfstudio's training is bounded by steps, not epochs); a random order is reshuffled every pass from
``(seed, pass index)``, so the whole schedule is a pure function of the seed and resuming only needs the
cursor (:meth:`state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.data.errors import ConfigError

Order = Literal["random", "sequential"]
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
        rank, world_size: with several processes each rank visits its own share of the segments of every pass
            (round-robin over the pass plan), so ranks never share a segment at the same step.
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
    ) -> None:
        if batches_per_segment < 1:
            raise ConfigError(f"batches_per_segment must be >= 1, got {batches_per_segment}")
        for name, val in (("segment_order", segment_order), ("scene_order", scene_order)):
            if val not in ("random", "sequential"):
                raise ConfigError(f"{name} must be 'random' or 'sequential', got {val!r}")
        self.segments = {int(k): [int(s) for s in v] for k, v in segments.items() if len(v) > 0}
        if not self.segments:
            raise ConfigError("the scheduler needs at least one scene with at least one segment")
        total = sum(len(v) for v in self.segments.values())
        if world_size > total:
            raise ConfigError(f"{world_size} processes but only {total} training segments")
        self.batches_per_segment = int(batches_per_segment)
        self.segment_order = segment_order
        self.scene_order = scene_order
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._pass = 0
        self._cursor = 0
        self._count = 0
        self._last: Optional[SegmentKey] = None
        self._plan_cache: Tuple[int, List[SegmentKey]] = (-1, [])

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
        # Pad the pass to a multiple of world_size by wrapping around, so every rank's plan has the same length
        # and at any step the ranks hold consecutive (hence distinct) entries of the pass.
        pad = (-len(full)) % self.world_size
        full = full + full[:pad]
        mine = full[self.rank :: self.world_size]
        self._plan_cache = (pass_index, mine)
        return mine

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
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if int(state["seed"]) != self.seed:  # type: ignore[arg-type]
            raise ConfigError(f"checkpoint scheduler seed {state['seed']} differs from the configured seed {self.seed}")
        self._pass = int(state["pass"])  # type: ignore[arg-type]
        self._cursor = int(state["cursor"])  # type: ignore[arg-type]
        self._count = int(state["count"])  # type: ignore[arg-type]
        last = list(state.get("last", []))  # type: ignore[arg-type]
        self._last = (int(last[0]), int(last[1])) if last else None
        if self._cursor >= len(self.plan(self._pass)):
            raise ConfigError("checkpoint scheduler position does not fit the current data (scenes or segments changed)")
