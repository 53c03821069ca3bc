"""Keyframes and segments: coverage of the whole trajectory, overlap, minimum counts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.data.scene_index import IndexOptions, Keyframe, cut_keyframes, index_scene, window_starts
from scene_fixtures import write_scene


def _trajectory(steps):
    return np.concatenate([[[0.0, 0.0, 0.0]], np.cumsum(np.stack([steps, 0 * steps, 0 * steps], 1), 0)])


def _check_partition(kfs, T):
    """Contiguous, in time order, every frame in exactly one keyframe."""
    assert kfs[0].start == 0 and kfs[-1].stop == T
    for i, (a, b) in enumerate(zip(kfs, kfs[1:])):
        assert a.stop == b.start and a.index == i
    assert [t for kf in kfs for t in kf.frame_indices] == list(range(T))


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.05), st.floats(0.0, 3.0)), min_size=0, max_size=80),
    min_length=st.floats(0.1, 5.0),
    min_count=st.integers(1, 4),
    max_frames=st.sampled_from([None, 0, 1, 2, 3, 5, 10]),
)
def test_keyframes_partition_the_trajectory(steps, min_length, min_count, max_frames):
    centers = _trajectory(np.array(steps, dtype=float))
    T = len(centers)
    kfs = cut_keyframes(centers, min_length, min_count, max_frames)
    _check_partition(kfs, T)
    travelled = np.concatenate([[0.0], np.cumsum(np.abs(steps))]) if steps else np.zeros(1)
    M = max_frames or 0
    for kf in kfs[:-1]:
        # every closed keyframe spans >= min_length to the next keyframe's start, or holds max_frames frames (only when
        # the frame limit is on), and holds >= min_count frames
        assert travelled[kf.stop] - travelled[kf.start] >= min_length - 1e-9 or (M and len(kf) == max(M, min_count))
        assert len(kf) >= min_count
        if M:
            assert len(kf) <= max(M, min_count)
    if len(kfs) > 1:
        assert len(kfs[-1]) >= min_count  # a tail too short for min_count was merged
        if M:
            assert len(kfs[-1]) <= max(M, min_count) + max(int(np.ceil(M / 2)), min_count - 1)
    if not M:
        return
    # the frame limit only adds cuts where the distance rule made a keyframe of more than max_frames frames: if it made
    # none, the keyframes are the same, except that a slow tail the distance rule merged may stay on its own (it spans
    # half of max_frames)
    without = cut_keyframes(centers, min_length, min_count)
    if min_count <= M and all(len(kf) <= M for kf in without):
        n = len(without)
        assert kfs[: n - 1] == without[: n - 1] and len(kfs) in (n, n + 1)
        assert kfs[n - 1].start == without[-1].start


@settings(max_examples=200, deadline=None)
@given(
    extra=st.lists(st.floats(0.0, 2.0), min_size=0, max_size=80),
    min_length=st.floats(0.1, 5.0),
    min_count=st.integers(1, 4),
    max_frames=st.integers(1, 12),
)
def test_a_moving_car_keeps_its_distance_keyframes(extra, min_length, min_count, max_frames):
    # every step at least min_length / max_frames (a hair more, against rounding): the distance rule always closes a
    # keyframe within max_frames frames, so the frame limit changes nothing, the tail rule included
    steps = min_length / max_frames * (1 + 1e-6) + np.array(extra, dtype=float)
    centers = _trajectory(steps)
    assert cut_keyframes(centers, min_length, min_count, max_frames) == cut_keyframes(centers, min_length, min_count)


def _wait_then_drive(wait=35, drive_frames=45, metres=20.0, jitter=0.0, seed=0):
    """PandaSet 002's front camera: still for ``wait`` frames, then ``metres`` of travel over ``drive_frames``."""
    steps = np.concatenate([np.zeros(wait - 1), np.full(drive_frames, metres / drive_frames)])
    centers = _trajectory(steps)
    if jitter:  # a parked car's poses are not exactly equal (localisation noise)
        centers = centers + np.random.default_rng(seed).normal(0.0, jitter, centers.shape)
    return centers


@pytest.mark.parametrize("jitter", [0.0, 0.005])
def test_a_waiting_car_gets_keyframes_over_the_whole_wait(jitter):
    centers = _wait_then_drive(jitter=jitter)
    T = len(centers)
    assert T == 80
    kfs = cut_keyframes(centers, 2.0, 1, 10)
    _check_partition(kfs, T)
    assert max(len(k) for k in kfs) <= 10
    # the 35 waiting frames: a keyframe per 10 frames, then one that ends once the car has driven 2 m
    assert [(k.start, k.stop) for k in kfs[:3]] == [(0, 10), (10, 20), (20, 30)]
    assert kfs[3].start == 30 and kfs[3].stop > 35
    # then distance keyframes, as without the frame limit: 0.44 m per frame is 5 frames per 2 m (the last one holds
    # the merged one-frame tail)
    assert [len(k) for k in kfs[4:]] == [5] * 7 + [6]
    if not jitter:  # (with jitter the distance rule alone counts the jitter of the whole wait and cuts a frame earlier)
        assert kfs[4:] == [Keyframe(k.index + 3, k.start, k.stop) for k in cut_keyframes(centers, 2.0)[1:]]
    # sampling draws one frame per keyframe: the wait now holds 4 of 12 keyframes, not 1 of 9
    assert sum(k.start < 35 for k in kfs) == 4 and len(kfs) == 12


def test_frame_limit_off_is_the_distance_rule():
    centers = _wait_then_drive()
    old = cut_keyframes(centers, 2.0)
    assert cut_keyframes(centers, 2.0, 1, 0) == cut_keyframes(centers, 2.0, 1, None) == old
    # the whole wait is one keyframe (it ends 2 m after the car drives off)
    assert (old[0].start, old[0].stop) == (0, 39) and len(old) == 9
    # what IndexOptions(keyframe_max_frames=0) passes on
    assert IndexOptions(keyframe_max_frames=0).keyframe_max_frames == 0 and IndexOptions().keyframe_max_frames == 10


@pytest.mark.parametrize(
    "T, spans",
    [
        (80, [(70, 80)]),  # a full last keyframe
        (76, [(70, 76)]),  # a tail spanning 5 frame steps (half of 10) is a keyframe of its own
        (75, [(60, 75)]),  # 4 frame steps: shorter than half a keyframe in frames and in metres, merged
        (71, [(60, 71)]),  # a single frame: merged
    ],
)
def test_a_short_tail_of_a_waiting_car_is_merged(T, spans):
    kfs = cut_keyframes(np.zeros((T, 3)), 2.0, 1, 10)
    _check_partition(kfs, T)
    assert [(k.start, k.stop) for k in kfs[-len(spans):]] == spans
    assert all(len(k) == 10 for k in kfs[:-1])


def test_min_count_still_wins():
    # min_count 4, frame limit 4: a 3-frame tail spans 2 frame steps (half of 4) but holds fewer than min_count
    # frames, so it joins the previous keyframe
    kfs = cut_keyframes(np.zeros((23, 3)), 2.0, 4, 4)
    _check_partition(kfs, 23)
    assert [len(k) for k in kfs] == [4, 4, 4, 4, 7]
    # one frame more: a keyframe of its own
    assert [len(k) for k in cut_keyframes(np.zeros((24, 3)), 2.0, 4, 4)] == [4] * 6
    # a frame limit below min_count (the datamanager refuses it): min_count wins, keyframes of min_count frames
    assert [len(k) for k in cut_keyframes(np.zeros((12, 3)), 2.0, 3, 2)] == [3] * 4


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


