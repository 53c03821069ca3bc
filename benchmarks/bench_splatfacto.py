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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evolsplat_ns.finetune.run import SCHEDULES  # noqa: E402


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


def feed_forward_renders(pipe, scene_id: int):
    """Our renders of the scene's held-out images, through the one evaluation path (plan order)."""
    from evolsplat_ns.pipeline.evaluation import evaluate

    outs = []

    def keep(batch, shared, v, pred, gt, row):
        if batch.scene_id == scene_id:
            outs.append(pred.cpu())

    evaluate(pipe, description="Feed-forward renders", on_view=keep)
    return outs


def run_splatfacto(scene_dir: Path, runs_dir: Path, name: str, budgets, metric, targets):
    """nerfstudio's splatfacto, unchanged, trained on ``scene_dir`` (an exported scene with its seed cloud) on the
    clock (evaluation time excluded: :func:`evolsplat_ns.finetune.run.train_on_the_clock`) and scored after each
    budget (seconds) on its test views against ``targets`` with ``metric``. Returns ({"splatfacto_<budget>s":
    scores...}, {key: renders})."""
    import torchmetrics.image.lpip as lpip_module
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio

    from evolsplat_ns.finetune.run import mean_metrics, render_test_views, train_on_the_clock

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
    renders, results = {}, {}

    def scored(budget, steps, elapsed):
        preds = render_test_views(model, eval_ds)
        key = f"splatfacto_{int(budget)}s"
        results[key] = {**mean_metrics(metric, preds, targets), "steps": steps, "seconds": elapsed,
                        "gaussians": int(model.num_points)}
        renders[key] = preds
        print(name, key, results[key], flush=True)

    train_on_the_clock(trainer, budgets, scored, description=f"splatfacto {name}")
    return results, renders


@dataclass
class FinetuneVariant:
    """One fine-tuning run of a comparison: ``name`` (its row keys get ``_<name>``; "" for none), the ``evolsplat-ft``
    config fields it sets (:func:`evolsplat_ns.finetune.run.apply_overrides`) and the viewpoints of its start
    (``bake``: :func:`evolsplat_ns.finetune.merge.scene_gaussians`)."""

    name: str = ""
    overrides: Dict[str, object] = field(default_factory=dict)
    bake: str = "middle"


def add_finetune_arguments(ap: argparse.ArgumentParser) -> None:
    """The fine-tuning options of both comparisons (this script and ``bench_real.py splatfacto``)."""
    from evolsplat_ns.finetune.merge import BAKES

    ap.add_argument("--ft-option", nargs="+", default=[], metavar="FIELD=VALUE", type=parse_option,
                    help="evolsplat-ft config fields, e.g. pipeline.model.reset_alpha_every=1000 (under every "
                         "--variant too)")
    ap.add_argument("--bake", choices=BAKES, default="middle",
                    help="viewpoints the fine-tuning start is decoded for (evolsplat_ns.finetune.merge)")
    ap.add_argument("--schedule", choices=SCHEDULES, default="budget",
                    help="fine-tuning schedule (evolsplat_ns.finetune.run.train_on_the_clock): 'budget' stretches "
                         "the learning-rate decay over each budget, one run per budget; 'steps': splatfacto's, one "
                         "run scored after each budget")
    ap.add_argument("--variant", action="append", nargs="+", default=[], metavar=("NAME", "FIELD=VALUE"),
                    help="a named fine-tuning run with its own evolsplat-ft fields (and bake=...), repeatable: the "
                         "variants run one after the other in this process, from the same feed-forward model and "
                         "exported scene (a sweep pays the set-up once); a variant that fails is recorded and the "
                         "others go on")


def finetune_variants(args: argparse.Namespace) -> List[FinetuneVariant]:
    """The fine-tuning runs that ``args`` (:func:`add_finetune_arguments`) ask for: one unnamed run, or the
    ``--variant`` runs. A bad name, start or config field is refused here, before any long work."""
    import re

    from evolsplat_ns.configs import evolsplat_ft
    from evolsplat_ns.errors import ConfigError
    from evolsplat_ns.finetune.merge import BAKES
    from evolsplat_ns.finetune.run import apply_overrides

    def checked(v: FinetuneVariant) -> FinetuneVariant:
        try:
            apply_overrides(copy.deepcopy(evolsplat_ft.config), v.overrides)
        except ConfigError as e:
            raise SystemExit(f"{'--variant ' + v.name if v.name else '--ft-option'}: {e}") from None
        return v

    if not args.variant:
        return [checked(FinetuneVariant("", dict(args.ft_option), args.bake))]
    out: List[FinetuneVariant] = []
    for name, *fields in args.variant:
        if not re.fullmatch(r"[A-Za-z0-9-]+", name) or name in {v.name for v in out}:
            raise SystemExit(f"--variant {name!r}: a name must be unique and made of letters, digits and '-'")
        v = FinetuneVariant(name, dict(args.ft_option), args.bake)
        for text in fields:
            key, value = parse_option(text)
            if key == "bake":
                if value not in BAKES:
                    raise SystemExit(f"--variant {name}: bake must be one of {BAKES}, got {value!r}")
                v.bake = value
            else:
                v.overrides[key] = value
        out.append(checked(v))
    return out


def compare_scene(pipe, scene_id: int, scene_dir: Path, runs_dir: Path, name: str, budgets, images: int,
                  png_prefix: Path, methods=("splatfacto",), variants: Optional[Sequence[FinetuneVariant]] = None,
                  schedule: str = "budget", on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """One held-out scene: export it (:func:`export_scene`), score the feed-forward renders and, for each of
    ``methods`` ("splatfacto": from the seed cloud; "finetune": from the merged feed-forward Gaussians, once per
    fine-tuning variant, default one unnamed run), the optimisation after each budget on the same views, and save
    ``images`` side-by-side PNGs ``<png_prefix>_view<i>.png`` (ground truth | evolsplat-ff | each method per budget).
    Returns the scene's row; ``on_row(row)`` is called after each method and variant (a sweep cut short keeps what
    it finished)."""
    from evolsplat_ns.finetune.run import finetune_scene, mean_metrics
    from evolsplat_ns.finetune.scene import export_scene

    metric = pipe.ff_model.image_metrics
    exported = export_scene(pipe, scene_id, scene_dir, seed_cloud=True)
    targets = exported.targets
    ours = feed_forward_renders(pipe, scene_id)
    shown = list(range(0, len(targets), max(1, len(targets) // images)))[:images]
    row = {"train_views": exported.num_train, "test_views": len(targets),
           "evolsplat_ff": mean_metrics(metric, ours, targets)}
    renders = {}
    if "splatfacto" in methods:
        results, renders = run_splatfacto(scene_dir, runs_dir, name, budgets, metric, targets)
        row.update(results)
        if on_row is not None:
            on_row(row)
    variants = list(variants) if variants else [FinetuneVariant()]
    for v in variants if "finetune" in methods else []:  # issue 17: the same budgets, from the feed-forward Gaussians
        suffix = f"_{v.name}" if v.name else ""
        try:
            ft = finetune_scene(pipe, scene_id, scene_dir.parent / f"{name}_finetune{suffix}", list(budgets),
                                {k: row["evolsplat_ff"][k] for k in ("psnr", "ssim")}, keep_renders=True,
                                overrides=v.overrides, bake=v.bake, schedule=schedule)
        except Exception as e:  # a sweep goes on with the other variants; a single run fails as it is
            if len(variants) == 1:
                raise
            row[f"finetune_error{suffix}"] = f"{type(e).__name__}: {e}"
            print(f"variant {v.name} failed: {row[f'finetune_error{suffix}']}", flush=True)
            continue
        preds = ft.pop("renders")
        renders[f"finetuned{suffix}_{int(max(budgets))}s"] = {i: preds[i] for i in shown}
        row[f"finetune_curve{suffix}"] = ft["curve"]
        row[f"merged_start{suffix}"] = ft["merged_start"]
        row[f"gaussians{suffix}"] = ft["gaussians"]
        row["feed_forward_seconds"] = ft["feed_forward"]["seconds"]
        if on_row is not None:
            on_row(row)
    for i in shown:
        cols = [targets[i], ours[i].clamp(0, 1)] + [renders[k][i].clamp(0, 1) for k in renders]
        _save_png(Path(f"{png_prefix}_view{i:02d}.png"), torch.cat(cols, dim=1))
    return row


def plot_curves(report: dict, path: Path) -> None:
    """PSNR of the held-out views against seconds of per-scene optimisation: fine-tuned from the feed-forward
    Gaussians (``finetune_curve``, and any ``finetune_curve_<variant>`` beside it), and splatfacto from its usual
    start (the seed cloud), per scene."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sid, row in report["scenes"].items():
        for key in sorted(k for k in row if k.startswith("finetune_curve")):  # "finetune_curve[_<variant>]"
            c, variant = row[key], key[len("finetune_curve"):].lstrip("_").replace("_", " ")
            ax.plot([p["seconds"] for p in c], [p["psnr"] for p in c], "o-",
                    label=f"ours + fine-tuning{', ' + variant if variant else ''} ({sid})")
        sf = sorted((v["seconds"], v["psnr"]) for k, v in row.items() if k.startswith("splatfacto_"))
        if sf:
            ax.plot([s for s, _ in sf], [p for _, p in sf], "s--", label=f"splatfacto from its seed cloud ({sid})")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("seconds of per-scene optimisation")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_option(text: str):
    """``FIELD=VALUE`` → (field, value), the value read as YAML (numbers, booleans, strings)."""
    import yaml

    field, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return field, yaml.safe_load(value)


def merge_reports(paths, out: Path) -> dict:
    """One report from several runs of this benchmark (e.g. splatfacto and the fine-tuning run side by side, each in
    its own process): the scenes' rows are united key by key; the plot of the curves is written beside it."""
    report = {"merged_from": [str(p) for p in paths], "scenes": {}}
    for p in paths:
        part = json.loads(Path(p).read_text())
        for k, v in part.items():
            if k != "scenes":
                report.setdefault(k, v)
        for sid, row in part["scenes"].items():
            report["scenes"].setdefault(sid, {}).update(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_splatfacto.json").write_text(json.dumps(report, indent=2))
    plot_curves(report, out / "psnr_vs_seconds.png")
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-config", type=Path, help="config.yml of a trained evolsplat-ff run")
    ap.add_argument("--budgets", type=float, nargs="+", default=[30.0, 300.0], help="seconds of splatfacto training")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_splatfacto"))
    ap.add_argument("--images", type=int, default=4, help="side-by-side images to save per scene")
    ap.add_argument("--scenes", type=int, default=None, help="only the first N evaluation scenes")
    ap.add_argument("--methods", nargs="+", choices=["splatfacto", "finetune"], default=["splatfacto"],
                    help="per-scene optimisations to run: splatfacto from the seed cloud and/or fine-tuning from the "
                         "feed-forward Gaussians, for the same budgets")
    ap.add_argument("--finetune", action="store_true", help="same as --methods splatfacto finetune")
    ap.add_argument("--merge", type=Path, nargs="+", help="only merge these reports (and plot them) into --out")
    add_finetune_arguments(ap)
    args = ap.parse_args()
    if args.merge:
        merge_reports(args.merge, args.out)
        return
    if args.load_config is None:
        ap.error("--load-config is required (unless --merge)")
    methods = ["splatfacto", "finetune"] if args.finetune else args.methods
    variants = finetune_variants(args)  # a bad variant is refused before the model is loaded
    from nerfstudio.utils.eval_utils import eval_setup

    args.out.mkdir(parents=True, exist_ok=True)
    _, pipe, _, step = eval_setup(args.load_config, test_mode="test")
    report = {"evolsplat_checkpoint_step": step, "device": torch.cuda.get_device_name(0)
              if torch.cuda.is_available() else "cpu", "scenes": {}}
    for sid in pipe.datamanager.eval_scene_ids[: args.scenes]:
        def partial(row, sid=sid):  # written after each method and variant: a run cut short keeps its rows
            report["scenes"][str(sid)] = row
            (args.out / "bench_splatfacto.json").write_text(json.dumps(report, indent=2))

        row = compare_scene(pipe, sid, args.out / f"scene{sid:03d}", args.out / "runs", f"scene{sid:03d}", args.budgets,
                            args.images, args.out / f"b7b_scene{sid:03d}", methods, variants, args.schedule, partial)
        report["scenes"][str(sid)] = row
        print(json.dumps(row, indent=1), flush=True)
    (args.out / "bench_splatfacto.json").write_text(json.dumps(report, indent=2))
    plot_curves(report, args.out / "psnr_vs_seconds.png")
    print("columns of the images: ground truth | evolsplat-ff"
          + "".join(f" | splatfacto {int(b)} s" for b in sorted(args.budgets) if "splatfacto" in methods)
          + "".join(f" | fine-tuned from ours {int(max(args.budgets))} s{' (' + v.name + ')' if v.name else ''}"
                    for v in variants if "finetune" in methods))


if __name__ == "__main__":
    main()
