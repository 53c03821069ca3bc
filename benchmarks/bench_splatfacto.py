"""B7 (b) of docs/BENCHMARKS.md: splatfacto trained per held-out scene on the same source views, 30 s and 300 s.

For each held-out scene of a trained evolsplat-ff run, the views the feed-forward model reads (the source views of
the scene's evaluation-plan batches: even frames, every camera) become the training images of a nerfstudio-format
scene; the views it is scored on (the targets of those batches: every odd frame's images, each once) become its test
images; the union of the scene's segment seed clouds initialises splatfacto (as a COLMAP cloud would). splatfacto
(nerfstudio's own method, unchanged) trains on the clock (evaluation time excluded) and is scored after each budget
on exactly the views, with exactly the metric code, of B7a. The feed-forward model is scored in the same run for the
table.

Usage (GPU machine): ``python benchmarks/bench_splatfacto.py --load-config outputs/.../config.yml --out OUT``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _NoLPIPS(torch.nn.Module):
    """Stands in for torchmetrics' LPIPS inside splatfacto: it would download AlexNet, and the GPU machine is
    offline. LPIPS is not part of this benchmark (PSNR / SSIM are computed by our own metric code)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, *args, **kwargs):
        return torch.zeros(())


def _load_3d_points_without_open3d(self, ply_file_path, transform_matrix, scale_factor):
    """nerfstudio's ``NerfstudioDataParser._load_3D_points`` (same transform, same output) reading the PLY with
    our reader, which falls back to plyfile: the GPU machine has no open3d."""
    from evolsplat_ns.pointcloud.plyio import read_ply

    pts, cols = read_ply(ply_file_path)
    if len(pts) == 0:
        return None
    p = torch.from_numpy(pts.astype(np.float32))
    p = torch.cat((p, torch.ones_like(p[..., :1])), -1) @ transform_matrix.T
    return {"points3D_xyz": p * scale_factor,
            "points3D_rgb": torch.from_numpy((np.asarray(cols) * 255).round().astype(np.uint8))}


def _save_png(path: Path, img: torch.Tensor) -> None:
    from PIL import Image

    Image.fromarray((img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


def export_scene(pipe, scene_id: int, out: Path):
    """Write one held-out scene as a nerfstudio dataset; returns the targets (GT tensors, in test order)."""
    from evolsplat_ns.cameras import opencv_to_opengl
    from evolsplat_ns.pointcloud.plyio import write_ply_atomic

    dm, model = pipe.datamanager, pipe.ff_model
    (out / "images").mkdir(parents=True, exist_ok=True)
    frames, train, test, targets, seen, clouds = [], [], [], [], set(), set()
    points, colours = [], []

    def add(views, v, name):
        c2w = views.extrinsics[v].double().cpu().numpy()
        K = views.intrinsics[v].double().cpu().numpy()
        _save_png(out / name, views.image[v])
        frames.append({"file_path": name, "transform_matrix": opencv_to_opengl(c2w).tolist(),
                       "fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2],
                       "w": int(views.width), "h": int(views.height)})

    for batch in dm.eval_batches():
        if batch.scene_id != scene_id:
            continue
        src, tgt = batch.source, batch.target
        for v in range(len(src)):
            key = ("src", int(src.frame_indices[v]), int(src.cam_indices[v]))
            if key not in seen:
                seen.add(key)
                name = f"images/src_{key[1]:04d}_{key[2]}.png"
                add(src, v, name)
                train.append(name)
        for v in range(len(tgt)):  # every scored view, in B7a's order (the evaluation plan scores each once)
            name = f"images/tgt_{len(test):04d}.png"
            add(tgt, v, name)
            test.append(name)
            targets.append(tgt.image[v].cpu())
        if (batch.scene_id, batch.segment_id) in clouds:
            continue  # several evaluation batches can share a segment: its cloud once
        clouds.add((batch.scene_id, batch.segment_id))
        pipe.activate(batch.scene_id, batch.segment_id)
        points.append(model.segments.current["means"].cpu().numpy())
        colours.append(model.segments.current["colours"].cpu().numpy())
    write_ply_atomic(out / "points.ply", np.concatenate(points), np.concatenate(colours))
    meta = {"camera_model": "OPENCV", "frames": frames, "train_filenames": train, "val_filenames": test,
            "test_filenames": test, "ply_file_path": "points.ply"}
    (out / "transforms.json").write_text(json.dumps(meta, indent=1))
    return targets, len(train)


def feed_forward_renders(pipe, scene_id: int):
    """Our renders of the scene's held-out images, through the one evaluation path (plan order)."""
    from evolsplat_ns.pipeline.evaluation import evaluate

    outs = []

    def keep(batch, shared, v, pred, gt, row):
        if batch.scene_id == scene_id:
            outs.append(pred.cpu())

    evaluate(pipe, description="Feed-forward renders", on_view=keep)
    return outs


def score(metric_fn, preds, targets):
    rows = [metric_fn(p.to(t.device), t) for p, t in zip(preds, targets)]
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]}


def run_splatfacto(scene_dir: Path, runs_dir: Path, name: str, budgets, metric, targets):
    """nerfstudio's splatfacto, unchanged, trained on ``scene_dir`` (written by :func:`export_scene`) on the clock
    (evaluation time excluded) and scored after each budget (seconds) on its test views against ``targets`` with
    ``metric``. Returns ({"splatfacto_<budget>s": scores...}, {key: renders})."""
    import torchmetrics.image.lpip as lpip_module
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    lpip_module.LearnedPerceptualImagePatchSimilarity = _NoLPIPS
    Nerfstudio._load_3D_points = _load_3d_points_without_open3d
    cfg = copy.deepcopy(all_methods["splatfacto"])
    cfg.pipeline.datamanager.data = scene_dir
    cfg.pipeline.datamanager.dataparser.load_3D_points = True
    cfg.output_dir = runs_dir
    cfg.experiment_name = name
    cfg.timestamp = "splatfacto"
    cfg.vis = "tensorboard"
    cfg.logging.local_writer.enable = False
    cfg.max_num_iterations = 10**7
    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    eval_ds = trainer.pipeline.datamanager.eval_dataset
    step_i, elapsed, renders, results = 0, 0.0, {}, {}
    for budget in sorted(budgets):
        while elapsed < budget:
            sync()
            t0 = time.perf_counter()
            trainer.pipeline.train()
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step_i, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
            trainer.train_iteration(step_i)
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step_i, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
            sync()
            elapsed += time.perf_counter() - t0
            step_i += 1
        trainer.pipeline.eval()
        preds = []
        with torch.no_grad():
            for i in range(len(eval_ds)):
                cam = eval_ds.cameras[i : i + 1].to(model.device)
                preds.append(model.get_outputs_for_camera(cam)["rgb"].cpu())
        key = f"splatfacto_{int(budget)}s"
        results[key] = {**score(metric, preds, targets), "steps": step_i, "seconds": elapsed,
                        "gaussians": int(model.num_points)}
        renders[key] = preds
        print(name, key, results[key], flush=True)
    return results, renders


def compare_scene(pipe, scene_id: int, scene_dir: Path, runs_dir: Path, name: str, budgets, images: int,
                  png_prefix: Path) -> dict:
    """One held-out scene: export it (:func:`export_scene`), score the feed-forward renders and splatfacto after each
    budget on the same views, and save ``images`` side-by-side PNGs ``<png_prefix>_view<i>.png`` (ground truth |
    evolsplat-ff | splatfacto per budget). Returns the scene's row."""
    metric = pipe.ff_model.image_metrics
    targets, n_train = export_scene(pipe, scene_id, scene_dir)
    ours = feed_forward_renders(pipe, scene_id)
    row = {"train_views": n_train, "test_views": len(targets), "evolsplat_ff": score(metric, ours, targets)}
    results, renders = run_splatfacto(scene_dir, runs_dir, name, budgets, metric, targets)
    row.update(results)
    for i in range(0, len(targets), max(1, len(targets) // images))[:images]:
        cols = [targets[i], ours[i].clamp(0, 1)] + [renders[k][i].clamp(0, 1) for k in renders]
        _save_png(Path(f"{png_prefix}_view{i:02d}.png"), torch.cat(cols, dim=1))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-config", type=Path, required=True, help="config.yml of a trained evolsplat-ff run")
    ap.add_argument("--budgets", type=float, nargs="+", default=[30.0, 300.0], help="seconds of splatfacto training")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_splatfacto"))
    ap.add_argument("--images", type=int, default=4, help="side-by-side images to save per scene")
    args = ap.parse_args()
    from nerfstudio.utils.eval_utils import eval_setup

    args.out.mkdir(parents=True, exist_ok=True)
    _, pipe, _, step = eval_setup(args.load_config, test_mode="test")
    report = {"evolsplat_checkpoint_step": step, "device": torch.cuda.get_device_name(0)
              if torch.cuda.is_available() else "cpu", "scenes": {}}
    for sid in pipe.datamanager.eval_scene_ids:
        row = compare_scene(pipe, sid, args.out / f"scene{sid:03d}", args.out / "runs", f"scene{sid:03d}", args.budgets,
                            args.images, args.out / f"b7b_scene{sid:03d}")
        report["scenes"][str(sid)] = row
        print(json.dumps(row, indent=1), flush=True)
    (args.out / "bench_splatfacto.json").write_text(json.dumps(report, indent=2))
    print("columns of the images: ground truth | evolsplat-ff | " + " | ".join(
        f"splatfacto {int(b)} s" for b in sorted(args.budgets)))


if __name__ == "__main__":
    main()
