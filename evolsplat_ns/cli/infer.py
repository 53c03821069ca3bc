"""``evolsplat-ns-infer``: zero-shot reconstruction of an unseen scene with a trained checkpoint.

Each segment of the scene is reconstructed in one forward pass from its input frames (even frames: the
reference's Drop50 protocol), its held-out views (odd frames) are rendered and scored, and the results are
written to ``OUT``: ``metrics.json`` (per view, per segment, mean), side-by-side PNGs (ground truth | prediction
| error) under ``renders/``, and each segment's Gaussians as a standard 3DGS PLY under ``gaussians/``. Per segment,
``segment_init_ms`` is the first-seen work (seed cloud, KNN scales, initial Gaussians; milliseconds when the cloud
cache has the segment) and ``reconstruction_ms`` the network's forward pass.

The PLY holds the colour the network decodes for one viewpoint — the segment's middle source camera — as
degree-1 spherical harmonics: view dependence around that viewpoint is kept, but a 3DGS viewer cannot reproduce
the network's conditioning on other viewpoints (colours are "baked" for that camera).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import tyro

from evolsplat_ns.cli.common import run_cli


@dataclass
class InferArgs:
    load_config: Path
    """config.yml of a trained evolsplat-ff run."""
    data: Path
    """An unseen scene folder (or a multi-scene root: every scene is reconstructed)."""
    output: Path = Path("infer_output")
    """Output folder."""
    holdout: str = "odd"
    """'odd': even frames are inputs and odd frames are tested (Drop50); 'none': every frame may be an input."""
    export_ply: bool = True
    quiet: bool = False
    """No progress bar."""
    verbose: bool = False


def infer(args: InferArgs) -> Dict[str, object]:
    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    from evolsplat_ns.data.errors import DataValidationError
    from evolsplat_ns.data.layouts import find_layout_scenes
    from evolsplat_ns.pointcloud.cache import progress_bar

    if not args.load_config.exists():
        raise DataValidationError(args.load_config, None, "an existing config.yml of a trained run")
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
        if isinstance(e, DataValidationError):
            raise
        raise DataValidationError(args.load_config.parent / "nerfstudio_models", "checkpoint",
                                  "a complete evolsplat-ff checkpoint (step-*.ckpt) matching this config",
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from e
    model = pipeline.ff_model
    model.segments.clear()  # the checkpoint's segments belong to its own training scenes
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, object]] = []
    seg_rows: List[Dict[str, object]] = []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    with progress_bar("Reconstructing segments", quiet=args.quiet) as progress:
        task = progress.add_task("", total=len(pipeline.datamanager.eval_keys()))
        for batch in pipeline.datamanager.eval_batches():
            _infer_segment(args, pipeline, model, batch, out, rows, seg_rows, sync)
            progress.advance(task)
    keys = [k for k in ("psnr", "ssim", "lpips") if rows and k in rows[0]]
    summary = {
        "checkpoint": str(ckpt),
        "step": step,
        "data": str(args.data),
        "mean": {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys},
        "segments": seg_rows,
        "views": rows,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _infer_segment(args, pipeline, model, batch, out, rows, seg_rows, sync) -> None:
    """One segment: initialise it (first seen: seed cloud, KNN scales, initial Gaussians), reconstruct, score its
    held-out views, export its Gaussians."""
    import torch

    from evolsplat_ns.export.ply import write_gaussian_ply
    from evolsplat_ns.pipeline.pipeline import _save_side_by_side

    t0 = time.perf_counter()
    pipeline.activate(batch.scene_id, batch.segment_id)
    sync()
    init_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    shared = pipeline.reconstruct(batch)
    sync()
    recon_ms = 1000 * (time.perf_counter() - t0)
    outs = pipeline.render_targets(batch, shared)
    scene = pipeline.datamanager.scenes[batch.scene_id]
    seg_metrics = []
    for v, o in enumerate(outs):
        gt = batch.target.image[v]
        m = model.image_metrics(o["rgb"], gt)
        row = {"scene": scene.name, "segment": batch.segment_id, "frame": int(batch.target.frame_indices[v]),
               "camera": int(batch.target.cam_indices[v]), **m}
        rows.append(row)
        seg_metrics.append(m)
        _save_side_by_side(out / "renders", batch, v, gt, o["rgb"])
    entry = {"scene": scene.name, "segment": batch.segment_id, "segment_init_ms": init_ms,
             "reconstruction_ms": recon_ms,
             "num_gaussians": int(shared.tensors["means"].shape[0]),
             **{k: sum(m[k] for m in seg_metrics) / len(seg_metrics) for k in seg_metrics[0]}}
    if args.export_ply:
        g = model.export_gaussians(shared)
        # back to the data's own world frame so the cloud overlays on the user's data
        align_inv = torch.linalg.inv(torch.as_tensor(scene.align, dtype=torch.float32, device=g["means"].device))
        means = g["means"] @ align_inv[:3, :3].T + align_inv[:3, 3]
        R = align_inv[:3, :3]
        quats = _rotate_quats(g["quats"], R)
        p = write_gaussian_ply(out / "gaussians" / f"{scene.name}_seg{batch.segment_id:02d}.ply", means, g["sh"],
                               g["opacity_logit"], g["log_scales"], quats)
        entry["ply"] = str(p)
    seg_rows.append(entry)


def _rotate_quats(q, R):
    """Quaternions (w x y z) of ``R @ rot(q)``."""
    from scipy.spatial.transform import Rotation
    import torch

    r = Rotation.from_matrix(R.detach().cpu().double().numpy())
    qn = q.detach().cpu().double().numpy()
    rot = r * Rotation.from_quat(qn[:, [1, 2, 3, 0]])
    xyzw = rot.as_quat()
    return torch.as_tensor(xyzw[:, [3, 0, 1, 2]], dtype=torch.float32)


def main(args: InferArgs) -> Dict[str, object]:
    from rich.console import Console

    summary = run_cli(lambda: infer(args), args.verbose)
    con = Console()
    for s in summary["segments"]:  # type: ignore[index]
        con.print(f"{s['scene']} segment {s['segment']}: psnr {s.get('psnr', float('nan')):.2f} dB, "
                  f"ssim {s.get('ssim', float('nan')):.3f}, {s['num_gaussians']} Gaussians, "
                  f"segment init {s['segment_init_ms']:.0f} ms, reconstruction {s['reconstruction_ms']:.0f} ms")
    con.print(f"mean {summary['mean']}; renders, PLYs and metrics.json in {args.output}")
    return summary


def entrypoint(argv: Optional[list] = None) -> None:
    main(tyro.cli(InferArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
