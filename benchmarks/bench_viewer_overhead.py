"""Training slow-down caused by the viewer's segment refresh (issue 8: must stay under 5 %).

Runs nerfstudio's Trainer on synthetic scenes, alternating runs of equal length:
  * ``off``:     no viewer (vis=tensorboard, logging every 10^6 steps);
  * ``refresh``: the viewer server on 127.0.0.1 (no browser), a segment picked in the "Segment to display"
                 dropdown (through the viewer's locked callback), so it is reconstructed every
                 ``--refresh-every`` steps and its frustums drawn;
  * ``follow``:  the viewer on, no segment picked: the view follows training (frustums redrawn per new segment).
Steps/s are measured from step start to step start after ``--warmup`` steps (CUDA synchronised).

GPU:  python benchmarks/bench_viewer_overhead.py --out outputs/bench_viewer_overhead.json
CPU check (tiny): python benchmarks/bench_viewer_overhead.py --tiny --out /tmp/bvo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(args, mode: str, out: Path):
    from evolsplat_ns.configs import make_small_trainer_config, make_trainer_config

    cfg = make_small_trainer_config() if args.tiny else make_trainer_config()
    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.pipeline.datamanager.data = args.data
    if args.tiny:
        cfg.pipeline.model.bg_num_points = 1000
        cfg.pipeline.model.pointcloud.max_points = 1500
    else:
        cfg.pipeline.datamanager.num_target_keyframes = 2
        cfg.pipeline.model.pointcloud.outlier_removal = False
        cfg.pipeline.model.pointcloud.max_points = 300000
    cfg.max_num_iterations = args.warmup + args.steps
    cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10 ** 9
    cfg.steps_per_save = 10 ** 9
    cfg.logging.steps_per_log = 10 ** 9
    cfg.logging.local_writer.enable = False
    cfg.output_dir = out
    cfg.timestamp = mode
    cfg.pipeline.viewer_refresh_every = args.refresh_every
    if mode == "off":
        cfg.vis = "tensorboard"
    else:
        cfg.vis = "viewer"
        cfg.viewer.websocket_host = "127.0.0.1"
        cfg.viewer.websocket_port = free_port()
        cfg.viewer.quit_on_train_completion = True
    return cfg


def run(args, mode: str, out: Path) -> dict:
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
    from nerfstudio.engine.trainer import Trainer

    cfg = make_config(args, mode, out)
    cfg.save_config()
    trainer = Trainer(cfg, local_rank=0, world_size=1)
    trainer.setup()
    stamps = []

    def stamp(step):
        sync()
        stamps.append(time.perf_counter())

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], stamp))
    pipe = trainer.pipeline
    if mode == "refresh":
        dd = pipe.viewer_segment
        label = next(o for o in dd.options if o.startswith("eval"))
        dd.value = label
        dd.cb_hook(dd)  # wrapped by the viewer: train lock + rerender request
    try:
        trainer.train()
    finally:
        trainer.shutdown()
    sync()
    stamps.append(time.perf_counter())
    dts = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    return {"mode": mode, "steps": len(dts), "steps_per_s": len(dts) / sum(dts), "median_step_s": statistics.median(dts),
            "segment_frustum_draws": pipe.viewer_cameras.draws}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="synthetic scenes (generated when missing)")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized check: 3 scenes 24x72, evolsplat-ff-small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--refresh-every", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the first (cache building) is not counted")
    ap.add_argument("--modes", default="off,refresh,follow")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_viewer_overhead.json"))
    args = ap.parse_args()
    from evolsplat_ns.data.synthetic import generate_scenes

    work = args.out.parent / "bench_viewer_overhead_runs"
    if args.data is None:
        args.data = work / ("synth_tiny" if args.tiny else "synth")
    if not (args.data / ".complete").exists():
        if args.tiny:
            generate_scenes(args.data, 3, 5, 24, 72, num_frames=30, num_cameras=3, quiet=True)
        else:
            generate_scenes(args.data, 16, 0, 192, 576, num_frames=40, num_cameras=3, quiet=True)
        (args.data / ".complete").touch()
    modes = args.modes.split(",")
    rows = []
    for r in range(args.repeats):
        for m in modes:
            rows.append(run(args, m, work / f"r{r}"))
            print(json.dumps(rows[-1]), flush=True)
    # the first round also builds the segment point-cloud cache on disk: with --repeats > 1 it is not counted
    counted = rows[len(modes):] if args.repeats > 1 else rows
    summary = {m: statistics.mean(x["steps_per_s"] for x in counted if x["mode"] == m) for m in modes}
    res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "refresh_every": args.refresh_every, "steps_per_run": args.steps, "runs": rows,
           "steps_per_s": summary,
           "slowdown_percent": {m: 100.0 * (1 - summary[m] / summary["off"]) for m in modes if "off" in modes}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["steps_per_s"]), json.dumps(res["slowdown_percent"]))


if __name__ == "__main__":
    main()
