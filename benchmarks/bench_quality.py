"""B6 (data side) and B7 (quality, part a) of docs/BENCHMARKS.md, on a trained checkpoint.

* B7a: feed-forward novel views of the held-out scenes (even frames in, every odd frame's images scored once,
  :mod:`evolsplat_ns.data.eval_plan`) versus the seed point cloud of the same segment rendered as fixed isotropic
  Gaussians with its own colours (no learning): PSNR / SSIM per method, reconstruction time per evaluation batch,
  side-by-side images (GT | ours | seed cloud).
* B6: batch assembly time per training step in steady state (decoded scenes cached), and point-cloud
  generation time per segment (depth generator, cache bypassed).

Usage: ``python benchmarks/bench_quality.py --load-config outputs/.../config.yml --out OUT_DIR``
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-config", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_quality"))
    ap.add_argument("--images", type=int, default=6, help="side-by-side images to save")
    args = ap.parse_args()
    import numpy as np
    from nerfstudio.utils.eval_utils import eval_setup
    from PIL import Image

    from evolsplat_ns.model.render import render_seed_cloud
    from evolsplat_ns.pipeline.evaluation import VIEW_KEYS, evaluate

    def result_metrics(row):
        return [k for k in row if k not in VIEW_KEYS]
    from evolsplat_ns.pointcloud.cache import segment_pointcloud

    args.out.mkdir(parents=True, exist_ok=True)
    _, pipe, ckpt, step = eval_setup(args.load_config, test_mode="test")
    model, dm = pipe.ff_model, pipe.datamanager
    rows, saved = [], [0]

    def seed_cloud(batch, shared, v, pred, gt, row):  # the baseline, scored on the same images by the same code
        tgt = batch.target
        base = render_seed_cloud(model.segments.current, tgt.extrinsics[v], tgt.intrinsics[v], tgt.width,
                                 tgt.height)["rgb"]
        rows.append({"ours": {k: row[k] for k in result_metrics(row)}, "seed_cloud": model.image_metrics(base, gt)})
        if saved[0] < args.images and v % 3 == 0:
            img = torch.cat([gt, pred.clamp(0, 1), base.clamp(0, 1)], dim=1)
            Image.fromarray((img.cpu().numpy() * 255).round().astype(np.uint8)).save(
                args.out / f"b7_scene{batch.scene_id:03d}_seg{batch.segment_id:02d}"
                           f"_f{int(tgt.frame_indices[v]):03d}_c{int(tgt.cam_indices[v])}.png")
            saved[0] += 1

    result = evaluate(pipe, description="B7 held-out views", on_view=seed_cloud)
    recon = [b.reconstruction_ms for b in result.batches]
    b7 = {m: {k: statistics.mean(r[m][k] for r in rows) for k in rows[0][m]} for m in ("ours", "seed_cloud")}
    b7["views"] = len(rows)
    b7["reconstruction_ms_median"] = statistics.median(recon)
    b7["reconstruction_ms_first"] = recon[0]

    # B6: steady-state batch assembly (training scenes, decoded cache warm) and cloud generation per segment
    dm.test_mode = "val"
    for s in range(40):  # warm: decode the scenes of the first segments
        dm.next_train(s)
    ts = []
    for s in range(40, 140):
        sync()
        t0 = time.perf_counter()
        dm.next_train(s)
        sync()
        ts.append(1000 * (time.perf_counter() - t0))
    gen = []
    for sid in dm.train_scene_ids[:2]:
        for seg in dm.index[sid].segments:
            t0 = time.perf_counter()
            pc = segment_pointcloud(dm.scenes[sid], seg, model.config.pointcloud, dm.input_frames(sid),
                                    use_cache=False)
            gen.append({"seconds": time.perf_counter() - t0, "points": int(pc.points.shape[0])})
    b6 = {"batch_assembly_ms_median": statistics.median(ts), "batch_assembly_ms_p90": sorted(ts)[int(0.9 * len(ts))],
          "pointcloud_seconds_median": statistics.median(g["seconds"] for g in gen),
          "pointcloud_points_median": statistics.median(g["points"] for g in gen), "segments_timed": len(gen)}
    report = {"checkpoint": str(ckpt), "step": step, "device": torch.cuda.get_device_name(0)
              if torch.cuda.is_available() else "cpu", "B7a": b7, "B6": b6}
    (args.out / "bench_quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
