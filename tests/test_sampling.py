"""Source/target selection: spread, novelty, determinism, held-out frames."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evolsplat_ns.errors import ConfigError
from evolsplat_ns.data.sampling import select_views
from evolsplat_ns.data.scene_index import Segment
from scene_fixtures import keyframes_of


_kfs = keyframes_of


def _seg(kfs, ids=None):
    ids = list(range(len(kfs))) if ids is None else ids
    frames = tuple(t for i in ids for t in kfs[i].frame_indices)
    return Segment(0, 0, tuple(ids), frames, ((0, 0, 0), (1, 1, 1)))


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=8, max_size=16), seed=st.integers(0, 10_000),
       n_src=st.integers(1, 4), n_tgt=st.integers(1, 4))
def test_selection_properties(sizes, seed, n_src, n_tgt):
    kfs = _kfs(sizes)
    seg = _seg(kfs)
    sel = select_views(kfs, seg, n_src, n_tgt, rng=np.random.default_rng(seed))
    assert len(sel.source_frames) == n_src and len(sel.target_frames) == n_tgt
    assert not set(sel.source_frames) & set(sel.target_frames)  # novel-view supervision
    for kf, fr in zip(sel.source_keyframes + sel.target_keyframes, sel.source_frames + sel.target_frames):
        assert kfs[kf].start <= fr < kfs[kf].stop  # one frame from its keyframe
    assert list(sel.source_keyframes) == sorted(set(sel.source_keyframes))  # distinct, time order
    assert list(sel.target_keyframes) == sorted(set(sel.target_keyframes))
    # sources spread: one per stratum of consecutive keyframes
    strata = np.array_split(np.arange(len(kfs)), n_src)
    for s, kf in zip(strata, sel.source_keyframes):
        assert kf in s
    # deterministic for the same rng seed
    assert sel == select_views(kfs, seg, n_src, n_tgt, rng=np.random.default_rng(seed))


def test_eval_selection_is_fixed_and_respects_holdout():
    kfs = _kfs([2] * 10)
    seg = _seg(kfs)
    even = {t for t in range(20) if t % 2 == 0}
    odd = set(range(20)) - even
    a = select_views(kfs, seg, 3, 6, rng=None, input_frames=even, target_frames=odd)
    b = select_views(kfs, seg, 3, 6, rng=None, input_frames=even, target_frames=odd)
    assert a == b
    assert all(t in even for t in a.source_frames) and all(t in odd for t in a.target_frames)
    for seed in range(20):
        s = select_views(kfs, seg, 3, 6, rng=np.random.default_rng(seed), input_frames=even, target_frames=odd)
        assert all(t in even for t in s.source_frames) and all(t in odd for t in s.target_frames)


def test_targets_may_include_sources_when_asked():
    kfs = _kfs([1] * 6)
    seg = _seg(kfs)
    with pytest.raises(ConfigError, match="num_target_keyframes=6"):
        select_views(kfs, seg, 3, 6, rng=np.random.default_rng(0))
    sel = select_views(kfs, seg, 3, 6, rng=np.random.default_rng(0), targets_include_sources=True)
    assert set(sel.source_frames) <= set(sel.target_frames)


def test_too_many_sources_is_a_clear_error():
    kfs = _kfs([2] * 6)
    with pytest.raises(ConfigError, match="num_source_keyframes=7.*only 6 keyframes"):
        select_views(kfs, _seg(kfs), 7, 1, rng=None)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=6, max_size=12), seed=st.integers(0, 10_000),
       n_src=st.integers(1, 3), n_tgt=st.integers(1, 4), holdout=st.booleans())
def test_near_selection_matches_evaluation(sizes, seed, n_src, n_tgt, holdout):
    """The 'near' rule: sources are the input frames nearest to an anchor target (as the evaluation plan takes
    them for a held-out frame), the targets the frames nearest to it; disjoint, each with its keyframe."""
    from evolsplat_ns.data.eval_plan import nearest_sources
    from evolsplat_ns.data.sampling import select_near

    kfs = _kfs(sizes)
    seg = _seg(kfs)
    n = sum(sizes)
    inputs = {t for t in range(n) if t % 2 == 0} if holdout else None
    targets = {t for t in range(n) if t % 2 == 1} if holdout else None
    n_in, n_out = len(inputs or range(n)), len(targets or range(n))
    if n_in < n_src + (0 if holdout else 1) or n_out < n_tgt + (0 if holdout else n_src):
        return
    sel = select_near(kfs, seg, n_src, n_tgt, rng=np.random.default_rng(seed), input_frames=inputs,
                      target_frames=targets)
    assert len(sel.source_frames) == n_src and len(sel.target_frames) == n_tgt
    assert not set(sel.source_frames) & set(sel.target_frames)
    assert list(sel.source_frames) == sorted(sel.source_frames) and list(sel.target_frames) == sorted(sel.target_frames)
    for kf, fr in zip(sel.source_keyframes + sel.target_keyframes, sel.source_frames + sel.target_frames):
        assert kfs[kf].start <= fr < kfs[kf].stop
    # some target's sources are exactly what evaluation would take for it (the anchor's)
    assert any(nearest_sources(t, seg, n_src, inputs) == sel.source_frames for t in sel.target_frames)
    # targets are the nearest frames around the anchor: a contiguous run of the allowed, non-source frames
    allowed = [t for t in range(n) if (targets is None or t in targets) and t not in sel.source_frames]
    pos = [allowed.index(t) for t in sel.target_frames]
    assert pos == list(range(pos[0], pos[0] + n_tgt))
    assert sel == select_near(kfs, seg, n_src, n_tgt, rng=np.random.default_rng(seed), input_frames=inputs,
                              target_frames=targets)


def test_near_selection_on_a_standing_car_stays_local():
    """A car that waits: 40 frames in 4 keyframes. 'spread' takes sources up to the whole segment apart; 'near'
    keeps sources and targets within a few frames of each other, as evaluation does."""
    from evolsplat_ns.data.sampling import select_near

    kfs = _kfs([10] * 4)
    seg = _seg(kfs)
    even = {t for t in range(40) if t % 2 == 0}
    odd = set(range(40)) - even
    for seed in range(20):
        sel = select_near(kfs, seg, 3, 6, rng=np.random.default_rng(seed), input_frames=even, target_frames=odd)
        frames = sel.source_frames + sel.target_frames
        assert max(frames) - min(frames) <= 14
    mid = select_near(kfs, seg, 3, 6, rng=None, input_frames=even, target_frames=odd)
    assert min(mid.target_frames) <= 19 <= max(mid.target_frames)


def test_source_windows_slide_over_the_segment_once_each():
    """The windows of the "windows" start (evolsplat_ns.finetune.merge): every distinct set of n nearest input
    frames around an input frame, in time order, none twice, only input frames, covering every input frame."""
    from evolsplat_ns.data.sampling import source_windows

    kfs = _kfs([2] * 10)  # frames 0..19
    seg = _seg(kfs)
    even = {t for t in range(20) if t % 2 == 0}
    ws = source_windows(kfs, seg, 3, input_frames=even)
    srcs = [w.source_frames for w in ws]
    assert srcs[0] == (0, 2, 4) and srcs[-1] == (14, 16, 18) and len(set(srcs)) == len(srcs) == 8
    assert srcs == sorted(srcs) and set().union(*srcs) == even
    for w in ws:
        assert w.target_frames[0] in w.source_frames and len(w.source_frames) == 3
        for kf, fr in zip(w.source_keyframes, w.source_frames):
            assert kfs[kf].start <= fr < kfs[kf].stop
    assert [w.source_frames for w in source_windows(kfs, seg, 10, even)] == [tuple(sorted(even))]
    with pytest.raises(ConfigError, match="window of 11 source frames.*has 10"):
        source_windows(kfs, seg, 11, even)
