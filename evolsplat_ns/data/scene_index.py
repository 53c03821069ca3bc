"""Scene index: keyframes (slices of the travelled trajectory) and segments (overlapping windows of them).

A **keyframe** is a contiguous run of frames of one scene. It closes as soon as the front camera has travelled
``keyframe_min_length`` metres, or, when the car barely moves (waiting at a light, in a jam), as soon as it holds
``keyframe_max_frames`` frames; either way it holds at least ``keyframe_min_count`` frames. A moving car reaches the
distance first (at the defaults, 2 m within 10 frames: any speed of 2 m/s = 7.2 km/h or more at 10 Hz), so the frame
limit only changes the keyframes of a slower car: a waiting car gets a keyframe per second of waiting (10 Hz data)
instead of one for the whole wait, so its frames are drawn as sources and targets like the others.
A **segment** is a window of ``keyframes_per_segment`` consecutive keyframes; consecutive segments overlap by
``segment_overlap_ratio`` (clamped to [0, 0.5]) and together they cover every keyframe of the scene: the
last window is aligned to the end of the trajectory rather than dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.data.records import SceneRecord

logger = logging.getLogger(__name__)

MAX_OVERLAP = 0.5


@dataclass(frozen=True)
class Keyframe:
    """Frames ``[start, stop)`` of a scene (frame indices, time order)."""

    index: int
    start: int
    stop: int

    @property
    def frame_indices(self) -> List[int]:
        return list(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Segment:
    """A window of consecutive keyframes of one scene, with the box of its geometry."""

    scene_id: int
    segment_id: int
    keyframe_indices: Tuple[int, ...]
    frame_indices: Tuple[int, ...]
    """Every frame of the segment's keyframes, time order."""
    aabb: Tuple[Tuple[float, float, float], Tuple[float, float, float]]
    """(min xyz, max xyz) in the scene's project frame (OpenCV axes of the first front camera)."""

    @property
    def key(self) -> Tuple[int, int]:
        return (self.scene_id, self.segment_id)


@dataclass
class SceneIndex:
    """Keyframes and segments of one scene."""

    scene: SceneRecord
    keyframes: List[Keyframe]
    segments: List[Segment]

    @property
    def scene_id(self) -> int:
        return self.scene.scene_id


def travelled_distance(centers: np.ndarray) -> np.ndarray:
    """``[T]`` metres travelled along the trajectory ``[T, 3]`` up to each frame (0 at the first frame)."""
    if len(centers) < 2:
        return np.zeros(len(centers))
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(centers, axis=0), axis=1))])


def cut_keyframes(
    centers: np.ndarray, min_length: float, min_count: int = 1, max_frames: Optional[int] = None
) -> List[Keyframe]:
    """Slice a trajectory ``[T, 3]`` (one position per frame, time order) into keyframes.

    A keyframe closes at the first frame at which it spans at least ``min_length`` metres of travel (measured
    from its first frame to the first frame of the next keyframe) **or** ``max_frames`` frames, provided it
    holds at least ``min_count`` frames. ``max_frames`` ``None`` or 0 disables the frame limit (keyframes by
    distance only). The frame limit counts frames, not seconds: what it bounds is how many frames one keyframe
    stands for, which is what source/target sampling sees (it draws one frame per keyframe).

    The rest after the last cut (the tail) has no successor to measure against, so it is measured from its first
    frame to its last, in metres and in frame steps. It stays a keyframe of its own if either reaches half of its
    limit (``min_length / 2`` metres, ``max_frames / 2`` frame steps) and it holds ``min_count`` frames; otherwise
    it is merged into the previous keyframe, so that every frame belongs to exactly one keyframe. Measured like
    that, a car moving at least ``min_length / max_frames`` metres per frame gets exactly the keyframes it gets
    without the frame limit.

    With the frame limit on, every keyframe holds at most ``max(max_frames, min_count)`` frames, except the last
    one when a short tail (at most ``max(ceil(max_frames / 2), min_count - 1)`` frames) was merged into it.
    """
    T = len(centers)
    if T == 0:
        return []
    max_frames = int(max_frames or 0)
    travelled = travelled_distance(centers)

    def long_enough(start: int, end: int) -> bool:
        """Frames ``start`` to ``end`` span a keyframe: ``min_length`` metres or ``max_frames`` frame steps."""
        if travelled[end] - travelled[start] >= min_length:
            return True
        return max_frames > 0 and end - start >= max_frames

    bounds = [0]
    for t in range(1, T):
        start = bounds[-1]
        if t - start >= min_count and long_enough(start, t):
            bounds.append(t)
    # The last keyframe [bounds[-1], T) has no successor to measure against; it is kept if its first-to-last span
    # reaches half a keyframe in metres or in frame steps (and it holds min_count frames), else it is merged into
    # the previous one — never dropped.
    if len(bounds) > 1:
        last = bounds[-1]
        tail_metres = travelled[T - 1] - travelled[last]
        tail_steps = T - 1 - last
        half_long = tail_metres >= 0.5 * min_length or (max_frames > 0 and tail_steps >= 0.5 * max_frames)
        if not half_long or T - last < min_count:
            bounds.pop()
    bounds.append(T)
    return [Keyframe(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def window_starts(num_keyframes: int, window: int, overlap_ratio: float) -> List[int]:
    """Start keyframe of each segment window; the last window ends at the last keyframe."""
    overlap_ratio = float(min(max(overlap_ratio, 0.0), MAX_OVERLAP))
    if num_keyframes <= window:
        return [0]
    stride = max(1, int(round(window * (1.0 - overlap_ratio))))
    starts = list(range(0, num_keyframes - window + 1, stride))
    if starts[-1] + window < num_keyframes:
        starts.append(num_keyframes - window)
    return starts


def segment_aabb(
    scene: SceneRecord,
    frame_indices: Sequence[int],
    far: float,
    vertical: Tuple[float, float],
) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """Box of what the segment's cameras see: the union of their frusta cut at ``far`` metres.

    The vertical extent (project-frame y, which points down like the first front camera's y) is then limited
    to ``[mean camera y + vertical[0], mean camera y + vertical[1]]`` (the reference crops its box to
    [-9, 3.8] m around the camera height the same way).
    """
    pts = []
    cam_y = []
    for t in frame_indices:
        for rec in scene.frame_images(t):
            K_inv = np.linalg.inv(rec.K)
            corners = np.array([[0, 0, 1], [rec.width, 0, 1], [0, rec.height, 1], [rec.width, rec.height, 1]], float)
            rays = corners @ K_inv.T  # z = 1
            cam_pts = np.concatenate([np.zeros((1, 3)), rays * far], axis=0)
            pts.append(cam_pts @ rec.c2w[:3, :3].T + rec.c2w[:3, 3])
            cam_y.append(rec.c2w[1, 3])
    allp = np.concatenate(pts, axis=0)
    lo = allp.min(axis=0)
    hi = allp.max(axis=0)
    y0 = float(np.mean(cam_y))
    lo[1] = max(lo[1], y0 + vertical[0])
    hi[1] = min(hi[1], y0 + vertical[1])
    if hi[1] <= lo[1]:
        lo[1], hi[1] = y0 + vertical[0], y0 + vertical[1]
    return (tuple(float(x) for x in lo), tuple(float(x) for x in hi))  # type: ignore[return-value]


@dataclass
class IndexOptions:
    """How a scene is cut into keyframes and segments (see :func:`cut_keyframes` and :func:`window_starts`)."""

    keyframe_min_length: float = 2.0
    keyframe_min_count: int = 1
    keyframe_max_frames: int = 10
    """A keyframe closes after this many frames even if the car has not moved ``keyframe_min_length``; 0: off."""
    min_keyframes_per_scene: int = 10
    keyframes_per_segment: int = 10
    min_keyframes_per_segment: int = 6
    segment_overlap_ratio: float = 0.5
    aabb_far: float = 40.0
    aabb_vertical: Tuple[float, float] = (-9.0, 3.8)


def keyframe_rule(opts: IndexOptions) -> str:
    """The keyframe rule in words, for messages: ``"2.0 m or 10 frames"``."""
    rule = f"{opts.keyframe_min_length:g} m"
    if opts.keyframe_max_frames:
        rule += f" or {opts.keyframe_max_frames} frames"
    return rule


def index_scene(scene: SceneRecord, opts: IndexOptions) -> Optional[SceneIndex]:
    """Keyframes and segments of one scene, or ``None`` (with a warning) if the scene is too short."""
    keyframes = cut_keyframes(
        scene.front_centers(), opts.keyframe_min_length, opts.keyframe_min_count, opts.keyframe_max_frames
    )
    if len(keyframes) < opts.min_keyframes_per_scene:
        logger.warning(
            "Skipping scene %d (%s): %d keyframes (%s), fewer than min_keyframes_per_scene=%d",
            scene.scene_id,
            scene.root,
            len(keyframes),
            keyframe_rule(opts),
            opts.min_keyframes_per_scene,
        )
        return None
    window = max(opts.keyframes_per_segment, opts.min_keyframes_per_segment)
    segments = []
    for seg_id, start in enumerate(window_starts(len(keyframes), window, opts.segment_overlap_ratio)):
        kfs = keyframes[start : start + window]
        if len(kfs) < opts.min_keyframes_per_segment:
            # Only possible when the whole scene is shorter than one window: then it is the only segment.
            logger.warning(
                "Skipping scene %d (%s): %d keyframes, fewer than min_keyframes_per_segment=%d",
                scene.scene_id,
                scene.root,
                len(kfs),
                opts.min_keyframes_per_segment,
            )
            return None
        frames = tuple(t for kf in kfs for t in kf.frame_indices)
        segments.append(
            Segment(
                scene_id=scene.scene_id,
                segment_id=seg_id,
                keyframe_indices=tuple(kf.index for kf in kfs),
                frame_indices=frames,
                aabb=segment_aabb(scene, frames, opts.aabb_far, opts.aabb_vertical),
            )
        )
    return SceneIndex(scene=scene, keyframes=keyframes, segments=segments)
