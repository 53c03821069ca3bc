"""Multi-GPU scaling (issue 10): segment batches per second on 1 vs N GPUs with the same per-GPU batch, scaling
efficiency, and held-out PSNR after the same number of training samples (segment batches).

For each world size W the script starts W processes (torch.multiprocessing, NCCL on GPUs, gloo with ``--cpu``),
each running nerfstudio's Trainer on the evolsplat-ff pipeline exactly as ``ns-train ... --machine.num-devices W``
does (same Trainer, same DDP train step), for ``samples / W`` steps. Throughput is timed between step ``warmup``
and the last step (all ranks synchronised at both ends); segment switches and their point-cloud cache reads are
included, building the clouds is not (``--prebuild-cache``, on by default, writes them first). Rank 0 then scores
every target view of the held-out scenes (PSNR / SSIM). One JSON report for all world sizes.

GPU machine (W GPUs)::

    python benchmarks/bench_ddp.py --data data/synthetic --world-sizes 1 2 --samples 800 --out outputs/bench_ddp.json

CPU smoke test (tiny synthetic scenes in a temporary folder, gloo)::

    python benchmarks/bench_ddp.py --cpu --tiny --world-sizes 1 2 --samples 8 --out /tmp/bench_ddp.json

Scaling efficiency = throughput(W) / (W * throughput(1)). The learning-rate schedule is the config's, per step (not
scaled with W), so the W-GPU run at the same number of samples has taken 1/W of the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_config(args: argparse.Namespace, out_dir: Path, steps: int):
    from evolsplat_ns.configs import make_small_trainer_config, make_trainer_config

    cfg = make_small_trainer_config() if args.method == "evolsplat-ff-small" else make_trainer_config()
    cfg.machine.device_type = "cpu" if args.cpu else "cuda"
    cfg.pipeline.datamanager.data = Path(args.data)
    if args.tiny:  # the CPU smoke size of tests/test_distributed.py
        cfg.pipeline.datamanager.num_target_keyframes = 1
        cfg.pipeline.datamanager.batches_per_segment = 3
        cfg.pipeline.model.bg_num_points = 300
        cfg.pipeline.model.pointcloud.max_points = 600
    if args.batches_per_segment is not None:
        cfg.pipeline.datamanager.batches_per_segment = args.batches_per_segment
    cfg.max_num_iterations = steps
    cfg.steps_per_save = 10 ** 9  # one checkpoint, at the end (rank 0)
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10 ** 9
    cfg.vis = "tensorboard"
    cfg.logging.local_writer.enable = False
    cfg.output_dir = out_dir
    cfg.timestamp = "run"
    return cfg


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str, result: str) -> None:
    import torch.distributed as dist
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
    from nerfstudio.utils import comms

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on the device machines
    dev_type = "cpu" if args.cpu else "cuda"
    if args.cpu:
        torch.set_num_threads(max(1, args.threads))
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if args.cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    try:
        comms.LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))  # what nerfstudio's launcher sets up
        torch.manual_seed(args.seed + rank)
        steps = args.samples // world
        cfg = make_config(args, Path(out_dir) / f"w{world}", steps)
        trainer = cfg.setup(local_rank=rank, world_size=world)
        trainer.setup()
        pipe = trainer.pipeline
        warmup = min(args.warmup, steps - 1)
        marks: Dict[str, float] = {}
        step_times: List[float] = []

        def before(step: int) -> None:
            _sync(dev_type)
            if step == warmup:
                dist.barrier()
                marks["t0"] = time.perf_counter()
            marks["step"] = time.perf_counter()

        def after(step: int) -> None:
            _sync(dev_type)
            if step >= warmup:
                step_times.append(time.perf_counter() - marks["step"])
            if step == steps - 1:
                dist.barrier()
                marks["t1"] = time.perf_counter()

        trainer.callbacks.insert(0, TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before))
        trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], after))
        if dev_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        timed = steps - warmup
        elapsed = marks["t1"] - marks["t0"]
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev_type == "cuda" else None
        peaks = [None] * world if rank == 0 else None
        dist.gather_object(peak, peaks, dst=0, group=pipe.ranks.object_group)
        if rank == 0:
            t_eval = time.perf_counter()
            metrics = pipe.get_average_eval_image_metrics()
            report = {
                "world_size": world,
                "steps": steps,
                "samples": steps * world,
                "timed_steps": timed,
                "elapsed_s": elapsed,
                "segment_batches_per_s": world * timed / elapsed,
                "step_s_median_rank0": statistics.median(step_times),
                "peak_gib_per_rank": peaks,
                "heldout": {k: float(v) for k, v in metrics.items() if k != "views"},  # means; not the per-view rows
                "eval_s": time.perf_counter() - t_eval,
                "skipped_steps": int(pipe.train_step.skipped_steps),
                "segments_per_rank0": len(pipe.ff_model.segments.keys()),
            }
            Path(result).write_text(json.dumps(report, indent=2))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def prebuild_cache(args: argparse.Namespace, out_dir: Path) -> float:
    """Build every training segment's point cloud once (into the on-disk cache), outside the timed runs."""
    t = time.perf_counter()
    cfg = make_config(args, out_dir / "prebuild", 1)
    pipe = cfg.pipeline.setup(device="cpu" if args.cpu else "cuda:0", test_mode="val")
    dm = pipe.datamanager
    for sid in dm.train_scene_ids:
        for seg in dm.index[sid].segments:
            pipe.activate(sid, seg.segment_id)
    del pipe
    if not args.cpu:
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="multi-scene root (default with --tiny: generated)")
    ap.add_argument("--method", default=None, choices=["evolsplat-ff", "evolsplat-ff-small"],
                    help="default: evolsplat-ff on GPUs, evolsplat-ff-small with --cpu")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--samples", type=int, default=800, help="segment batches per run, over all GPUs")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing")
    ap.add_argument("--batches-per-segment", type=int, default=None)
    ap.add_argument("--cpu", action="store_true", help="processes on the CPU over gloo (smoke test)")
    ap.add_argument("--tiny", action="store_true", help="tiny synthetic scenes and model sizes (CPU smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process with --cpu")
    ap.add_argument("--no-prebuild-cache", dest="prebuild", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per world size")
    ap.add_argument("--work-dir", type=Path, default=None, help="runs and checkpoints (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_ddp.json"))
    args = ap.parse_args()
    args.method = args.method or ("evolsplat-ff-small" if args.cpu else "evolsplat-ff")
    if args.tiny:
        args.warmup = min(args.warmup, 1)
    if not args.cpu:
        n = torch.cuda.device_count()
        if n < max(args.world_sizes):
            raise SystemExit(f"error: {max(args.world_sizes)} GPUs asked for, {n} visible (use --cpu for a smoke test)")
    if any(args.samples // w < 2 for w in args.world_sizes):
        raise SystemExit("error: --samples must give every world size at least 2 steps")
    from evolsplat_ns.pipeline.distributed import free_port, spawn_local

    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.data is None:
            if not args.tiny:
                raise SystemExit("error: --data is required (or --tiny for generated scenes)")
            from evolsplat_ns.data.synthetic import generate_scenes

            args.data = work / "synth"
            generate_scenes(args.data, 3, 5, 24, 72, num_frames=30, num_cameras=2, quiet=True)
        prebuild_s = prebuild_cache(args, work) if args.prebuild else None
        runs: List[Dict[str, Any]] = []
        for w in args.world_sizes:
            result = work / f"result_w{w}.json"
            t = time.perf_counter()
            spawn_local(worker, w, args=(w, free_port(), args, str(work), str(result)), timeout_s=args.timeout)
            run = json.loads(result.read_text())
            run["wall_s"] = time.perf_counter() - t
            runs.append(run)
            print(f"W={w}: {run['segment_batches_per_s']:.3f} segment batches/s, held-out PSNR "
                  f"{run['heldout'].get('psnr', float('nan')):.2f} dB after {run['samples']} samples", flush=True)
    base = next((r for r in runs if r["world_size"] == 1), None)
    for r in runs:
        r["scaling_efficiency"] = (r["segment_batches_per_s"] / (r["world_size"] * base["segment_batches_per_s"])
                                   if base else None)
    device = "cpu (gloo)" if args.cpu else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (nccl)"
    report = {
        "benchmark": "bench_ddp (issue 10): data-parallel scaling of the evolsplat-ff train step",
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "method": args.method,
        "data": str(args.data) if args.work_dir or not args.tiny else "generated (--tiny)",
        "samples": args.samples,
        "warmup_steps": args.warmup,
        "prebuild_cache_s": prebuild_s,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
