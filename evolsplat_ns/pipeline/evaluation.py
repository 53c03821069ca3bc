"""One evaluation path: every held-out image of the evaluation scenes, scored exactly once.

Used by ``ns-eval`` (``EvolSplatPipeline.get_average_eval_image_metrics``, also the Trainer's periodic
all-images evaluation) and by ``evolsplat-ns-infer``, so that both score the same images the same way. It walks the
datamanager's evaluation plan (:mod:`evolsplat_ns.data.eval_plan`): per planned batch, the segment is made active
(its Gaussians initialised from its point cloud the first time), reconstructed once from the batch's source
views, and each target view is rendered (reference composite, :func:`render_target`) and
scored: one metric row per held-out image (scene, segment, frame, camera, psnr, ssim, lpips when its weights are
available). Optionally each image is saved as a side-by-side PNG: ground truth | prediction | error.

Nothing here imports the command-line layer or the viewer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from evolsplat_ns.data.batch import SegmentBatch

VIEW_KEYS = ("scene", "scene_id", "segment", "frame", "camera")
"""Keys of a metric row that name the image; the other keys are metrics."""


@dataclass
class BatchRecord:
    """What one reconstruction of the plan cost and produced."""

    scene: str
    scene_id: int
    segment: int
    source_frames: List[int]
    target_frames: List[int]
    init_ms: float
    """Initialising the segment (point cloud -> Gaussians) when this batch was its first use, else 0."""
    reconstruction_ms: float
    """The feed-forward reconstruction (shared extraction) alone, device-synchronised."""
    num_gaussians: int


@dataclass
class EvalResult:
    """Metric rows (one per held-out image, plan order) and one record per reconstruction."""

    views: List[Dict[str, Any]] = field(default_factory=list)
    batches: List[BatchRecord] = field(default_factory=list)

    @property
    def num_views(self) -> int:
        return len(self.views)

    def metric_names(self) -> List[str]:
        return [k for k in self.views[0] if k not in VIEW_KEYS] if self.views else []

    def summary(self, get_std: bool = False) -> Dict[str, float]:
        """Mean of each metric over the images (and its standard deviation, ``<metric>_std``), and ``num_views``."""
        out: Dict[str, Any] = {}
        for k in self.metric_names():
            vals = torch.tensor([float(r[k]) for r in self.views], dtype=torch.float64)
            out[k] = float(vals.mean())
            if get_std:
                out[f"{k}_std"] = float(vals.std()) if len(vals) > 1 else 0.0
        out["num_views"] = self.num_views
        return out

    def batch_dicts(self) -> List[Dict[str, Any]]:
        return [asdict(b) for b in self.batches]


@torch.no_grad()
def render_target(model, batch: SegmentBatch, shared, v: int) -> Dict[str, torch.Tensor]:
    """Target view ``v`` of ``batch`` from its reconstruction ``shared``, as evaluation scores it: with depth, so
    through the reference composite ``fg + (1 - alpha_fg) bg`` (two rasterizations)."""
    tgt = batch.target
    return model.render_view(shared, tgt.extrinsics[v], tgt.intrinsics[v], tgt.height, tgt.width, render_depth=True)


def batch_losses_and_metrics(model, batch: SegmentBatch, outs: List[Dict[str, torch.Tensor]], step: int
                             ) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The training loss terms and the image metrics of the rendered target views ``outs``, each averaged over the
    views (nerfstudio's periodic evaluation batch)."""
    gt = batch.target.image
    losses = [model.view_loss(o, gt[v], step) for v, o in enumerate(outs)]
    metrics = [model.image_metrics(o["rgb"], gt[v]) for v, o in enumerate(outs)]
    return ({k: torch.stack([l[k] for l in losses]).mean() for k in losses[0]},
            {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]})


def view_metrics_and_images(model, batch: SegmentBatch, shared, v: int) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """nerfstudio's periodic evaluation image: metrics of target view ``v`` and the images it logs (ground truth |
    prediction | error, and the foreground accumulation)."""
    o, gt = render_target(model, batch, shared, v), batch.target.image[v]
    metrics: Dict[str, Any] = model.image_metrics(o["rgb"], gt)
    metrics["num_rays"] = int(gt.shape[0] * gt.shape[1])  # the Trainer logs rendered pixels per second
    return metrics, {"img": torch.cat([gt, o["rgb"], (o["rgb"] - gt).abs()], dim=1), "accumulation": o["accumulation"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(pipeline, render_dir: Optional[Path] = None, description: str = "Evaluating held-out views",
             on_view: Optional[Callable[..., None]] = None) -> EvalResult:
    """Score every held-out image of the pipeline's evaluation plan once (see the module docstring).

    Args:
        pipeline: an :class:`~evolsplat_ns.pipeline.pipeline.EvolSplatPipeline` (its datamanager gives the plan).
        render_dir: if given, a side-by-side PNG per image is written there
            (``scene{id:03d}_seg{seg:02d}_f{frame:03d}_c{camera}.png``).
        description: label of the progress bar.
        on_view: called after each image is scored as ``on_view(batch, shared, v, pred, gt, row)`` (benchmarks score
            their baselines on exactly the same images there).
    """
    from nerfstudio.utils.rich_utils import CONSOLE
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    dm = pipeline.datamanager
    model = pipeline.ff_model
    total = len(dm.held_out_views())
    result = EvalResult()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                  MofNCompleteColumn(), console=CONSOLE, transient=True) as progress:
        task = progress.add_task(f"[green]{description}", total=total)
        for batch in dm.eval_batches():
            device = batch.target.image.device
            scene = dm.scenes[batch.scene_id]
            _sync(device)
            t0 = time.perf_counter()
            is_new = pipeline.activate(batch.scene_id, batch.segment_id)
            _sync(device)
            t1 = time.perf_counter()
            shared = pipeline.reconstruct(batch)
            _sync(device)
            t2 = time.perf_counter()
            result.batches.append(BatchRecord(
                scene=scene.name, scene_id=batch.scene_id, segment=batch.segment_id,
                source_frames=sorted(set(batch.source.frame_indices.tolist())),
                target_frames=sorted(set(batch.target.frame_indices.tolist())),
                init_ms=1000 * (t1 - t0) if is_new else 0.0, reconstruction_ms=1000 * (t2 - t1),
                num_gaussians=shared.num_gaussians))
            for v in range(len(batch.target)):
                pred = render_target(model, batch, shared, v)["rgb"]
                gt = batch.target.image[v]
                row: Dict[str, Any] = {"scene": scene.name, "scene_id": batch.scene_id, "segment": batch.segment_id,
                                       "frame": int(batch.target.frame_indices[v]),
                                       "camera": int(batch.target.cam_indices[v])}
                row.update(model.image_metrics(pred, gt))
                result.views.append(row)
                if render_dir is not None:
                    save_side_by_side(render_dir, batch, v, gt, pred)
                if on_view is not None:
                    on_view(batch, shared, v, pred, gt, row)
                progress.advance(task)
    return result


def save_side_by_side(output_dir: Path, batch: SegmentBatch, v: int, gt: torch.Tensor, pred: torch.Tensor) -> Path:
    """Target view ``v`` of ``batch`` as one PNG: ground truth | prediction | error (mean absolute over RGB)."""
    import numpy as np
    from PIL import Image

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    err = (pred - gt).abs().mean(-1, keepdim=True).expand_as(gt)
    img = torch.cat([gt, pred.clamp(0, 1), err.clamp(0, 1)], dim=1)
    arr = (img.cpu().numpy() * 255).round().astype(np.uint8)
    f = int(batch.target.frame_indices[v])
    c = int(batch.target.cam_indices[v])
    path = output_dir / f"scene{batch.scene_id:03d}_seg{batch.segment_id:02d}_f{f:03d}_c{c}.png"
    Image.fromarray(arr).save(path)
    return path
