"""Scheduler: both orders honoured, endless passes, determinism, exact resume."""

import itertools

import pytest
import torch

from evolsplat_ns.errors import ConfigError
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


@pytest.mark.parametrize("partition", ["segment", "scene"])
@pytest.mark.parametrize("world", [2, 3])
def test_partition_gives_every_segment_one_owner(partition, world):
    segs = {0: [0, 1, 2], 3: [0, 1], 5: [0, 1, 2, 3], 8: [0]}
    scheds = [SegmentScheduler(segs, 1, "random", "random", seed=4, rank=r, world_size=world, partition=partition)
              for r in range(world)]
    owners = scheds[0].owners
    assert all(s.owners == owners for s in scheds)  # every rank computes the same assignment
    assert sorted(owners) == sorted((sc, sg) for sc in segs for sg in segs[sc])
    loads = [sum(1 for o in owners.values() if o == r) for r in range(world)]
    assert min(loads) >= 1
    if partition == "segment":
        assert max(loads) - min(loads) <= 1
    else:  # whole scenes per rank
        assert all(len({owners[(sc, sg)] for sg in segs[sc]}) == 1 for sc in segs)
    for p in range(5):  # a rank's pass is the global pass restricted to its own segments, in the same order
        full = SegmentScheduler(segs, 1, "random", "random", seed=4).plan(p)
        for r, s in enumerate(scheds):
            assert s.plan(p) == [k for k in full if owners[k] == r]
    # same seed and world size: the same assignment, so a resumed run keeps every segment on its rank
    again = SegmentScheduler(segs, 1, seed=4, rank=0, world_size=world, partition=partition)
    assert again.owners == owners


def test_rank_resume_is_exact_and_checked():
    a = SegmentScheduler(SEGS, 2, seed=3, rank=1, world_size=2)
    _keys(a, 7)
    state = a.state_dict()
    rest = _keys(a, 20)
    b = SegmentScheduler(SEGS, 2, seed=3, rank=1, world_size=2)
    b.load_state_dict(state)
    assert _keys(b, 20) == rest
    with pytest.raises(ConfigError, match="rank 1 of 2"):
        SegmentScheduler(SEGS, 2, seed=3, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ConfigError):
        SegmentScheduler(SEGS, 2, seed=3).load_state_dict(state)
    b.restart(9)
    assert b.state_dict()["pass"] == 9 and b.state_dict()["cursor"] == 0
    with pytest.raises(ConfigError):
        SegmentScheduler(SEGS, 1, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        SegmentScheduler(SEGS, 1, rank=0, world_size=4, partition="scene")  # 3 scenes for 4 processes


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_upcoming_lists_the_segments_of_the_next_steps_without_advancing(rank, world):
    s = SegmentScheduler(SEGS, batches_per_segment=3, seed=7, rank=rank, world_size=world)
    _keys(s, 5)  # mid-segment, mid-pass
    state = s.state_dict()
    for n in (1, 2, 4, 11, 40):
        want = list(dict.fromkeys(_keys(s, n)))
        s.load_state_dict(state)
        assert s.upcoming(n) == want and s.state_dict() == state
    owned = {k for k, r in s.owners.items() if r == rank}
    assert set(s.upcoming()) <= owned and set(s.upcoming(10_000)) == owned  # a long run sees every owned segment
