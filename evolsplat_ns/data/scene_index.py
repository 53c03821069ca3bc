"""Scene index: keyframes (slices of the travelled trajectory) and segments (overlapping windows of them).

A **keyframe** is a contiguous run of frames of one scene during which the front camera travels at least
``keyframe_min_length`` metres (and which holds at least ``keyframe_min_count`` frames). A **segment** is a
window of ``keyframes_per_segment`` consecutive keyframes; consecutive segments overlap by
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


def cut_keyframes(centers: np.ndarray, min_length: float, min_count: int = 1) -> List[Keyframe]:
    """Slice a trajectory ``[T, 3]`` into keyframes by travelled distance.

    A keyframe closes as soon as it spans at least ``min_length`` metres of travel (measured from its first
    frame to the first frame of the next keyframe) and holds at least ``min_count`` frames. A short tail
    is merged into the last keyframe so that every frame belongs to exactly one keyframe.
    """
    T = len(centers)
    if T == 0:
        return []
    step = np.linalg.norm(np.diff(centers, axis=0), axis=1) if T > 1 else np.zeros(0)
    travelled = np.concatenate([[0.0], np.cumsum(step)])
    bounds = [0]
    for t in range(1, T):
        start = bounds[-1]
        if travelled[t] - travelled[start] >= min_length and t - start >= min_count:
            bounds.append(t)
    # The last keyframe [bounds[-1], T) has no successor to measure its travel against; it is kept if it spans
    # at least half a keyframe (and holds min_count frames), else merged into the previous one — never dropped.
    if len(bounds) > 1:
        last = bounds[-1]
        tail_len = travelled[T - 1] - travelled[last]
        if tail_len < 0.5 * min_length or T - last < min_count:
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
    keyframe_min_length: float = 2.0
    keyframe_min_count: int = 1
    min_keyframes_per_scene: int = 10
    keyframes_per_segment: int = 10
    min_keyframes_per_segment: int = 6
    segment_overlap_ratio: float = 0.5
    aabb_far: float = 40.0
    aabb_vertical: Tuple[float, float] = (-9.0, 3.8)


def index_scene(scene: SceneRecord, opts: IndexOptions) -> Optional[SceneIndex]:
    """Keyframes and segments of one scene, or ``None`` (with a warning) if the scene is too short."""
    keyframes = cut_keyframes(scene.front_centers(), opts.keyframe_min_length, opts.keyframe_min_count)
    if len(keyframes) < opts.min_keyframes_per_scene:
        logger.warning(
            "Skipping scene %d (%s): %d keyframes of %.1f m, fewer than min_keyframes_per_scene=%d",
            scene.scene_id,
            scene.root,
            len(keyframes),
            opts.keyframe_min_length,
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
