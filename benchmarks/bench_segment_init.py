"""A first-seen segment end to end: seed cloud + KNN scales + initial Gaussians, per backend, as JSON.

What ``EvolSplatModel.init_segment`` does for a segment the cloud cache does not have (library calls only):
``PointCloudCache.get`` (read and decode the segment's LiDAR sweeps and images, colour, crop, statistical outlier
removal, down-sampling, PLY write), ``SegmentPointCloud.knn_distance`` (KNN scales, ``.knn.npy`` write) and
``init_gaussians`` onto the device. Every run starts from an empty cache folder (first seen); the files are in the
OS page cache after the first run (``--drop-first`` reports the first, cold, run apart).

Default: raw PandaSet sequence 002 (``--data`` holds ``002/``), front camera at 960x540 (downscale 2), LiDAR seed
points, the evaluation hold-out of ``evolsplat-ns-infer`` (even frames are inputs). Backends: ``torch`` on the
current device (CUDA when available) and ``cpu`` (the CPU path: ``auto`` on the CPU, i.e. open3d's outlier
removal when importable, else scikit-learn's; scikit-learn KNN scales).

    python benchmarks/bench_segment_init.py --data /work/main/data/pandaset [--cameras front front_left front_right]
        [--backends torch cpu] [--repeat 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_segment(args):
    """(scene, segment, input frames) as ``evolsplat-ns-infer`` sees them (every scene is an eval scene)."""
    from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig
    from evolsplat_ns.data.layouts import find_layout_scenes
    from evolsplat_ns.data.scene_index import index_scene

    cfg = EvolSplatDataManagerConfig()
    dp = cfg.dataparser
    dp.data, dp.layout, dp.cameras, dp.downscale = args.data, args.layout, tuple(args.cameras), args.downscale
    dp.lidar_cache_dir = Path(tempfile.mkdtemp(prefix="bench_seg_lidar_"))  # not used by the LiDAR generator
    dp.train_scene_ids = dp.eval_scene_ids = tuple(range(len(find_layout_scenes(args.data, args.layout))))
    dp.eval_holdout = args.holdout
    parser = dp.setup()
    scene = parser.scenes()[args.scene]
    segments = index_scene(scene, cfg.index_options()).segments
    return scene, segments[args.segment], parser.input_frames(scene), len(segments)


def run_once(scene, segment, allowed, opts, device, cache_root: Path):
    """One first-seen segment: seconds of the cloud (and its stages), the KNN scales and the initialisation."""
    from evolsplat_ns.pointcloud.cache import PointCloudCache
    from evolsplat_ns.pointcloud.generators import make_generator
    from evolsplat_ns.pointcloud.init import init_gaussians

    cache = PointCloudCache(Path(tempfile.mkdtemp(dir=cache_root)))  # empty: the segment is seen for the first time
    generator = make_generator(opts, device=device)
    sync()
    t0 = time.perf_counter()
    pc = cache.get(generator, scene, segment, allowed)
    sync()
    t1 = time.perf_counter()
    knn = pc.knn_distance()
    sync()
    t2 = time.perf_counter()
    g = init_gaussians(pc.points, pc.colours, sh_degree=1, knn_distance=knn, seed=0, device=device,
                       keys=("means", "colours", "log_scales", "offset"))  # what the model keeps
    sync()
    t3 = time.perf_counter()
    rep = generator.last_report
    return {
        "total_s": t3 - t0, "cloud_s": t1 - t0, "knn_s": t2 - t1, "init_s": t3 - t2,
        "cloud_stages_s": {**rep.stages, "cache write": (t1 - t0) - rep.seconds},
        "raw_points": rep.num_raw, "points": int(g["means"].shape[0]), "backend": rep.backend, "device": rep.device,
        "points_checksum": float(pc.points.astype("float64").sum()), "knn_checksum": float(knn.sum()),
    }


def summarize(runs, drop_first: bool):
    use = runs[1:] if drop_first and len(runs) > 1 else runs
    med = lambda key: statistics.median(r[key] for r in use)  # noqa: E731
    stages = sorted({k for r in use for k in r["cloud_stages_s"]})
    return {
        "runs": len(use), "total_s": med("total_s"), "cloud_s": med("cloud_s"), "knn_s": med("knn_s"),
        "init_s": med("init_s"),
        "cloud_stages_s": {k: statistics.median(r["cloud_stages_s"].get(k, 0.0) for r in use) for k in stages},
        "first_run_total_s": runs[0]["total_s"],
        **{k: runs[0][k] for k in ("raw_points", "points", "backend", "device", "points_checksum", "knn_checksum")},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/main/data/pandaset"))
    ap.add_argument("--layout", default="pandaset")
    ap.add_argument("--cameras", nargs="+", default=["front"])
    ap.add_argument("--downscale", type=float, default=2.0, help="2: 960x540 PandaSet images")
    ap.add_argument("--holdout", default="odd", help="evaluation hold-out of the inputs (odd: even frames are in)")
    ap.add_argument("--generator", default="lidar", choices=["lidar", "depth"])
    ap.add_argument("--scene", type=int, default=0)
    ap.add_argument("--segment", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"], choices=["torch", "cpu", "torch-cpu"],
                    help="torch: the torch backend on the current device; cpu: the CPU path (auto on the CPU); "
                         "torch-cpu: the torch backend on the CPU")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drop-first", action="store_true", help="medians without the first (cold) run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from evolsplat_ns.pointcloud.options import PointCloudOptions

    scene, segment, allowed, n_seg = load_segment(args)
    cuda = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    base = PointCloudOptions(generator=args.generator)
    configs = {"torch": (base.replace(backend="torch"), cuda), "cpu": (base, torch.device("cpu")),
               "torch-cpu": (base.replace(backend="torch"), torch.device("cpu"))}
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context exists before a model's first segment, too
    result = {
        "benchmark": "first-seen segment: seed cloud + KNN scales + initial Gaussians",
        "data": str(args.data), "scene": scene.name, "segment": args.segment, "segments_in_scene": n_seg,
        "cameras": args.cameras, "image_size": [scene.images[0].width, scene.images[0].height],
        "input_frames": len([t for t in segment.frame_indices if allowed is None or t in allowed]),
        "generator": args.generator,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_seg_cache_") as root:
        for name in args.backends:
            opts, device = configs[name]
            runs = [run_once(scene, segment, allowed, opts, device, Path(root)) for _ in range(args.repeat)]
            result["backends"][name] = summarize(runs, args.drop_first)
            print(f"{name}: {result['backends'][name]['total_s']:.2f} s", file=sys.stderr)
    b = result["backends"]
    if "torch" in b and "cpu" in b:
        result["speedup_cpu_over_torch"] = b["cpu"]["total_s"] / b["torch"]["total_s"]
        result["same_cloud"] = (b["cpu"]["points"] == b["torch"]["points"]
                                and b["cpu"]["points_checksum"] == b["torch"]["points_checksum"])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
