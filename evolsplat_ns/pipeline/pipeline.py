"""``EvolSplatPipeline``: a feed-forward model inside nerfstudio's stock Trainer (glue only).

Per step: draw a segment batch, make its segment the model's active one, run the train step
(:mod:`~evolsplat_ns.pipeline.train_step`); the Trainer then steps the optimizers. It calls ``backward`` on the loss it
receives, so that loss is a detached copy (a fresh leaf). Elsewhere: the viewer's display (:mod:`.viewer`),
evaluation (:mod:`.evaluation`), multi-GPU state (:mod:`.rank_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.engine.checkpoint import check_checkpoint, check_provenance, load_pipeline_state, resolve_checkpoint
from evolsplat_ns.errors import one_line_errors_in_nerfstudio_commands
from evolsplat_ns.export.ns_export import exporting_gaussian_splat, segment_as_splatfacto
from evolsplat_ns.pipeline import distributed as ddp_utils
from evolsplat_ns.pipeline import evaluation
from evolsplat_ns.pipeline.rank_state import RankState
from evolsplat_ns.pipeline.train_step import TrainStep
from evolsplat_ns.pipeline.viewer import SegmentDisplay


@dataclass
class EvolSplatPipelineConfig(VanillaPipelineConfig):
    """The evolsplat-ff train step (shared extraction once, exact per-view backward)."""

    _target: Type = field(default_factory=lambda: EvolSplatPipeline)
    skip_non_finite: bool = True
    """A non-finite loss or gradient skips the step (weights and optimizer state unchanged) with a warning."""
    viewer_refresh_every: int = 100
    """During training, a segment chosen in the viewer is reconstructed again every this many steps."""
    prebuild_pointclouds: bool = True
    """Build the seed clouds and KNN scales the cache lacks up front, with a progress bar (before the first step: the
    segments this run visits; before evaluating: the evaluation segments); bad data is then reported early."""

    checkpoint_source = None  # not an option: (folder, step) set by EvolSplatTrainerConfig.get_checkpoint_dir


class EvolSplatPipeline(VanillaPipeline):
    config: EvolSplatPipelineConfig

    def __init__(self, config: EvolSplatPipelineConfig, device: str, test_mode="val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        with one_line_errors_in_nerfstudio_commands():  # ns-eval / ns-viewer / ns-render: bad input is one line
            ckpt = None
            if test_mode != "val" and config.checkpoint_source is not None:  # built by nerfstudio's eval_setup
                ckpt = resolve_checkpoint(*config.checkpoint_source, None)
                check_checkpoint(ckpt, mmap=True)  # before indexing data and building the model
            # world_size 1: nerfstudio's DDP wrap does not fit this train step (RankState.setup wraps instead)
            super().__init__(config, device, test_mode=test_mode, world_size=1, local_rank=0, grad_scaler=grad_scaler)
            self.cloud_cache().check_folder("--pipeline.model.pointcloud-cache-dir")  # now, not at the first cloud
        self.ranks = RankState(local_rank, world_size)
        self._model = self.ranks.setup(self.datamanager, self._model, device)
        self.checkpoint_path: Optional[Path] = ckpt  # being loaded (eval_setup's, or the trainer's): named in errors
        self.grad_scaler = grad_scaler
        self.train_step = TrainStep(skip_non_finite=config.skip_non_finite)
        self.planned_steps: Optional[int] = None  # the trainer's max_num_iterations (None: unknown, a whole pass)
        self.first_step: Optional[int] = None  # the first step this run trained (0, or where it resumed)
        self.display = SegmentDisplay(self.ff_model, self.datamanager, self.reconstruct, config.viewer_refresh_every)
        # nerfstudio's viewer finds GUI elements and controls among the pipeline's own attributes
        self.viewer_segment, self.viewer_cameras = self.display.dropdown, self.display.cameras

    @property
    def ff_model(self):  # the model itself (unwrapped from DDP)
        return self._model.module if hasattr(self._model, "module") else self._model

    @property
    def model(self):  # under ns-export gaussian-splat: one segment as a splatfacto model (export/ns_export.py)
        return self._segment_export if getattr(self, "_segment_export", None) is not None else super().model

    def activate(self, scene_id: int, segment_id: int) -> bool:  # True if the segment was initialised now
        dm, model = self.datamanager, self.ff_model
        return model.segments.activate(scene_id, segment_id, lambda: model.init_segment(
            dm.scenes[scene_id], dm.segment(scene_id, segment_id), dm.input_frames(scene_id), dm.get_datapath()))

    def cloud_cache(self):
        from evolsplat_ns.pointcloud.cache import PointCloudCache

        return PointCloudCache(self.ff_model.config.pointcloud_cache_dir, data_root=self.datamanager.get_datapath())

    def prebuild_pointclouds(self, keys: List[Tuple[int, int]], description: str, quiet: bool = False) -> int:
        """Build the clouds and KNN scales of the ``(scene_id, segment_id)`` in ``keys`` that the cloud cache lacks,
        with a progress bar (on the model's device: see ``PointCloudOptions.backend``); returns how many were built."""
        from evolsplat_ns.pointcloud.cache import build_missing
        from evolsplat_ns.pointcloud.generators import make_generator

        dm, model = self.datamanager, self.ff_model
        items = [(dm.scenes[s], dm.segment(s, g), dm.input_frames(s)) for s, g in keys]
        return build_missing(items, make_generator(model.config.pointcloud, device=model.device), self.cloud_cache(),
                             quiet=quiet, description=description)

    # ----------------------------------------------------------------------------------------------- train
    def get_training_callbacks(self, attrs):
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        after = [TrainingCallbackLocation.AFTER_TRAIN_ITERATION]
        callbacks = super().get_training_callbacks(attrs)
        callbacks.append(TrainingCallback(after, self.display.after_train_iteration))
        if (trainer := attrs.trainer) is not None:  # it runs max_num_iterations steps from where it starts/resumes
            self.planned_steps = int(trainer.config.max_num_iterations)
            if self.ranks.distributed:  # every rank's state to rank 0 before it saves
                gather = self.ranks.save_callback(trainer.config.steps_per_save, self.planned_steps,
                                                  lambda: self.first_step or 0, self.gather_rank_states)
                callbacks.append(TrainingCallback(after, gather))
        return callbacks

    def get_train_loss_dict(self, step: int):
        if self.first_step is None:
            self.first_step = step
            if self.config.prebuild_pointclouds:
                r, upcoming = self.ranks, self.datamanager.scheduler.upcoming(self.planned_steps)
                self.prebuild_pointclouds(upcoming, f"Segment clouds{f' (rank {r.rank})' if r.distributed else ''}",
                                          quiet=r.rank != 0)
        cameras, batch = self.datamanager.next_train(step)
        metrics = self.train_on_batch(batch, step)
        loss = torch.tensor(metrics.pop("loss_value"), device=batch.target.image.device).requires_grad_(True)
        return {}, {"loss": loss}, metrics

    def train_on_batch(self, batch: SegmentBatch, step: int) -> Dict[str, Any]:
        """One train step; the viewer is served after it (a training callback), never from inside it."""
        ddp = ddp_utils.train_step_hooks(self._model) if self.ranks.distributed else None
        metrics, shared = self.train_step(self.ff_model, lambda: self.activate(batch.scene_id, batch.segment_id),
                                          batch, step, grad_scaler=self.grad_scaler, ddp=ddp)
        self.display.trained(shared.detached(), batch)
        return metrics

    # ----------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def reconstruct(self, batch: SegmentBatch):
        """Feed-forward reconstruction of the batch's segment (no training side effects), made the display."""
        model = self.ff_model
        was_training = model.training
        model.eval()
        self.activate(batch.scene_id, batch.segment_id)
        shared = model.extract_shared(batch)
        model.set_display(shared, (batch.scene_id, batch.segment_id))
        model.train(was_training)
        return shared

    def render_targets(self, batch: SegmentBatch, shared=None) -> List[Dict[str, torch.Tensor]]:  # as scored
        shared = shared if shared is not None else self.reconstruct(batch)
        return [evaluation.render_target(self.ff_model, batch, shared, v) for v in range(len(batch.target))]

    def get_eval_loss_dict(self, step: int):  # the evaluation plan's batches in turn (every target view)
        _, batch = self.datamanager.next_eval(step)
        return ({},) + evaluation.batch_losses_and_metrics(self.ff_model, batch, self.render_targets(batch), step)

    def get_eval_image_metrics_and_images(self, step: int):  # the first target view of the plan's next batch
        _, batch = self.datamanager.next_eval(step)
        return evaluation.view_metrics_and_images(self.ff_model, batch, self.reconstruct(batch), 0)

    @torch.no_grad()
    def get_average_eval_image_metrics(self, step: Optional[int] = None, output_path: Optional[Path] = None,
                                       get_std: bool = False) -> Dict[str, Any]:
        """Mean metrics over every held-out image, each scored once (:func:`.evaluation.evaluate`); ns-eval
        (``step=None``) also gets ``views`` (per image; not for the Trainer's scalar log); ``output_path``: PNGs."""
        if self.config.prebuild_pointclouds:  # first-seen clouds built up front, with a progress bar
            keys = [k for k in self.datamanager.eval_keys() if k not in self.ff_model.segments]
            self.prebuild_pointclouds(keys, "Segment clouds (evaluation)")
        result = evaluation.evaluate(self, render_dir=output_path)
        out: Dict[str, Any] = result.summary(get_std=get_std)
        if step is None:
            out["views"] = result.views
        return out

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:  # a bad checkpoint is one line
        with one_line_errors_in_nerfstudio_commands():
            load_pipeline_state(super().load_pipeline, loaded_state, step, self.checkpoint_path)
            if self.test_mode != "val" and exporting_gaussian_splat():
                self._segment_export = segment_as_splatfacto(self)

    def gather_rank_states(self, step: int) -> None:  # collective: every rank's state to rank 0 (RankState)
        self.ranks.gather(step, self.datamanager, self.ff_model.segments)

    def provenance(self) -> Dict[str, Any]:  # what a checkpoint was made from: scenes (id order), cloud options
        names = [self.datamanager.scenes[i].name for i in sorted(self.datamanager.scenes)]
        return {"scenes": names, "pointcloud": self.ff_model.config.pointcloud.to_key()}

    def get_extra_state(self) -> Dict[str, Any]:
        return {**self.ranks.extra_state(self.datamanager.config.ddp_partition), "provenance": self.provenance()}

    def set_extra_state(self, state: Any) -> None:  # read by load_state_dict, after the rest is loaded
        return None

    def load_state_dict(self, state_dict, strict: Optional[bool] = None):
        if self.test_mode == "val":  # resuming training: only on what the checkpoint was made from
            check_provenance((state_dict.get("_extra_state") or {}).get("provenance"), self.provenance(),
                             self.checkpoint_path)
        out = super().load_state_dict(state_dict, strict=strict)
        store = next((v for k, v in state_dict.items() if k.startswith("_model.")
                      and k.endswith("segments._extra_state")), None)
        self.ranks.resume(state_dict.get("_extra_state"), state_dict.get("datamanager._extra_state"), store,
                          self.datamanager, self.ff_model.segments, training=self.test_mode == "val")
        return out
