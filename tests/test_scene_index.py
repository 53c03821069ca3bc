"""Keyframes and segments: coverage of the whole trajectory, overlap, minimum counts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.data.scene_index import IndexOptions, cut_keyframes, index_scene, window_starts
from scene_fixtures import write_scene


def _trajectory(steps):
    return np.concatenate([[[0.0, 0.0, 0.0]], np.cumsum(np.stack([steps, 0 * steps, 0 * steps], 1), 0)])


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.floats(0.0, 3.0), min_size=0, max_size=80),
    min_length=st.floats(0.1, 5.0),
    min_count=st.integers(1, 4),
)
def test_keyframes_partition_the_trajectory(steps, min_length, min_count):
    centers = _trajectory(np.array(steps, dtype=float))
    kfs = cut_keyframes(centers, min_length, min_count)
    # contiguous, in order, covering every frame exactly once
    assert kfs[0].start == 0 and kfs[-1].stop == len(centers)
    for a, b in zip(kfs, kfs[1:]):
        assert a.stop == b.start
    travelled = np.concatenate([[0.0], np.cumsum(np.abs(steps))]) if steps else np.zeros(1)
    for kf in kfs[:-1] if len(kfs) > 1 else []:
        # every closed keyframe spans >= min_length to the next keyframe's start and holds >= min_count frames
        assert travelled[kf.stop] - travelled[kf.start] >= min_length - 1e-9
        assert len(kf) >= min_count


def test_keyframes_of_a_regular_drive():
    kfs = cut_keyframes(_trajectory(np.ones(39)), 2.0)
    assert len(kfs) == 20 and all(len(k) == 2 for k in kfs)  # 40 frames, 1 m apart
    # a short tail is merged into the last keyframe, not dropped
    kfs = cut_keyframes(_trajectory(np.ones(40)), 2.0)
    assert kfs[-1].stop == 41 and len(kfs[-1]) == 3


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), window=st.integers(1, 20), overlap=st.floats(-1.0, 1.0))
def test_windows_cover_everything_with_bounded_overlap(n, window, overlap):
    starts = window_starts(n, window, overlap)
    covered = set()
    for s in starts:
        covered |= set(range(s, min(s + window, n)))
    assert covered == set(range(n))
    assert starts == sorted(set(starts)) and starts[0] == 0
    if n > window:
        assert starts[-1] + window == n  # the last window is aligned with the end: no dropped tail
        clamped = min(max(overlap, 0.0), 0.5)
        stride = max(1, int(round(window * (1 - clamped))))
        for a, b in zip(starts[:-1], starts[1:-1]):
            assert b - a == stride
        # overlap never exceeds the clamp (except the end-aligned last window)
        for a, b in zip(starts[:-2], starts[1:-1]):
            assert (a + window - b) <= max(0.5 * window, window - 1) + 1e-9


def test_index_scene_segments_and_boxes(tmp_path):
    sc = parse_scene(write_scene(tmp_path / "s", num_frames=40, num_cams=2), 0)
    idx = index_scene(sc, IndexOptions(keyframes_per_segment=10, segment_overlap_ratio=0.5))
    assert len(idx.keyframes) == 20
    assert [s.keyframe_indices[0] for s in idx.segments] == [0, 5, 10]
    frames = set()
    for seg in idx.segments:
        assert len(seg.keyframe_indices) >= 6
        frames |= set(seg.frame_indices)
        lo, hi = np.array(seg.aabb[0]), np.array(seg.aabb[1])
        assert np.all(hi > lo)
        # every camera centre of the segment lies in its box
        for t in seg.frame_indices:
            for r in sc.frame_images(t):
                assert np.all(r.center >= lo - 1e-6) and np.all(r.center <= hi + 1e-6)
        assert hi[1] - lo[1] == pytest.approx(12.8)  # vertical extent [-9, 3.8] around the camera height
    assert frames == set(range(40))


def test_short_scene_is_skipped_with_warning(tmp_path, caplog):
    sc = parse_scene(write_scene(tmp_path / "short", num_frames=8, num_cams=1), 0)
    with caplog.at_level("WARNING"):
        assert index_scene(sc, IndexOptions(min_keyframes_per_scene=10)) is None
    assert "short" in caplog.text and "min_keyframes_per_scene" in caplog.text
