"""The evaluation plan: every held-out image scored exactly once, from the input frames nearest to it."""

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig
from evolsplat_ns.errors import ConfigError
from evolsplat_ns.data.eval_plan import plan_scene
from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig
from evolsplat_ns.data.scene_index import Segment, window_starts
from scene_fixtures import keyframes_of, write_root


_kfs = keyframes_of


def _segments(kfs, window, overlap):
    segs = []
    for i, start in enumerate(window_starts(len(kfs), window, overlap)):
        ids = tuple(range(start, min(start + window, len(kfs))))
        frames = tuple(t for k in ids for t in kfs[k].frame_indices)
        segs.append(Segment(0, i, ids, frames, ((0, 0, 0), (1, 1, 1))))
    return segs


def _expected_segment(t, segs):
    """Brute force: segments containing t, the one with the smallest |t - span centre|, then the lowest id."""
    containing = [s for s in segs if s.frame_indices[0] <= t <= s.frame_indices[-1]]
    return min(containing, key=lambda s: (abs(t - (s.frame_indices[0] + s.frame_indices[-1]) / 2), s.segment_id))


def _expected_sources(t, seg, n, inputs, include_self):
    cands = [s for s in seg.frame_indices if (inputs is None or s in inputs) and (include_self or s != t)]
    return sorted(sorted(cands, key=lambda s: (abs(s - t), s))[:n])


def _check_plan(plan, kfs, segs, num_frames, n_src, inputs, include_self=False):
    held = [t for t in range(num_frames) if inputs is None or t not in inputs]
    scored = [t for p in plan for t in p.selection.target_frames]
    assert Counter(scored) == Counter(held)  # every held-out frame exactly once
    groups = set()
    for p in plan:
        sel = p.selection
        seg = segs[p.segment_id]
        assert list(sel.source_frames) == sorted(sel.source_frames) and len(sel.source_frames) == n_src
        assert list(sel.target_frames) == sorted(sel.target_frames)
        assert not set(sel.source_frames) & set(held) or (inputs is None)  # no held-out frame is an input
        for kf, fr in zip(sel.source_keyframes + sel.target_keyframes, sel.source_frames + sel.target_frames):
            assert kfs[kf].start <= fr < kfs[kf].stop  # the keyframe holding the frame
        for t in sel.target_frames:
            assert _expected_segment(t, segs).segment_id == p.segment_id
            assert list(sel.source_frames) == _expected_sources(t, seg, n_src, inputs, include_self)
            if not include_self:
                assert t not in sel.source_frames
        key = (p.segment_id, sel.source_frames)
        assert key not in groups  # frames with the same segment and sources share one batch
        groups.add(key)


@settings(max_examples=120, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=6, max_size=18), window=st.integers(3, 8),
       overlap=st.sampled_from([0.0, 0.25, 0.5]), n_src=st.integers(1, 3),
       holdout=st.sampled_from(["odd", "drop80", "none"]), include_self=st.booleans())
def test_plan_properties(sizes, window, overlap, n_src, holdout, include_self):
    kfs = _kfs(sizes)
    T = kfs[-1].stop
    segs = _segments(kfs, window, overlap)
    inputs = {"odd": {t for t in range(T) if t % 2 == 0}, "drop80": {t for t in range(T) if t % 5 == 0},
              "none": None}[holdout]
    try:
        plan = plan_scene(kfs, segs, T, n_src, inputs, include_self)
    except ConfigError as e:  # only when some held-out frame's segment has too few input frames
        assert "num_source_keyframes" in str(e) and "segment" in str(e)
        return
    _check_plan(plan, kfs, segs, T, n_src, inputs, include_self and inputs is None)
    assert plan == plan_scene(kfs, segs, T, n_src, inputs, include_self)  # deterministic


def test_tie_breaks_and_sharing():
    # 2 segments of frames 0..11 and 6..17; held-out odd frames, 3 sources
    kfs = _kfs([2] * 9)
    segs = _segments(kfs, 6, 0.5)
    assert [(s.frame_indices[0], s.frame_indices[-1]) for s in segs] == [(0, 11), (6, 17)]
    inputs = {t for t in range(18) if t % 2 == 0}
    plan = plan_scene(kfs, segs, 18, 3, inputs)
    by_frame = {t: p for p in plan for t in p.selection.target_frames}
    # frame 9: |9 - 5.5| = 3.5 vs |9 - 11.5| = 2.5 -> segment 1; frame 7: 1.5 vs 4.5 -> segment 0
    assert by_frame[9].segment_id == 1 and by_frame[7].segment_id == 0
    # sources of 7: 6 and 8 at distance 1, then 4 and 10 at distance 3 -> the earlier, 4
    assert by_frame[7].selection.source_frames == (4, 6, 8)
    # frames 1 and 3 both have sources (0, 2, 4) in segment 0: one batch
    assert by_frame[1] is by_frame[3] and by_frame[1].selection.target_frames == (1, 3)
    # a tie between segments goes to the lower id: frame 9 of two segments centred at 9
    box = ((0, 0, 0), (1, 1, 1))
    twin = [Segment(0, i, (0,), tuple(range(a, b)), box) for i, (a, b) in enumerate([(4, 15), (0, 19)])]
    p = plan_scene(_kfs([19]), twin, 19, 2, {t for t in range(19) if t % 2 == 0})
    assert next(q for q in p if 9 in q.selection.target_frames).segment_id == 0


def test_one_long_keyframe_still_scores_every_frame():
    """Independent of how keyframes are cut: a car standing still collapses 35 frames into one keyframe."""
    kfs = _kfs([35, 3, 3, 3, 3, 3])
    segs = _segments(kfs, 6, 0.5)
    inputs = {t for t in range(50) if t % 2 == 0}
    plan = plan_scene(kfs, segs, 50, 3, inputs)
    _check_plan(plan, kfs, segs, 50, 3, inputs)
    p = next(q for q in plan if 11 in q.selection.target_frames)
    assert p.selection.source_frames == (8, 10, 12) and p.selection.source_keyframes == (0, 0, 0)


def test_too_few_inputs_is_a_config_error():
    kfs = _kfs([1] * 6)
    segs = _segments(kfs, 6, 0.5)
    with pytest.raises(ConfigError, match=r"segment 0: held-out frame 1 needs num_source_keyframes=4"):
        plan_scene(kfs, segs, 6, 4, {0, 2, 4})


# ------------------------------------------------------------------------------------------------ the DataManager
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 40 frames 1 m apart, 2 m keyframes -> 20 keyframes -> 3 overlapping segments; scene 2 is the eval scene
    return write_root(tmp_path_factory.mktemp("plan") / "root", num_scenes=3, num_frames=40, num_cams=3, size=(8, 12))


def make_dm(root, **kw):
    dp = kw.pop("dataparser", EvolSplatDataParserConfig())
    dp.data = root
    cfg = EvolSplatDataManagerConfig(dataparser=dp, **kw)
    return cfg.setup(device="cpu", test_mode="test")


def test_datamanager_plan_covers_every_held_out_image_once(root):
    dm = make_dm(root)
    assert dm.eval_scene_ids == [2] and len(dm.index[2].segments) == 3
    expected = {(2, t, c) for t in range(40) if t % 2 == 1 for c in (0, 1, 2)}
    scored = []
    n_sources = []
    for b in dm.eval_batches():
        assert b.scene_id == 2
        seg = dm.segment(b.scene_id, b.segment_id)
        src, tgt = b.source, b.target
        assert all(t % 2 == 0 for t in src.frame_indices.tolist())  # no held-out frame is a source
        assert src.cam_indices.tolist() == [0, 1, 2] * 3 and len(tgt) % 3 == 0  # frame-major, then camera
        assert set(src.frame_indices.tolist() + tgt.frame_indices.tolist()) <= set(seg.frame_indices)
        kfs = dm.index[2].keyframes
        for views in (src, tgt):
            frames = views.frame_indices.tolist()[::3]
            assert [kfs[k].start <= f < kfs[k].stop for k, f in zip(views.keyframe_indices.tolist(), frames)] == \
                [True] * len(frames)
        scored += list(zip([2] * len(tgt), tgt.frame_indices.tolist(), tgt.cam_indices.tolist()))
        n_sources.append(len(set(src.frame_indices.tolist())))
    assert len(scored) == len(expected) == 60 and set(scored) == expected
    assert set(dm.held_out_views()) == expected and len(dm.held_out_views()) == 60
    assert set(n_sources) == {3}
    _check_plan([p for p in dm.eval_plan()], dm.index[2].keyframes, dm.index[2].segments, 40, 3, dm.input_frames(2))
    # a fresh datamanager: the same plan, the same pixels
    again = list(make_dm(root).eval_batches())
    assert [(b.segment_id, b.source.frame_indices.tolist(), b.target.frame_indices.tolist()) for b in again] == \
        [(p.segment_id, [t for t in p.selection.source_frames for _ in range(3)],
          [t for t in p.selection.target_frames for _ in range(3)]) for p in dm.eval_plan()]


def test_next_eval_cycles_over_the_plan(root):
    dm = make_dm(root)
    plan = dm.eval_plan()
    seen = []
    for k in range(len(plan) + 1):
        cams, b = dm.next_eval(500 * (k + 1))  # the Trainer's evaluation steps are multiples of a period
        assert cams.shape[0] == len(b.target)
        seen.append((b.segment_id, tuple(b.target.frame_indices.tolist()[::3])))
    assert seen[:-1] == [(p.segment_id, p.selection.target_frames) for p in plan] and seen[-1] == seen[0]


def test_without_held_out_frames_every_frame_is_scored_from_other_frames(root):
    # no eval scene: the training scenes are evaluated, every frame is held out, never its own source
    dm = make_dm(root, dataparser=EvolSplatDataParserConfig(eval_scene_ids=()))
    assert dm.eval_scene_ids == [] and dm.train_scene_ids == [0, 1, 2]
    views = dm.held_out_views()
    assert len(views) == len(set(views)) == 3 * 40 * 3
    for p in dm.eval_plan():
        assert not set(p.selection.source_frames) & set(p.selection.target_frames)
    # hold-out 'none' on the eval scene, sources may include the target: each frame is its own nearest source
    dm = make_dm(root, targets_include_sources=True, dataparser=EvolSplatDataParserConfig(eval_holdout="none"))
    assert len(dm.held_out_views()) == 40 * 3
    assert all(set(p.selection.target_frames) <= set(p.selection.source_frames) for p in dm.eval_plan())


def test_viewer_display_batch_is_unchanged(root):
    """The viewer's per-segment reconstruction keeps the fixed spread selection (one batch per segment)."""
    dm = make_dm(root)
    assert dm.eval_keys() == [(2, 0), (2, 1), (2, 2)]
    b = dm.eval_batch(2, 1)
    sel = dm.select(2, 1, None, rule="spread")  # whatever the training rule (view_selection) is
    assert b.source.frame_indices.tolist()[::3] == list(sel.source_frames)
    assert torch.equal(b.source.keyframe_indices, torch.tensor(sel.source_keyframes))
