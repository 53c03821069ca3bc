"""Which views of a segment are the network's input (sources) and which supervise it (targets).

Kept apart from file reading (``views.py``) and from the model, as in MVSplat. Every camera of a chosen frame is
used (frame-major, then camera). Targets are frames other than the sources unless ``targets_include_sources``. Two
rules (``DataManagerConfig.view_selection``):

* ``"spread"`` (the design document's): ``num_source_keyframes`` keyframes spread over the segment (one per stratum
  of consecutive keyframes) and ``num_target_keyframes`` others anywhere in it, one frame from each. Sources and
  targets can lie a whole segment (~20 m) apart.
* ``"near"`` (:func:`select_near`): an anchor frame, its nearest input frames as the sources and the frames nearest
  to it as the targets: what evaluation asks of the network (:mod:`evolsplat_ns.data.eval_plan` reconstructs each
  held-out frame from the input frames nearest to it), so training and evaluation see the same source-to-target
  distances. On a real street a segment's far targets show other cars and other occlusions than its sources; the
  spread rule then rewards a blur (docs/REAL_DATA.md).

Training selections are random but a pure function of ``(seed, step)``; evaluation selections (``rng=None``)
are fixed: the middle of each stratum, evenly spaced targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, List, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.errors import ConfigError
from evolsplat_ns.data.scene_index import Keyframe, Segment


@dataclass(frozen=True)
class ViewSelection:
    """Chosen keyframes and frames (scene-level indices), each list in time order."""

    source_keyframes: Tuple[int, ...]
    source_frames: Tuple[int, ...]
    target_keyframes: Tuple[int, ...]
    target_frames: Tuple[int, ...]


def nearest_frames(frame: int, candidates: Sequence[int], n: int) -> List[int]:
    """The ``n`` candidates nearest to ``frame`` in time (``|index difference|``; ties: the earlier frame), nearest
    first."""
    return sorted(candidates, key=lambda t: (abs(t - frame), t))[:n]


def _pick(options: Sequence[int], rng: Optional[np.random.Generator]) -> int:
    if rng is None:
        return options[(len(options) - 1) // 2]
    return options[int(rng.integers(len(options)))]


def select_views(
    keyframes: Sequence[Keyframe],
    segment: Segment,
    num_source_keyframes: int,
    num_target_keyframes: int,
    rng: Optional[np.random.Generator] = None,
    input_frames: Optional[AbstractSet[int]] = None,
    target_frames: Optional[AbstractSet[int]] = None,
    targets_include_sources: bool = False,
) -> ViewSelection:
    """Select source and target frames of one segment.

    Args:
        keyframes: all keyframes of the scene (indexed by ``Keyframe.index``).
        segment: the segment to draw from.
        rng: random generator for training; ``None`` gives the fixed evaluation selection.
        input_frames: frames allowed as sources (``None``: all). Evaluation scenes pass their input frames so
            that held-out test frames never reach the network.
        target_frames: frames allowed as targets (``None``: all).
    """
    kfs = [keyframes[i] for i in segment.keyframe_indices]
    where = f"scene {segment.scene_id} segment {segment.segment_id}"
    if num_source_keyframes < 1 or num_target_keyframes < 1:
        raise ConfigError("num_source_keyframes and num_target_keyframes must be >= 1")
    if num_source_keyframes > len(kfs):
        raise ConfigError(
            f"{where}: num_source_keyframes={num_source_keyframes} but the segment has only {len(kfs)} keyframes"
        )

    def allowed_inputs(kf: Keyframe) -> List[int]:
        return [t for t in kf.frame_indices if input_frames is None or t in input_frames]

    # Sources: one per stratum of consecutive keyframes, so that they spread over the segment.
    strata = np.array_split(np.arange(len(kfs)), num_source_keyframes)
    src_kf: List[int] = []
    src_fr: List[int] = []
    for stratum in strata:
        cands = [int(p) for p in stratum if allowed_inputs(kfs[int(p)])]
        if not cands:  # fall back to any unused keyframe with input frames
            cands = [p for p in range(len(kfs)) if allowed_inputs(kfs[p]) and kfs[p].index not in src_kf]
        if not cands:
            raise ConfigError(
                f"{where}: cannot find {num_source_keyframes} keyframes with input frames "
                f"(keyframes {list(segment.keyframe_indices)}); lower num_source_keyframes"
            )
        p = _pick(cands, rng)
        src_kf.append(kfs[p].index)
        src_fr.append(_pick(allowed_inputs(kfs[p]), rng))
    sources = set(src_fr)

    def allowed_targets(kf: Keyframe) -> List[int]:
        out = [t for t in kf.frame_indices if target_frames is None or t in target_frames]
        if not targets_include_sources:
            out = [t for t in out if t not in sources]
        return out

    cands = [p for p in range(len(kfs)) if allowed_targets(kfs[p])]
    if len(cands) < num_target_keyframes:
        raise ConfigError(
            f"{where}: num_target_keyframes={num_target_keyframes} but only {len(cands)} keyframes have frames "
            f"that are not sources; lower num_target_keyframes, use longer segments (keyframes_per_segment) "
            f"or set targets_include_sources"
        )
    if rng is None:
        chosen = [cands[int(round(x))] for x in np.linspace(0, len(cands) - 1, num_target_keyframes)]
    else:
        chosen = sorted(int(x) for x in rng.choice(cands, size=num_target_keyframes, replace=False))
    tgt_kf = [kfs[p].index for p in chosen]
    tgt_fr = [_pick(allowed_targets(kfs[p]), rng) for p in chosen]
    return ViewSelection(tuple(src_kf), tuple(src_fr), tuple(tgt_kf), tuple(tgt_fr))


def select_near(
    keyframes: Sequence[Keyframe],
    segment: Segment,
    num_source_frames: int,
    num_target_frames: int,
    rng: Optional[np.random.Generator] = None,
    input_frames: Optional[AbstractSet[int]] = None,
    target_frames: Optional[AbstractSet[int]] = None,
    targets_include_sources: bool = False,
) -> ViewSelection:
    """Sources and targets around one anchor frame of ``segment`` (the ``"near"`` rule of the module docstring).

    The anchor is a random target candidate (``rng``), or the middle one (``rng=None``). Sources: the
    ``num_source_frames`` input frames nearest to the anchor (ties: the earlier frame; the anchor itself only with
    ``targets_include_sources``). Targets: the ``num_target_frames`` target candidates nearest to the anchor, the
    anchor first (ties: the earlier frame). Frames, not keyframes, are counted, so a keyframe may give several; each
    list is in time order, with each frame's keyframe beside it.
    """
    where = f"scene {segment.scene_id} segment {segment.segment_id}"
    if num_source_frames < 1 or num_target_frames < 1:
        raise ConfigError("num_source_keyframes and num_target_keyframes must be >= 1")
    keyframe_of = {t: i for i in segment.keyframe_indices for t in keyframes[i].frame_indices}
    frames = [t for t in segment.frame_indices if t in keyframe_of]
    inputs = [t for t in frames if input_frames is None or t in input_frames]
    allowed = [t for t in frames if target_frames is None or t in target_frames]
    if len(inputs) < num_source_frames or not allowed:
        raise ConfigError(f"{where}: num_source_keyframes={num_source_frames} needs that many input frames and one "
                          f"target frame; the segment has {len(inputs)} input and {len(allowed)} target frames")
    # an anchor that leaves enough input frames as sources besides itself (unless sources may be targets)
    input_set = set(inputs)
    anchors = [t for t in allowed
               if len(inputs) - (t in input_set and not targets_include_sources) >= num_source_frames]
    if not anchors:
        raise ConfigError(f"{where}: no target frame leaves {num_source_frames} other input frames as sources")
    anchor = _pick(anchors, rng)
    src = sorted(nearest_frames(anchor, [t for t in inputs if targets_include_sources or t != anchor],
                                num_source_frames))
    cands = [t for t in allowed if targets_include_sources or t not in src]
    if len(cands) < num_target_frames:
        raise ConfigError(
            f"{where}: num_target_keyframes={num_target_frames} but only {len(cands)} frames are not sources; lower "
            f"num_target_keyframes or set targets_include_sources"
        )
    tgt = sorted(nearest_frames(anchor, cands, num_target_frames))
    return ViewSelection(tuple(keyframe_of[t] for t in src), tuple(src), tuple(keyframe_of[t] for t in tgt), tuple(tgt))


def min_target_candidates(keyframes: Sequence[Keyframe], segment: Segment, num_source_keyframes: int,
                          input_frames: Optional[AbstractSet[int]], target_frames: Optional[AbstractSet[int]],
                          targets_include_sources: bool) -> int:
    """Worst case over source choices of the number of keyframes that can still give a target frame."""
    n = 0
    worst_loss = 0
    for i in segment.keyframe_indices:
        kf = keyframes[i]
        tg = [t for t in kf.frame_indices if target_frames is None or t in target_frames]
        if not tg:
            continue
        n += 1
        ins = [t for t in kf.frame_indices if input_frames is None or t in input_frames]
        # A source taken from this keyframe removes it as a target candidate iff it is its only target frame.
        if not targets_include_sources and len(tg) == 1 and tg[0] in ins:
            worst_loss += 1
    return n - min(worst_loss, num_source_keyframes)


def source_windows(
    keyframes: Sequence[Keyframe],
    segment: Segment,
    num_source_frames: int,
    input_frames: Optional[AbstractSet[int]] = None,
) -> List[ViewSelection]:
    """Every distinct window of ``num_source_frames`` input frames that the ``"near"`` rule can give in ``segment``:
    the input frames nearest to each of its input frames in turn (that frame included), in time order, without
    repeats. Each window is a selection whose target is the frame it was centred on (a reconstruction reads only
    the sources). They cover the segment's time span window by window: what one reconstruction sees at one time
    (a car that drove on) and what all of them see (the street) can then be told apart
    (:mod:`evolsplat_ns.finetune.merge`)."""
    where = f"scene {segment.scene_id} segment {segment.segment_id}"
    keyframe_of = {t: i for i in segment.keyframe_indices for t in keyframes[i].frame_indices}
    inputs = [t for t in segment.frame_indices if t in keyframe_of and (input_frames is None or t in input_frames)]
    if num_source_frames < 1 or len(inputs) < num_source_frames:
        raise ConfigError(f"{where}: a window of {num_source_frames} source frames needs that many input frames; the "
                          f"segment has {len(inputs)}")
    out: List[ViewSelection] = []
    seen = set()
    for anchor in sorted(inputs):
        src = tuple(sorted(nearest_frames(anchor, inputs, num_source_frames)))
        if src in seen:
            continue
        seen.add(src)
        out.append(ViewSelection(tuple(keyframe_of[t] for t in src), src, (keyframe_of[anchor],), (anchor,)))
    return out

