"""The evaluation plan: which batches score every held-out image of the evaluation scenes exactly once.

Kept beside :mod:`evolsplat_ns.data.sampling` (training and viewer selections) and apart from datasets and the
model. A plan is a deterministic function of the scene index (keyframes, segments), the scene's input frames and
three options; nothing is random.

* **Held-out images.** Every camera's image of every *held-out frame*: the frames that are not input frames of
  the scene (``input_frames``, e.g. the odd frames under the 'odd' / Drop50 protocol). When every frame may be an
  input (``input_frames`` is ``None``: hold-out 'none', or evaluation on training scenes) every frame is held out,
  and its sources are then other frames than itself unless ``targets_include_sources``.
* **Segment.** A held-out frame is scored in exactly one segment: among the segments whose frames contain it, the
  one whose frame span ``[first, last]`` is most centred on it (smallest ``|t - (first + last) / 2|``); ties go to
  the lower segment id. Segments overlap, so without this a frame could be scored twice or never.
* **Sources.** The ``num_source_frames`` input frames of that segment nearest to the held-out frame in time
  (``|frame index difference|``; ties go to the earlier frame), all cameras of each, in time order (frame-major,
  then camera, as every batch). So a view is reconstructed from the inputs around it, wherever keyframes were cut
  (two sources may come from the same keyframe: a car standing still makes one long keyframe).
* **Batches.** Held-out frames of one segment with the same source frames share one batch (its targets are all
  cameras of those frames, in time order), so a reconstruction serves them all; otherwise one batch per held-out
  frame. Batches are ordered by scene (in the order given), then segment id, then first target frame.

A batch carries the keyframe holding each of its frames (``ViewSelection.source_keyframes`` /
``target_keyframes``, one entry per frame, possibly repeated), as every :class:`SegmentBatch` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple

from evolsplat_ns.errors import ConfigError
from evolsplat_ns.data.sampling import ViewSelection, nearest_frames
from evolsplat_ns.data.scene_index import Keyframe, Segment


@dataclass(frozen=True)
class PlannedBatch:
    """One evaluation batch: a segment, its source frames and the held-out frames it scores."""

    scene_id: int
    segment_id: int
    selection: ViewSelection


def held_out_frames(num_frames: int, input_frames: Optional[AbstractSet[int]]) -> List[int]:
    """Frames of a scene whose images are scored: those that are not inputs (all frames if ``input_frames`` is
    ``None``), time order."""
    return [t for t in range(num_frames) if input_frames is None or t not in input_frames]


def scoring_segment(frame: int, segments: Sequence[Segment]) -> Segment:
    """The segment that scores ``frame``: the one containing it whose frame span is most centred on it (ties: the
    lower segment id)."""
    best: Optional[Tuple[int, int]] = None
    chosen: Optional[Segment] = None
    for seg in segments:
        if frame not in seg.frame_indices:
            continue
        # twice the distance to the span's centre: integer arithmetic, so that ties are exact
        key = (abs(2 * frame - (seg.frame_indices[0] + seg.frame_indices[-1])), seg.segment_id)
        if best is None or key < best:
            best, chosen = key, seg
    if chosen is None:
        scene = segments[0].scene_id if segments else "?"
        raise ConfigError(f"scene {scene}: frame {frame} lies in no segment; cannot evaluate it")
    return chosen


def nearest_sources(frame: int, segment: Segment, num_source_frames: int,
                    input_frames: Optional[AbstractSet[int]], include_self: bool = False) -> Tuple[int, ...]:
    """The ``num_source_frames`` input frames of ``segment`` nearest to ``frame`` (ties: the earlier frame), in
    time order. ``frame`` itself is a candidate only when ``include_self``."""
    cands = [t for t in segment.frame_indices
             if (input_frames is None or t in input_frames) and (include_self or t != frame)]
    if len(cands) < num_source_frames:
        raise ConfigError(
            f"scene {segment.scene_id} segment {segment.segment_id}: held-out frame {frame} needs "
            f"num_source_keyframes={num_source_frames} input frames in its segment (frames "
            f"{segment.frame_indices[0]}..{segment.frame_indices[-1]}) but there are {len(cands)}; lower "
            f"num_source_keyframes or use longer segments (keyframes_per_segment)"
        )
    return tuple(sorted(nearest_frames(frame, cands, num_source_frames)))


def plan_scene(
    keyframes: Sequence[Keyframe],
    segments: Sequence[Segment],
    num_frames: int,
    num_source_frames: int,
    input_frames: Optional[AbstractSet[int]],
    targets_include_sources: bool = False,
) -> List[PlannedBatch]:
    """The evaluation batches of one scene (see the module docstring).

    Args:
        keyframes: all keyframes of the scene (``Keyframe.index`` = position), covering every frame.
        segments: all segments of the scene.
        num_frames: frames of the scene.
        num_source_frames: source frames per batch (the datamanager's ``num_source_keyframes``).
        input_frames: frames that may be sources (``None``: all).
        targets_include_sources: with ``input_frames=None``, a held-out frame may be its own source.
    """
    if num_source_frames < 1:
        raise ConfigError("num_source_keyframes must be >= 1")
    keyframe_of: Dict[int, int] = {t: kf.index for kf in keyframes for t in kf.frame_indices}
    groups: Dict[Tuple[int, Tuple[int, ...]], List[int]] = {}
    for t in held_out_frames(num_frames, input_frames):
        seg = scoring_segment(t, segments)
        src = nearest_sources(t, seg, num_source_frames, input_frames,
                              include_self=input_frames is None and targets_include_sources)
        groups.setdefault((seg.segment_id, src), []).append(t)
    out = []
    for (seg_id, src), targets in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0])):
        sel = ViewSelection(
            source_keyframes=tuple(keyframe_of[t] for t in src),
            source_frames=src,
            target_keyframes=tuple(keyframe_of[t] for t in targets),
            target_frames=tuple(targets),
        )
        out.append(PlannedBatch(scene_id=segments[0].scene_id, segment_id=seg_id, selection=sel))
    return out
