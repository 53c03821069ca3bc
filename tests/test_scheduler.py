"""Scheduler: both orders honoured, endless passes, determinism, exact resume."""

import itertools

import pytest
import torch

from evolsplat_ns.data.errors import ConfigError
from evolsplat_ns.data.scheduler import SegmentScheduler

SEGS = {0: [0, 1, 2], 3: [0, 1], 5: [0, 1, 2, 3]}


def _keys(s, n):
    return [(x.scene_id, x.segment_id) for x in (s.next() for _ in range(n))]


def test_sequential_order_and_batches_per_segment():
    s = SegmentScheduler(SEGS, batches_per_segment=2, segment_order="sequential", scene_order="sequential")
    keys = _keys(s, 18 + 4)
    expected = [(sc, sg) for sc in (0, 3, 5) for sg in SEGS[sc] for _ in range(2)]
    assert keys[:18] == expected
    assert keys[18:] == expected[:4]  # the next pass starts again: endless


def test_random_scene_order_is_honoured_and_reshuffled():
    s = SegmentScheduler(SEGS, batches_per_segment=1, segment_order="sequential", scene_order="random", seed=3)
    passes = [s.plan(p) for p in range(12)]
    scene_orders = {tuple(dict.fromkeys(sc for sc, _ in plan)) for plan in passes}
    assert len(scene_orders) > 1  # reshuffled between passes
    for plan in passes:
        assert sorted(plan) == sorted((sc, sg) for sc in SEGS for sg in SEGS[sc])  # every segment once per pass
        for sc in SEGS:  # sequential within a scene
            assert [sg for c, sg in plan if c == sc] == SEGS[sc]


def test_random_segment_order_keeps_scenes_sequential():
    s = SegmentScheduler(SEGS, batches_per_segment=1, segment_order="random", scene_order="sequential", seed=1)
    orders = set()
    for p in range(12):
        plan = s.plan(p)
        assert list(dict.fromkeys(sc for sc, _ in plan)) == [0, 3, 5]
        orders.add(tuple(sg for c, sg in plan if c == 5))
    assert len(orders) > 1


@pytest.mark.parametrize("seg_order,scene_order", list(itertools.product(["random", "sequential"], repeat=2)))
def test_resume_is_exact(seg_order, scene_order):
    a = SegmentScheduler(SEGS, 3, seg_order, scene_order, seed=7)
    first = _keys(a, 17)
    state = a.state_dict()
    rest = [(x.scene_id, x.segment_id, x.is_new_segment) for x in (a.next() for _ in range(40))]
    # the state survives torch.save / torch.load(weights_only=True) (how nerfstudio loads checkpoints)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = SegmentScheduler(SEGS, 3, seg_order, scene_order, seed=7)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert [(x.scene_id, x.segment_id, x.is_new_segment) for x in (b.next() for _ in range(40))] == rest
    # and a fresh scheduler with the same seed reproduces the whole sequence
    c = SegmentScheduler(SEGS, 3, seg_order, scene_order, seed=7)
    assert _keys(c, 17) == first


def test_is_new_segment_flags_switches():
    s = SegmentScheduler({0: [0, 1]}, batches_per_segment=2, segment_order="sequential", scene_order="sequential")
    flags = [x.is_new_segment for x in (s.next() for _ in range(6))]
    assert flags == [True, False, True, False, True, False]


def test_ranks_never_share_a_segment_at_a_step():
    scheds = [SegmentScheduler(SEGS, 2, "random", "random", seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(60):
        a, b = (s.next() for s in scheds)
        assert (a.scene_id, a.segment_id) != (b.scene_id, b.segment_id)


def test_bad_options():
    with pytest.raises(ConfigError):
        SegmentScheduler(SEGS, 0)
    with pytest.raises(ConfigError):
        SegmentScheduler(SEGS, 1, segment_order="shuffled")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SegmentScheduler({}, 1)
