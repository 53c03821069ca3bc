"""``evolsplat-ns-pointcloud``: build a segment's RGB point cloud (the seed of its Gaussians).

    evolsplat-ns-pointcloud --data DIR --scene I --segment J --out FILE.ply [--generator depth|lidar|seed-ply]
                            [--sparsity Drop50 --no-filter-sky --downscale 4 --max-points 200000 ...]
    evolsplat-ns-pointcloud --data DIR --all [--scene I]

One segment: the cloud is taken from the cache (``<data>/.evolsplat_cache`` or ``--cache-dir``) or built and
cached, then written to ``--out`` in the data's own world frame (the frame of ``transforms.json``, or of the layout's
poses: PandaSet's world, KITTI's first IMU pose, DriveStudio's world), with colours. ``--generator lidar`` needs a
layout with LiDAR (drivestudio, pandaset, kitti-raw); ``depth`` uses depth files or LiDAR-derived sparse depth.
``--all`` builds and caches the clouds of every segment (of every scene, or of ``--scene``) and their KNN scales,
with a progress bar. On a machine with CUDA the clouds are built there (``--backend`` / ``--device``; the cache
entries are the same whichever backend builds them).

Segments and input frames are those of training: the scene index options and the evaluation hold-out come from
``--datamanager.*`` (as for ``ns-train``), e.g. ``--datamanager.keyframes-per-segment 8``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import tyro

from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig
from evolsplat_ns.errors import ConfigError, DataValidationError, run_cli
from evolsplat_ns.pointcloud.options import PointCloudOptions


@dataclass
class PointCloudArgs:
    data: Path
    """Data root or scene folder, in any layout (multiscene, reference, drivestudio, pandaset, kitti-raw; auto-detected,
    or forced with --datamanager.dataparser.layout)."""
    scene: Optional[int] = None
    """Scene id (position in the sorted scene folders). Required unless --all."""
    segment: Optional[int] = None
    """Segment id within the scene. Required unless --all."""
    out: Optional[Path] = None
    """Output PLY (data world frame). Required unless --all."""
    all: bool = False
    """Build and cache every segment (of every scene, or of --scene)."""
    cache_dir: Optional[Path] = None
    """Cache root (default: <data>/.evolsplat_cache)."""
    cache: bool = True
    """Read and write the cache (--no-cache: always build, write nothing but --out)."""
    quiet: bool = False
    verbose: bool = False
    """Show tracebacks for bad input."""
    pointcloud: tyro.conf.OmitArgPrefixes[PointCloudOptions] = field(default_factory=PointCloudOptions)
    """Generator options."""
    datamanager: EvolSplatDataManagerConfig = field(default_factory=EvolSplatDataManagerConfig)
    """Scene index and hold-out options, as for ns-train (--datamanager.keyframes-per-segment ...)."""


def _setup(args: PointCloudArgs):
    from evolsplat_ns.data.scene_index import index_scene

    cfg = args.datamanager
    cfg.validate()  # the same option checks as ns-train (keyframe rules included), before any data is read
    cfg.dataparser.data = Path(args.data)
    parser = cfg.dataparser.setup()
    scenes = {s.scene_id: s for s in parser.scenes()}
    opts = cfg.index_options()
    return parser, scenes, opts, index_scene


def run(args: PointCloudArgs) -> List[dict]:
    from evolsplat_ns.pointcloud.cache import PointCloudCache, build_all
    from evolsplat_ns.pointcloud.generators import make_generator
    from evolsplat_ns.pointcloud.plyio import write_ply_atomic

    if not args.all and (args.scene is None or args.segment is None or args.out is None):
        raise ConfigError("give --scene, --segment and --out (or --all to build every segment)")
    if args.all and (args.out is not None or args.segment is not None):
        raise ConfigError("--all builds and caches every segment: --out and --segment do not apply")
    generator = make_generator(args.pointcloud)
    parser, scenes, index_opts, index_scene = _setup(args)
    if args.scene is not None and args.scene not in scenes:
        raise DataValidationError(args.data, "--scene", f"a scene id in {sorted(scenes)}", args.scene)
    cache = PointCloudCache(args.cache_dir, data_root=args.data, enabled=args.cache)
    cache.check_folder("--cache-dir")  # before any cloud is built
    if args.out is not None:
        check_out_file(Path(args.out))
    ids = [args.scene] if args.scene is not None else sorted(scenes)
    items = []
    for sid in ids:
        idx = index_scene(scenes[sid], index_opts)
        if idx is None:
            if not args.all or args.scene is not None:
                raise DataValidationError(scenes[sid].root, None,
                                          f"a scene with at least {index_opts.min_keyframes_per_scene} keyframes")
            continue
        allowed = parser.input_frames(scenes[sid])
        if args.all:
            items += [(scenes[sid], seg, allowed) for seg in idx.segments]
        else:
            if not 0 <= args.segment < len(idx.segments):
                raise DataValidationError(scenes[sid].root, "--segment",
                                          f"a segment id in [0, {len(idx.segments) - 1}]", args.segment)
            items.append((scenes[sid], idx.segments[args.segment], allowed))
    t0 = time.perf_counter()
    # --all prepares segments for training / inference: their KNN scales too (cached beside each cloud)
    results = build_all(items, generator, cache, quiet=args.quiet or not args.all, with_knn=args.all and args.cache)
    summary = [
        {"scene_id": r.scene_id, "scene": r.scene_name, "segment_id": r.segment_id, "points": r.num_points,
         "seconds": round(r.seconds, 3), "from_cache": r.from_cache, "cache_path": str(r.path) if r.path else None}
        for r in results
    ]
    if not args.all:
        r = results[0]
        scene = scenes[r.scene_id]
        inv = np.linalg.inv(np.asarray(scene.align, dtype=np.float64))  # project frame -> data world frame
        world = r.points.astype(np.float64) @ inv[:3, :3].T + inv[:3, 3]
        write_ply_atomic(args.out, world, r.colours)
        summary[0]["out"] = str(args.out)
        if not args.quiet:
            print(f"scene {r.scene_id} ({r.scene_name}) segment {r.segment_id}: {r.num_points} points in "
                  f"{time.perf_counter() - t0:.2f} s ({'cache' if r.from_cache else 'built'}) -> {args.out}")
    elif not args.quiet:
        total = sum(s["points"] for s in summary)
        print(f"{len(summary)} segments, {total} points in {time.perf_counter() - t0:.1f} s "
              f"({sum(s['from_cache'] for s in summary)} from the cache)")
    return summary


def check_out_file(out: Path) -> None:
    """``--out`` must be a file this command can write: not a folder, in a folder that can be made."""
    from evolsplat_ns.atomic import ensure_folder

    if out.is_dir():
        raise DataValidationError(out, "--out", "a PLY file to write", "a folder")
    ensure_folder(out.parent, "--out")


def main(args: PointCloudArgs) -> List[dict]:
    return run_cli(lambda: run(args), args.verbose)


def entrypoint(argv: Optional[list] = None) -> None:
    main(tyro.cli(PointCloudArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
