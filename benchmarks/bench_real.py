"""Real data (docs/BENCHMARKS.md, "Real data"): a raw PandaSet sequence, leave one camera out.

The network's input width is fixed by its number of source views, so each camera stream of the sequence becomes a
scene of its own (``split``: a folder of symbolic links per camera, the raw PandaSet layout). ``ns-train evolsplat-ff``
trains on the five other cameras; the held-out camera is reconstructed zero-shot: its even frames in, every odd frame
scored. On exactly those images, with exactly the same metric code (``EvolSplatModel.image_metrics``):

- (a) ``eval``: the seed cloud of each segment as fixed Gaussians (own colours, KNN scales, opacity 0.9; no
  learning), and (c) ours, feed-forward; several checkpoints can be scored side by side (e.g. ablations);
- (b) ``splatfacto``: nerfstudio's splatfacto, unchanged, optimised on the held-out camera's even frames (the same
  views ours reads), initialised from the union of the same seed clouds, scored after each time budget.

Usage (GPU machine; see scripts/gpu/real.sh)::

    python benchmarks/bench_real.py split --sequence /data/pandaset/002 --out /tmp/pd_cams
    ns-train evolsplat-ff --data /tmp/pd_cams --pipeline.datamanager.dataparser.eval-scene-ids 1 ...
    python benchmarks/bench_real.py eval --load-config A/config.yml [B/config.yml ...] --out OUT
    python benchmarks/bench_real.py splatfacto --load-config A/config.yml --budgets 30 300 --out OUT
    python benchmarks/bench_real.py trace --load-config A/config.yml B/config.yml --steps 100 200 400 --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_splatfacto import (  # noqa: E402
    _save_png, add_finetune_arguments, compare_scene, finetune_variants)

CAMERAS = ["front", "front_left", "front_right", "left", "right", "back"]


def split(sequence: Path, out: Path) -> None:
    """One scene folder per camera of a raw PandaSet sequence: ``out/<seq>_<camera>/{camera/<camera>_camera, lidar}``
    (symbolic links; every camera keeps the whole LiDAR)."""
    out.mkdir(parents=True, exist_ok=True)
    for cam in CAMERAS:
        src = sequence / "camera" / f"{cam}_camera"
        if not src.is_dir():
            continue
        scene = out / f"{sequence.name}_{cam}"
        (scene / "camera").mkdir(parents=True, exist_ok=True)
        for link, target in ((scene / "camera" / f"{cam}_camera", src), (scene / "lidar", sequence / "lidar")):
            if not link.exists():
                link.symlink_to(target.resolve(), target_is_directory=True)
    print("\n".join(f"{i}: {d.name}" for i, d in enumerate(sorted(p for p in out.iterdir() if p.is_dir()))))


def _at_step(step):
    """eval_setup's config callback: load the checkpoint of ``step`` (None: the latest)."""

    def callback(config):
        if step is not None:
            config.load_step = int(step)
        return config

    return callback


def evaluate(configs, out: Path, images: int, step=None) -> dict:
    """(a) and (c) on every held-out image of the eval scenes, per checkpoint (of ``step``, else the latest): the
    library's evaluation path (:func:`evolsplat_ns.pipeline.evaluation.evaluate`), the seed cloud scored beside it."""
    from nerfstudio.utils.eval_utils import eval_setup

    from evolsplat_ns.model.render import render_seed_cloud
    from evolsplat_ns.pipeline.evaluation import evaluate as evaluate_plan

    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "runs": {}}
    for cfg_path in configs:
        _, pipe, ckpt, loaded = eval_setup(Path(cfg_path), test_mode="test", update_config_callback=_at_step(step))
        model = pipe.ff_model
        model.segments.clear()  # time first-seen segments: every cloud is built (or read from the cache) here
        name = "/".join(Path(cfg_path).parts[-4:-1])  # experiment/method/timestamp: unique per run
        seed = []

        def seed_cloud(batch, shared, v, pred, gt, row):
            tgt = batch.target
            base = render_seed_cloud(model.segments.current, tgt.extrinsics[v], tgt.intrinsics[v], tgt.width,
                                     tgt.height)["rgb"]
            seed.append(model.image_metrics(base, gt))
            if len(seed) <= 5 * images and (len(seed) - 1) % 5 == 0:
                _save_png(out / f"real_{name.replace('/', '_')}_f{row['frame']:03d}.png",
                          torch.cat([gt, pred.clamp(0, 1), base.clamp(0, 1)], dim=1))

        result = evaluate_plan(pipe, on_view=seed_cloud)
        ours = result.views
        keys = result.metric_names()
        first = [b.init_ms + b.reconstruction_ms for b in result.batches if b.init_ms > 0]
        again = [b.reconstruction_ms for b in result.batches if b.init_ms == 0]
        report["runs"][name] = {
            "checkpoint": str(ckpt), "step": loaded, "num_views": result.num_views,
            "ours": {k: statistics.mean(r[k] for r in ours) for k in keys},
            "seed_cloud": {k: statistics.mean(r[k] for r in seed) for k in keys},
            "reconstruction_ms_first_seen_segment": statistics.median(first) if first else None,
            "reconstruction_ms_known_segment": statistics.median(again) if again else None,
            "views": [{"frame": o["frame"], "ours_psnr": o["psnr"], "seed_cloud_psnr": s["psnr"]}
                      for o, s in zip(ours, seed)],
        }
        print(name, json.dumps({k: v for k, v in report["runs"][name].items() if k != "views"}, indent=1), flush=True)
    return report


@torch.no_grad()
def trace(config: Path, steps) -> list:
    """What the network predicts over training, per saved checkpoint of ``steps``: on the held-out camera's
    reconstruction, the mean opacity and median scale of the foreground Gaussians, the correlation of their decoded
    colour (SH degree 0) with their seed colour (what the images say), and the PSNR over every held-out image."""
    import numpy as np
    from nerfstudio.utils.eval_utils import eval_setup

    from evolsplat_ns.model.heads import view_inputs
    from evolsplat_ns.pointcloud.init import sh_to_rgb

    cfg, pipe, _, _ = eval_setup(config, test_mode="test")
    model, dm = pipe.ff_model, pipe.datamanager
    batches = list(dm.eval_batches())
    rows = []
    for step in steps:
        path = cfg.get_checkpoint_dir() / f"step-{int(step):09d}.ckpt"
        if not path.exists():
            continue
        state = torch.load(path, map_location=model.device, weights_only=False)
        pipe.load_pipeline(state["pipeline"], state["step"])
        model.segments.clear()
        psnr, opa, scale, corr = [], [], [], []
        for i, batch in enumerate(batches):
            shared = pipe.reconstruct(batch)
            outs = pipe.render_targets(batch, shared)
            psnr += [model.image_metrics(o["rgb"], batch.target.image[v])["psnr"] for v, o in enumerate(outs)]
            if i % 4:
                continue
            dist, direction = view_inputs(shared.means, batch.target.extrinsics[0][:3, 3])
            sh, dlog, _, o = model.heads.predict_view(shared.f3, shared.fw, dist, direction, shared.base_rgb)
            opa.append(float(torch.sigmoid(o).mean()))
            scale.append(float(torch.exp(dlog + shared.base_log_scale).median()))
            seed = model.segments.current["colours"][shared.mask]
            rgb = sh_to_rgb(sh[:, 0]).clamp(0, 1)
            corr.append(float(np.corrcoef(rgb.reshape(-1).cpu().numpy(), seed.reshape(-1).cpu().numpy())[0, 1]))
        rows.append({"step": int(state["step"]), "psnr": statistics.mean(psnr), "opacity_mean": statistics.mean(opa),
                     "scale_median_m": statistics.mean(scale), "colour_vs_seed_corr": statistics.mean(corr)})
        print(config.parent.parent.name, rows[-1], flush=True)
    return rows


def splatfacto(config: Path, budgets, out: Path, images: int, methods=("splatfacto",), variants=None,
               schedule: str = "budget") -> dict:
    """(b) and issue 17's fine-tuning (``methods``; ``variants``: :class:`FinetuneVariant` runs) on each held-out
    scene; ``out/bench_real_splatfacto.json`` is rewritten after each method and variant."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipe, _, _ = eval_setup(config, test_mode="test")
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "scenes": {}}

    def partial(name):
        def write(row):
            report["scenes"][name] = row
            (out / "bench_real_splatfacto.json").write_text(json.dumps(report, indent=2))
        return write

    for sid in pipe.datamanager.eval_scene_ids:
        name = pipe.datamanager.scenes[sid].name
        report["scenes"][name] = compare_scene(pipe, sid, out / name, out / "runs", name, budgets, images,
                                               out / f"real_splatfacto_{name}", methods, variants, schedule,
                                               partial(name))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("split", help="one scene folder per camera")
    s.add_argument("--sequence", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("eval", help="(a) seed cloud and (c) ours on every held-out image")
    e.add_argument("--load-config", type=Path, nargs="+", required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--images", type=int, default=4)
    e.add_argument("--step", type=int, default=None, help="checkpoint step of every run (default: each run's latest)")
    t = sub.add_parser("trace", help="opacity, scale, colour and PSNR over the saved checkpoints")
    t.add_argument("--load-config", type=Path, nargs="+", required=True)
    t.add_argument("--steps", type=int, nargs="+", required=True)
    t.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("splatfacto", help="(b) splatfacto on the held-out camera's input frames (and/or fine-tuning "
                                          "from our feed-forward Gaussians: --methods)")
    f.add_argument("--methods", nargs="+", choices=["splatfacto", "finetune"], default=["splatfacto"])
    add_finetune_arguments(f)
    f.add_argument("--load-config", type=Path, required=True)
    f.add_argument("--budgets", type=float, nargs="+", default=[30.0, 300.0])
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--images", type=int, default=4)
    a = ap.parse_args()
    if a.stage == "split":
        split(a.sequence, a.out)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "eval":
        report = evaluate(a.load_config, a.out, a.images, a.step)
    elif a.stage == "trace":
        report = {str(c): trace(c, a.steps) for c in a.load_config}
    else:
        report = splatfacto(a.load_config, a.budgets, a.out, a.images, a.methods, finetune_variants(a), a.schedule)
    (a.out / f"bench_real_{a.stage}.json").write_text(json.dumps(report, indent=2))
    print(f"columns of the images: ground truth | ours | seed cloud (eval); ground truth | ours | splatfacto "
          f"budgets (splatfacto). JSON: {a.out / f'bench_real_{a.stage}.json'}")


if __name__ == "__main__":
    main()
