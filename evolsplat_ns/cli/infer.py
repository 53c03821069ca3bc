"""``evolsplat-ns-infer``: zero-shot reconstruction of an unseen scene with a trained checkpoint.

The scene is scored exactly as ``ns-eval`` scores it (:mod:`evolsplat_ns.pipeline.evaluation`): every held-out
image (odd frames under the default 'odd' hold-out: the reference's Drop50 protocol) is scored once, reconstructed
from the input frames of its segment nearest to it (:mod:`evolsplat_ns.data.eval_plan`). Written to ``OUT``:

* ``metrics.json`` (written atomically): ``num_views``, ``mean`` (and ``std``) over the images, ``views`` (one row
  per held-out image: scene, segment, frame, camera, psnr, ssim, lpips when available), ``batches`` (one per
  reconstruction of the plan: its source and target frames, segment initialisation and reconstruction time,
  Gaussians) and ``segments`` (per reconstructed segment: its images' mean metrics, and its default
  reconstruction: time, Gaussians, PLY);
* side-by-side PNGs (ground truth | prediction | error) under ``renders/``;
* each segment's Gaussians as a standard 3DGS PLY under ``gaussians/``, exported once per segment from its
  *default reconstruction*: the sources spread over the whole segment that the viewer shows for it
  (``datamanager.eval_batch``), so the file covers the segment rather than the surroundings of one held-out frame.

The PLY holds the colour the network decodes for one viewpoint — the segment's middle source camera — as
degree-1 spherical harmonics: view dependence around that viewpoint is kept, but a 3DGS viewer cannot reproduce
the network's conditioning on other viewpoints (colours are "baked" for that camera).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional

import tyro

from evolsplat_ns.errors import run_cli


@dataclass
class InferArgs:
    load_config: Path
    """config.yml of a trained evolsplat-ff run."""
    data: Path
    """An unseen scene folder (or a multi-scene root: every scene is reconstructed)."""
    output: Path = Path("infer_output")
    """Output folder: new or empty, or the output of an earlier evolsplat-ns-infer run (then cleared first, so
    that old and new files never mix; ``metrics.json`` is written last: a folder without it is an interrupted
    run)."""
    holdout: Literal["odd", "none", "Drop25", "Drop50", "Drop80", "Drop90"] = "odd"
    """'odd': even frames are inputs and odd frames are tested (Drop50); 'none': every frame may be an input;
    DropXX: the reference's frame-sparsity protocols."""
    export_ply: bool = True
    finetune_seconds: float = 0.0
    """After the zero-shot reconstruction, optimise each scene for this many seconds (0: no fine-tuning), started
    from its segments' merged feed-forward Gaussians (method ``evolsplat-ft``, splatfacto's machinery). Written
    under ``finetune/<scene>/``: a nerfstudio run (``config.yml`` for ns-viewer / ns-eval / ns-export), the
    fine-tuned 3DGS PLY in the data's world frame; ``metrics.json`` gets ``feed_forward`` and ``finetuned``."""
    finetune_max_steps: Optional[int] = None
    """Stop fine-tuning after this many steps even if time is left (tests, reproducible runs)."""
    finetune_schedule: Literal["budget", "steps"] = "budget"
    """'budget': the learning-rate decay and the end of densification are stretched over ``--finetune-seconds``
    (and ``--finetune-max-steps``), so the run ends refined, as a full-length splatfacto run does; 'steps':
    splatfacto's schedule step by step, as ``ns-train evolsplat-ft`` runs it (a short run then ends mid-schedule)."""
    finetune_start: Literal["middle", "sources", "windows"] = "middle"
    """How each segment's Gaussians become the static start (:mod:`evolsplat_ns.finetune.merge`): decoded for its
    middle source camera; averaged over its source cameras; or reconstructed once per near-source window over its
    time span, with each point's median opacity over the windows (drops what only some times saw, e.g. the LiDAR
    trail of a passing car; one reconstruction per window, so slower)."""
    verbose: bool = False


def check_load_config(path: Path) -> None:
    """``--load-config`` is the ``config.yml`` that ``ns-train`` wrote for an ``evolsplat-ff`` run: not its folder,
    not other YAML (nerfstudio's ``eval_setup`` would fail with a bare ``AssertionError``), not another method's run."""
    import yaml
    from nerfstudio.engine.trainer import TrainerConfig

    from evolsplat_ns.data.layouts.common import read_text
    from evolsplat_ns.errors import DataValidationError

    what = "the config.yml of a trained evolsplat-ff run (outputs/<experiment>/evolsplat-ff/<timestamp>/config.yml)"
    if path.is_dir():
        inner = path / "config.yml"
        raise DataValidationError(path, "--load-config", what,
                                  f"a folder (pass {inner})" if inner.is_file() else "a folder")
    try:
        config = yaml.load(read_text(path, what, "--load-config"), Loader=yaml.Loader)  # as eval_setup reads it
    except yaml.YAMLError as e:
        raise DataValidationError(path, "--load-config", what, f"not a config ({' '.join(str(e).split())[:120]})") \
            from None
    if not isinstance(config, TrainerConfig):
        raise DataValidationError(path, "--load-config", what, f"YAML holding {type(config).__name__}, not a "
                                  "TrainerConfig")
    method = str(getattr(config, "method_name", ""))
    if not method.startswith("evolsplat-ff"):
        raise DataValidationError(path, "--load-config", what, f"a run of method {method!r}")


def infer(args: InferArgs) -> Dict[str, object]:
    from nerfstudio.utils.eval_utils import eval_setup

    from evolsplat_ns.atomic import write_atomic
    from evolsplat_ns.errors import ConfigError, DataValidationError
    from evolsplat_ns.data.layouts import HOLDOUT_MODES, find_layout_scenes
    from evolsplat_ns.export.ply import write_gaussian_ply
    from evolsplat_ns.export.world_frame import to_data_world
    from evolsplat_ns.pipeline.evaluation import evaluate

    if not args.load_config.exists():
        raise DataValidationError(args.load_config, None, "an existing config.yml of a trained run")
    check_output(Path(args.output))  # before any long work
    check_load_config(Path(args.load_config))  # a folder, other YAML, another method: named before any work
    if args.holdout not in HOLDOUT_MODES:  # a usage error (Python callers bypass tyro's check), not a bad checkpoint
        raise ConfigError(f"--holdout {args.holdout!r}: expected one of {', '.join(HOLDOUT_MODES)}")
    n_scenes = len(find_layout_scenes(args.data, "auto"))  # any layout (multiscene, reference, drivestudio, ...)

    def retarget(config):
        dm = config.pipeline.datamanager
        dm.data = args.data
        dm.dataparser.data = args.data
        dm.dataparser.layout = "auto"  # the new data may come in another layout; cameras / downscale carry over
        dm.dataparser.train_scene_ids = tuple(range(n_scenes))
        dm.dataparser.eval_scene_ids = tuple(range(n_scenes))
        dm.dataparser.eval_holdout = args.holdout
        return config

    try:
        _, pipeline, ckpt, step = eval_setup(args.load_config, test_mode="test", update_config_callback=retarget)
    except (RuntimeError, EOFError, KeyError, OSError, ValueError) as e:  # torch.load of a truncated/foreign file
        if isinstance(e, (DataValidationError, ConfigError)):  # bad data or options, not a bad checkpoint
            raise
        raise DataValidationError(args.load_config.parent / "nerfstudio_models", "checkpoint",
                                  "a complete evolsplat-ff checkpoint (step-*.ckpt) matching this config",
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from e
    model = pipeline.ff_model
    model.segments.clear()  # the checkpoint's segments belong to its own training scenes
    out = _fresh_output(Path(args.output))
    result = evaluate(pipeline, render_dir=out / "renders", description="Scoring held-out views")
    dm = pipeline.datamanager
    metric_names = result.metric_names()
    seg_rows: List[Dict[str, object]] = []
    seen = []
    for b in result.batches:  # segments in plan order
        if (b.scene_id, b.segment) not in seen:
            seen.append((b.scene_id, b.segment))
    for sid, seg in seen:
        scene = dm.scenes[sid]
        views = [r for r in result.views if (r["scene_id"], r["segment"]) == (sid, seg)]
        batches = [b for b in result.batches if (b.scene_id, b.segment) == (sid, seg)]
        entry: Dict[str, object] = {
            "scene": scene.name, "scene_id": sid, "segment": seg, "num_views": len(views), "num_batches": len(batches),
            **{k: sum(float(r[k]) for r in views) / len(views) for k in metric_names},
            "batch_reconstruction_ms_mean": sum(b.reconstruction_ms for b in batches) / len(batches),
            # first-seen work (seed cloud, KNN scales, initial Gaussians; milliseconds when the cloud cache has it)
            "segment_init_ms": sum(b.init_ms for b in batches),
        }
        # the segment's default reconstruction (sources spread over the segment, as the viewer shows it)
        batch = dm.eval_batch(sid, seg)
        pipeline.activate(sid, seg)
        _sync()
        t0 = time.perf_counter()
        shared = pipeline.reconstruct(batch)
        _sync()
        entry["reconstruction_ms"] = 1000 * (time.perf_counter() - t0)
        entry["num_gaussians"] = shared.num_gaussians
        if args.export_ply:
            g = to_data_world(model.export_gaussians(shared), scene.align)  # overlays on the user's data
            p = write_gaussian_ply(out / "gaussians" / f"{scene.name}_seg{seg:02d}.ply", g["means"], g["sh"],
                                   g["opacity_logit"], g["log_scales"], g["quats"])
            entry["ply"] = str(p)
        seg_rows.append(entry)
    stats = result.summary(get_std=True)
    finetuned = _finetune(pipeline, result, out, args) if args.finetune_seconds > 0 else None
    summary = {
        "checkpoint": str(ckpt),
        "step": step,
        "data": str(args.data),
        "num_views": result.num_views,
        "mean": {k: stats[k] for k in metric_names},
        "std": {k: stats[f"{k}_std"] for k in metric_names},
        "segments": seg_rows,
        "batches": result.batch_dicts(),
        "views": result.views,
    }
    if finetuned is not None:
        summary.update(finetuned)
    text = json.dumps(summary, indent=2)
    write_atomic(out / "metrics.json", lambda f: f.write(text.encode("utf-8")))
    return summary


OUTPUT_MARKER = ".evolsplat-ns-infer"
"""Written first into an output folder: marks it as this command's (a later run may clear it)."""


def check_output(out: Path) -> None:
    """``--output`` must be a folder this command may fill: new, empty, or an earlier run's."""
    from evolsplat_ns.errors import DataValidationError

    if out.exists() and not out.is_dir():
        raise DataValidationError(out, "--output", "a folder to write into (or a path to create)", "an existing file")
    if out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists() and not (out / "metrics.json").exists():
        raise DataValidationError(out, "--output", "a new or empty folder, or an earlier evolsplat-ns-infer output",
                                  "a non-empty folder of other files (nothing was changed in it)")
    from evolsplat_ns.atomic import ensure_folder

    ensure_folder(out, "--output")  # created now: a path through a file or a refused mkdir is named before any work


def _fresh_output(out: Path) -> Path:
    """Clear an earlier run's output (checked by :func:`check_output`), create the folder and mark it."""
    import shutil

    if out.is_dir() and any(out.iterdir()):
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("evolsplat-ns-infer output; metrics.json is written last\n")
    return out


def _finetune(pipeline, result, out: Path, args: InferArgs) -> Dict[str, object]:
    """Fine-tune every evaluated scene (:mod:`evolsplat_ns.finetune.run`); ``feed_forward`` and ``finetuned``: the
    means over all held-out views (scenes weighted by their views), ``finetune_scenes``: one row per scene."""
    from evolsplat_ns.finetune.run import finetune_scene

    rows = []
    for sid in pipeline.datamanager.eval_scene_ids:
        views = [r for r in result.views if r["scene_id"] == sid]
        if not views:
            continue
        ff = {k: sum(float(r[k]) for r in views) / len(views) for k in ("psnr", "ssim")}
        name = pipeline.datamanager.scenes[sid].name
        rows.append(finetune_scene(pipeline, sid, out / "finetune" / name, args.finetune_seconds, ff,
                                   max_steps=args.finetune_max_steps, schedule=args.finetune_schedule,
                                   bake=args.finetune_start))
    total = sum(r["num_views"] for r in rows)

    def mean(key):
        return {k: sum(r[key][k] * r["num_views"] for r in rows) / total for k in ("psnr", "ssim")} | {
            "seconds": sum(r[key]["seconds"] for r in rows)}

    return {"feed_forward": mean("feed_forward"), "finetuned": mean("finetuned"), "finetune_scenes": rows}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(args: InferArgs) -> Dict[str, object]:
    from rich.console import Console

    summary = run_cli(lambda: infer(args), args.verbose)
    con = Console()
    for s in summary["segments"]:  # type: ignore[index]
        con.print(f"{s['scene']} segment {s['segment']}: {s['num_views']} views, "
                  f"psnr {s.get('psnr', float('nan')):.2f} "
                  f"dB, ssim {s.get('ssim', float('nan')):.3f}; default reconstruction {s['num_gaussians']} Gaussians "
                  f"in {s['reconstruction_ms']:.0f} ms")
    con.print(f"{summary['num_views']} held-out views, mean {summary['mean']}; renders, PLYs and metrics.json in "
              f"{args.output}")
    if "finetuned" in summary:
        ff, ft = summary["feed_forward"], summary["finetuned"]
        con.print(f"fine-tuned {ft['seconds']:.0f} s: psnr {ff['psnr']:.2f} -> {ft['psnr']:.2f} dB, ssim "
                  f"{ff['ssim']:.3f} -> {ft['ssim']:.3f}; runs (ns-viewer --load-config) under {args.output}/finetune/")
    return summary


def entrypoint(argv: Optional[list] = None) -> None:
    main(tyro.cli(InferArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
