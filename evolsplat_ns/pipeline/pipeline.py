"""``EvolSplatPipeline``: the train step of a feed-forward model, inside nerfstudio's stock Trainer.

Per step: draw a segment batch; switch the model to that segment (initialising its Gaussians from its point
cloud the first time, restoring its state when it returns); run the shared extraction once; render every
target view from the cut leaves and backpropagate each view's loss / T; backpropagate the accumulated leaf
gradients through the shared graph once (:mod:`evolsplat_ns.pipeline.multiview_backward`). The Trainer then
steps the optimizers once. It always calls ``backward`` on the loss it receives, so the returned loss is a
detached copy of the true loss (a fresh leaf): its backward touches no parameter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.pipeline.multiview_backward import multiview_backward

logger = logging.getLogger(__name__)


@dataclass
class EvolSplatPipelineConfig(VanillaPipelineConfig):
    """The evolsplat-ff train step (shared extraction once, exact per-view backward)."""

    _target: Type = field(default_factory=lambda: EvolSplatPipeline)
    skip_non_finite: bool = True
    """A non-finite loss or gradient skips the step (weights and optimizer state unchanged) with a warning."""
    viewer_refresh_every: int = 100
    """During training, a segment chosen in the viewer is reconstructed again every this many steps."""


class EvolSplatPipeline(VanillaPipeline):
    config: EvolSplatPipelineConfig

    def __init__(self, config: EvolSplatPipelineConfig, device: str, test_mode="val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        super().__init__(config, device, test_mode=test_mode, world_size=world_size, local_rank=local_rank,
                         grad_scaler=grad_scaler)
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self.shared_extractions = 0
        # The viewer and ns-eval render through get_outputs_for_camera: until a segment is chosen (or trained
        # on), show the first evaluation segment.
        self.ff_model.display_provider = self._default_display
        self._viewer_choice: Optional[tuple] = None
        self._viewer_pending = False
        self._trained_steps = 0
        self._segment_labels = self._make_segment_labels()
        from nerfstudio.viewer.viewer_elements import ViewerDropdown

        labels = list(self._segment_labels)
        self.viewer_segment = ViewerDropdown("Segment to display", labels[0], labels, cb_hook=self._on_viewer_segment)

    def _make_segment_labels(self) -> Dict[str, tuple]:
        dm = self.datamanager
        out: Dict[str, tuple] = {}
        for role, ids in (("eval", dm.eval_scene_ids), ("train", dm.train_scene_ids)):
            for sid in ids:
                for seg in dm.index[sid].segments:
                    out[f"{role} · scene {sid} ({dm.scenes[sid].name}) · segment {seg.segment_id}"] = (sid, seg.segment_id)
        return out

    def _on_viewer_segment(self, element) -> None:
        """GUI thread: only record the choice; the reconstruction runs on the training / rendering thread."""
        self._viewer_choice = self._segment_labels[element.value]
        self._viewer_pending = True
        if self._trained_steps == 0:  # ns-viewer on a checkpoint: the next render reconstructs it
            self.ff_model._display = None

    def _default_display(self) -> None:
        sid, seg = self._viewer_choice or self.datamanager.eval_keys()[0]
        self._viewer_pending = False
        self.show_segment(sid, seg)

    @torch.no_grad()
    def show_segment(self, scene_id: int, segment_id: int):
        """Reconstruct (scene, segment) from its fixed evaluation views and make it what the viewer renders."""
        return self.reconstruct(self.datamanager.eval_batch(scene_id, segment_id))

    # ----------------------------------------------------------------------------------------------- segments
    @property
    def ff_model(self):
        """The model itself (unwrapped from DDP)."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def activate(self, scene_id: int, segment_id: int) -> bool:
        """Make (scene, segment) the model's active segment; returns True if it was initialised now."""
        dm = self.datamanager
        model = self.ff_model

        def init():
            return model.init_segment(dm.scenes[scene_id], dm.segment(scene_id, segment_id),
                                      dm.input_frames(scene_id), dm.get_datapath())

        return model.segments.activate(scene_id, segment_id, init)

    # ----------------------------------------------------------------------------------------------- train
    def get_train_loss_dict(self, step: int):
        cameras, batch = self.datamanager.next_train(step)
        metrics = self.train_on_batch(batch, step)
        loss = torch.tensor(metrics.pop("loss_value"), device=batch.target.image.device).requires_grad_(True)
        return {}, {"loss": loss}, metrics

    def train_on_batch(self, batch: SegmentBatch, step: int) -> Dict[str, Any]:
        """Shared extraction once, per-view backward, one backward through the shared graph."""
        model = self.ff_model
        model.train()
        model.step = step
        self.activate(batch.scene_id, batch.segment_id)
        shared = model.extract_shared(batch)
        self.shared_extractions += 1
        tgt = batch.target
        T, H, W = len(tgt), tgt.height, tgt.width
        parts: List[Dict[str, torch.Tensor]] = []

        def view_loss(leaves, v):
            out = model.render_view(leaves, shared, tgt.extrinsics[v], tgt.intrinsics[v], H, W)
            ld = model.view_loss(out, tgt.image[v], step)
            parts.append({k: x.detach() for k, x in ld.items()})  # read back once, after all views
            return sum(ld.values())

        scaler = self.grad_scaler if (self.grad_scaler is not None and self.grad_scaler.is_enabled()) else None
        no_sync = self.model.no_sync if self.world_size > 1 else None
        losses = multiview_backward(shared.tensors, view_loss, T, scale=scaler.scale if scaler else None,
                                    no_sync=no_sync)
        total = sum(losses) / T
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = math.isfinite(total) and (
            not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))  # one host sync
        if not finite and self.config.skip_non_finite:
            for p in model.parameters():
                p.grad = None  # Adam skips parameters without gradient: weights and moments stay unchanged
            self.skipped_steps += 1
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", step, self.skipped_steps)
        self._trained_steps += 1
        if self._viewer_choice is None:
            model.set_display(shared.detached(), (batch.scene_id, batch.segment_id))  # follow training
        elif self._viewer_pending or step % max(1, self.config.viewer_refresh_every) == 0:
            self._viewer_pending = False
            self.show_segment(*self._viewer_choice)  # refresh the chosen segment with the current weights
        metrics: Dict[str, Any] = {
            "loss_value": total if finite else 0.0,
            "view_loss_mean": total,
            "view_loss_min": min(losses),
            "view_loss_max": max(losses),
            "num_gaussians": int(shared.tensors["means"].shape[0]),
            "skipped_steps": self.skipped_steps,
        }
        for key in parts[0]:
            metrics[key] = float(sum(p[key] for p in parts if key in p)) / T
        return metrics

    # ----------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def reconstruct(self, batch: SegmentBatch):
        """Feed-forward reconstruction of the batch's segment (no training side effects)."""
        model = self.ff_model
        was_training = model.training
        model.eval()
        self.activate(batch.scene_id, batch.segment_id)
        shared = model.extract_shared(batch)
        model.set_display(shared, (batch.scene_id, batch.segment_id))
        if was_training:
            model.train()
        return shared

    @torch.no_grad()
    def render_targets(self, batch: SegmentBatch, shared=None) -> List[Dict[str, torch.Tensor]]:
        model = self.ff_model
        shared = shared if shared is not None else self.reconstruct(batch)
        tgt = batch.target
        return [model.render_view(shared.tensors, shared, tgt.extrinsics[v], tgt.intrinsics[v], tgt.height,
                                  tgt.width, render_depth=True) for v in range(len(tgt))]

    def get_eval_loss_dict(self, step: int):
        cameras, batch = self.datamanager.next_eval(step)
        outs = self.render_targets(batch)
        model = self.ff_model
        losses = [model.view_loss(o, batch.target.image[v], step) for v, o in enumerate(outs)]
        loss_dict = {k: torch.stack([l[k] for l in losses]).mean() for k in losses[0]}
        metrics = [model.image_metrics(o["rgb"], batch.target.image[v]) for v, o in enumerate(outs)]
        metrics_dict = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        return {}, loss_dict, metrics_dict

    def get_eval_image_metrics_and_images(self, step: int):
        cameras, batch = self.datamanager.next_eval(step)
        outs = self.render_targets(batch)
        model = self.ff_model
        o, gt = outs[0], batch.target.image[0]
        metrics = model.image_metrics(o["rgb"], gt)
        metrics["num_rays"] = int(gt.shape[0] * gt.shape[1])  # the Trainer logs rendered pixels per second
        images = {"img": torch.cat([gt, o["rgb"], (o["rgb"] - gt).abs()], dim=1), "accumulation": o["accumulation"]}
        return metrics, images

    @torch.no_grad()
    def get_average_eval_image_metrics(self, step: Optional[int] = None, output_path: Optional[Path] = None,
                                       get_std: bool = False):
        """Metrics over every target view of the fixed evaluation list (every segment of the eval scenes)."""
        model = self.ff_model
        keys = self.datamanager.eval_keys()
        rows: List[Dict[str, float]] = []
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True) as progress:
            task = progress.add_task("[green]Evaluating segments", total=len(keys))
            for batch in self.datamanager.eval_batches():
                outs = self.render_targets(batch)
                for v, o in enumerate(outs):
                    gt = batch.target.image[v]
                    rows.append(model.image_metrics(o["rgb"], gt))
                    if output_path is not None:
                        _save_side_by_side(output_path, batch, v, gt, o["rgb"])
                progress.advance(task)
        out: Dict[str, float] = {}
        for k in rows[0]:
            vals = torch.tensor([r[k] for r in rows], dtype=torch.float64)
            out[k] = float(vals.mean())
            if get_std:
                out[f"{k}_std"] = float(vals.std()) if len(rows) > 1 else 0.0
        out["num_views"] = float(len(rows))
        return out


def _save_side_by_side(output_path: Path, batch: SegmentBatch, v: int, gt: torch.Tensor, pred: torch.Tensor) -> None:
    """ground truth | prediction | error, as PNG."""
    import numpy as np
    from PIL import Image

    output_path = Path(output_path)
    output_path.mkdir(parents=True, exist_ok=True)
    err = (pred - gt).abs().mean(-1, keepdim=True).expand_as(gt)
    img = torch.cat([gt, pred.clamp(0, 1), err.clamp(0, 1)], dim=1)
    arr = (img.cpu().numpy() * 255).round().astype(np.uint8)
    f = int(batch.target.frame_indices[v])
    c = int(batch.target.cam_indices[v])
    Image.fromarray(arr).save(output_path / f"scene{batch.scene_id:03d}_seg{batch.segment_id:02d}_f{f:03d}_c{c}.png")
