"""``evolsplat-ns-inspect``: what the data side sees.

Scenes used and skipped (and why), keyframes (frame spans, frames and metres each) and segments per scene with
their boxes, and one sample batch's tensor shapes — as tables, or as JSON with ``--json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import tyro

from evolsplat_ns.errors import run_cli
from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig


@dataclass
class InspectArgs:
    data: Path
    """Data root or scene folder, in any layout (multiscene, reference, drivestudio, pandaset, kitti-raw; auto-detected,
    or forced with --datamanager.dataparser.layout)."""
    json: bool = False
    """Print JSON instead of tables."""
    verbose: bool = False
    """Show tracebacks for bad input."""
    datamanager: EvolSplatDataManagerConfig = field(default_factory=EvolSplatDataManagerConfig)
    """Data options, as for ns-train (--datamanager.num-source-keyframes ...)."""


def inspect_data(args: InspectArgs) -> Dict[str, object]:
    """Build the data side and summarise it (scenes, segments, one sample batch)."""
    cfg = args.datamanager
    cfg.data = args.data
    dm = cfg.setup(device="cpu", test_mode="val")
    summary = dm.summary()
    state = dm.scheduler.state_dict()
    _, batch = dm.next_train(0)
    dm.scheduler.load_state_dict(state)  # inspecting must not advance anything persistent
    summary["sample_batch"] = {
        "scene_id": batch.scene_id,
        "segment_id": batch.segment_id,
        "is_new_segment": batch.is_new_segment,
        **batch.shapes(),
        "source_frames": batch.source.frame_indices.tolist(),
        "target_frames": batch.target.frame_indices.tolist(),
    }
    summary["options"] = {
        k: getattr(cfg, k)
        for k in (
            "num_source_keyframes", "num_target_keyframes", "keyframe_min_length", "keyframe_min_count",
            "keyframe_max_frames", "keyframes_per_segment",
            "min_keyframes_per_segment", "min_keyframes_per_scene", "segment_overlap_ratio", "batches_per_segment",
            "segment_order", "scene_order",
        )
    }
    return summary


def _print_tables(s: Dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"Scenes in {s['data']}")
    for col in ("id", "name", "layout", "role", "frames", "cameras", "size", "keyframes", "segments", "note"):
        t.add_column(col)
    for sc in s["scenes"]:  # type: ignore[union-attr]
        size = sc.get("image_size")
        t.add_row(str(sc["scene_id"]), sc["name"], str(sc.get("layout", "")) + (" +lidar" if sc.get("lidar") else ""),
                  sc["role"], str(sc["num_frames"]), str(sc["num_cameras"]), f"{size[0]}x{size[1]}" if size else "",
                  str(sc["num_keyframes"]), str(len(sc["segments"])), sc.get("skipped", ""))
    con.print(t)
    kf_t = Table(title="Keyframes (first..last frame: frames, metres travelled up to the next keyframe)")
    kf_t.add_column("scene")
    kf_t.add_column("keyframes")
    for sc in s["scenes"]:  # type: ignore[union-attr]
        if sc["keyframes"]:
            kf_t.add_row(str(sc["scene_id"]), "  ".join(
                f"{k['frames'][0]}..{k['frames'][1]}: {k['num_frames']}f {k['travel_m']:.1f}m" for k in sc["keyframes"]))
    con.print(kf_t)
    seg_t = Table(title="Segments")
    for col in ("scene", "segment", "keyframes", "frames", "aabb min", "aabb max"):
        seg_t.add_column(col)
    for sc in s["scenes"]:  # type: ignore[union-attr]
        for seg in sc["segments"]:
            k = seg["keyframe_indices"]
            lo, hi = seg["aabb"]
            seg_t.add_row(str(sc["scene_id"]), str(seg["segment_id"]), f"{k[0]}..{k[-1]} ({len(k)})",
                          f"{seg['frames'][0]}..{seg['frames'][1]}", " ".join(f"{x:.1f}" for x in lo),
                          " ".join(f"{x:.1f}" for x in hi))
    con.print(seg_t)
    ev: Dict[str, object] = s["evaluation"]  # type: ignore[assignment]
    con.print(f"Evaluation (ns-eval, evolsplat-ns-infer): {ev['held_out_images']} held-out images "
              f"({ev['held_out_frames']} frames) of scenes {ev['scene_ids']}, each scored once, in "
              f"{ev['batches']} reconstructions")
    b = s["sample_batch"]
    bt = Table(title=f"Sample batch: scene {b['scene_id']} segment {b['segment_id']}")  # type: ignore[index]
    bt.add_column("field")
    bt.add_column("source")
    bt.add_column("target")
    for k in b["source"]:  # type: ignore[index]
        bt.add_row(k, str(b["source"][k]), str(b["target"][k]))  # type: ignore[index]
    con.print(bt)


def main(args: InspectArgs) -> Dict[str, object]:
    summary = run_cli(lambda: inspect_data(args), args.verbose)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_tables(summary)
    return summary


def entrypoint(argv: Optional[list] = None) -> None:
    main(tyro.cli(InspectArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
