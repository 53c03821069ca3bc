"""``EvolSplatPipeline``: a feed-forward model inside nerfstudio's stock Trainer.

Per step: draw a segment batch; switch the model to that segment (initialising its Gaussians from its point
cloud the first time, restoring its state when it returns); run the train step
(:mod:`evolsplat_ns.pipeline.train_step`: shared extraction once, exact per-view backward, non-finite steps
skipped). The Trainer then steps the optimizers once. It always calls ``backward`` on the loss it receives, so the
returned loss is a detached copy of the true loss (a fresh leaf): its backward touches no parameter.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.errors import CheckpointError, one_line_errors_in_nerfstudio_commands
from evolsplat_ns.engine.checkpoint import check_checkpoint, check_pipeline_state, resolve_checkpoint, summarize_load_error
from evolsplat_ns.pipeline import distributed as ddp_utils
from evolsplat_ns.pipeline.train_step import DistributedHooks, TrainStep

logger = logging.getLogger(__name__)


@dataclass
class EvolSplatPipelineConfig(VanillaPipelineConfig):
    """The evolsplat-ff train step (shared extraction once, exact per-view backward)."""

    _target: Type = field(default_factory=lambda: EvolSplatPipeline)
    skip_non_finite: bool = True
    """A non-finite loss or gradient skips the step (weights and optimizer state unchanged) with a warning."""
    viewer_refresh_every: int = 100
    """During training, a segment chosen in the viewer is reconstructed again every this many steps."""
    prebuild_pointclouds: bool = True
    """Before the first training step, build the seed clouds and KNN scales of the segments the schedule will visit in
    this run (and before evaluating every segment, those of the evaluation segments) that the cloud cache lacks, with
    a progress bar. Training would build each one when it first reaches it; this does the same work up front, with
    an estimate of how long it takes, and reports bad data before the first step."""


class EvolSplatPipeline(VanillaPipeline):
    config: EvolSplatPipelineConfig

    def __init__(self, config: EvolSplatPipelineConfig, device: str, test_mode="val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        with one_line_errors_in_nerfstudio_commands():  # ns-eval / ns-viewer / ns-render: bad input is one line
            # Built by nerfstudio's eval_setup? Check the checkpoint it will load before indexing data / building.
            ckpt = _checkpoint_of_eval_setup() if test_mode != "val" else None
            if ckpt is not None:
                check_checkpoint(ckpt, mmap=True)
            # world_size 1 here: nerfstudio's DDP wrap does not fit this train step (see _setup_distributed)
            super().__init__(config, device, test_mode=test_mode, world_size=1, local_rank=0,
                             grad_scaler=grad_scaler)
        self._setup_distributed(device, world_size, local_rank)
        self.checkpoint_path: Optional[Path] = ckpt
        """The checkpoint being loaded (set by eval_setup's caller or the trainer), named in load errors."""
        self.grad_scaler = grad_scaler
        self.train_step = TrainStep(skip_non_finite=config.skip_non_finite)
        # The viewer and ns-eval render through get_outputs_for_camera: until a segment is chosen (or trained
        # on), show the first evaluation segment.
        self.ff_model.display_provider = self._default_display
        self._trained_steps = 0
        self._last_trained = None  # (detached shared state, batch) of the last train step: what the viewer follows
        self._prebuilt = False
        self.planned_steps: Optional[int] = None
        """Steps this run trains (the trainer's ``max_num_iterations``, set in ``get_training_callbacks``); the
        clouds built before the first step are those of the segments these steps visit (None: a whole pass)."""
        from nerfstudio.viewer.viewer_elements import ViewerDropdown

        from evolsplat_ns.pipeline.viewer import SegmentCameras, SegmentPicker

        self.segment_picker = SegmentPicker(self._make_segment_labels())
        labels = list(self.segment_picker.labels)
        self.viewer_segment = ViewerDropdown("Segment to display", labels[0], labels, cb_hook=self._on_viewer_segment)

        self.viewer_cameras = SegmentCameras()  # the displayed segment's camera frustums (evolsplat_ns.pipeline.viewer)

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
        self.segment_picker.pick(element.value)
        self.viewer_cameras.request_move()  # browsers look at the picked segment once it is shown
        # The next render reconstructs it (or the next training step, whichever comes first): this also works when
        # training is paused or finished. The viewer runs this callback under its train lock.
        self.ff_model.clear_display()

    def _default_display(self) -> None:
        choice, _ = self.segment_picker.take()
        self.show_segment(*(choice or self.datamanager.eval_keys()[0]))

    def _after_train_iteration(self, step: int) -> None:
        """Training callback, after each train iteration: the viewer's display follows training, or shows the picked
        segment (reconstructed when newly picked, refreshed every ``viewer_refresh_every`` steps)."""
        if self.segment_picker.choice is None:
            if self._last_trained is not None:
                shared, batch = self._last_trained
                key = (batch.scene_id, batch.segment_id)
                self.ff_model.set_display(shared, key)  # follow training
                self.viewer_cameras.show(batch, key)  # draws only on a new segment
            return
        key = self.segment_picker.due(step, self.config.viewer_refresh_every)
        if key is not None:
            self.show_segment(*key)  # the picked segment, with the current weights

    @torch.no_grad()
    def show_segment(self, scene_id: int, segment_id: int):
        """Reconstruct (scene, segment) from its fixed evaluation views and make it what the viewer renders."""
        batch = self.datamanager.eval_batch(scene_id, segment_id)
        shared = self.reconstruct(batch)
        self.viewer_cameras.show(batch, (scene_id, segment_id))  # no-op without a viewer or if already drawn
        return shared

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        """nerfstudio's load, with a checkpoint of another method or of a differently configured model reported as
        one :class:`CheckpointError` line (naming the file when known) instead of load_state_dict's key listing."""
        with one_line_errors_in_nerfstudio_commands():
            path = self.checkpoint_path
            check_pipeline_state(loaded_state, path)
            try:
                super().load_pipeline(loaded_state, step)
            except RuntimeError as e:
                raise CheckpointError(path or Path("<checkpoint>"), "pipeline",
                                      "weights of the model this config builds (same model options as the run "
                                      "that wrote the checkpoint)", summarize_load_error(e)) from e

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

    def prebuild_pointclouds(self, keys: List[tuple], description: str, quiet: bool = False) -> int:
        """Build the clouds and KNN scales of the ``(scene_id, segment_id)`` in ``keys`` that the cloud cache lacks,
        with a progress bar (on the model's device: see ``PointCloudOptions.backend``); returns how many were built."""
        from evolsplat_ns.pointcloud.cache import PointCloudCache, build_all
        from evolsplat_ns.pointcloud.generators import make_generator

        dm, model = self.datamanager, self.ff_model
        generator = make_generator(model.config.pointcloud, device=model.device)
        cache = PointCloudCache(model.config.pointcloud_cache_dir, data_root=dm.get_datapath())
        todo = []
        for sid, seg_id in dict.fromkeys(keys):  # unique, in order
            item = (dm.scenes[sid], dm.segment(sid, seg_id), dm.input_frames(sid))
            if not cache.is_built(generator, *item):
                todo.append(item)
        if todo:
            build_all(todo, generator, cache, quiet=quiet, with_knn=True, description=description)
        return len(todo)

    def _prebuild_for_training(self) -> None:
        """The segments this run's schedule visits (this rank's; a whole pass when the run length is unknown)."""
        if self._prebuilt or not self.config.prebuild_pointclouds:
            return
        self._prebuilt = True
        keys = self.datamanager.scheduler.upcoming(self.planned_steps)
        self.prebuild_pointclouds(keys, f"Segment clouds{f' (rank {self.rank})' if self.world_size > 1 else ''}",
                                  quiet=self.rank != 0)

    # ----------------------------------------------------------------------------------------------- multi-GPU
    def _setup_distributed(self, device, world_size: int, local_rank: int) -> None:
        """Multi-GPU (nerfstudio's launch, one process per GPU): this rank's share of the training segments, the
        model in DDP, a gloo group for checkpoint state (:mod:`evolsplat_ns.pipeline.distributed`).

        nerfstudio's own wrap (``VanillaPipeline``) passes ``device_ids`` also for CPU modules, which DDP rejects,
        and hands the datamanager the *local* rank; segment ownership needs the global one."""
        self.local_rank = int(local_rank)
        self.rank, self.world_size = ddp_utils.resolve_rank(local_rank, world_size)
        self._rank_states: Optional[List[Dict[str, Any]]] = None  # rank 0: every rank's state, for its checkpoints
        self._ddp_checkpoint_state: Optional[Dict[str, Any]] = None
        self._object_group = None
        if self.world_size == 1:
            return
        self.datamanager.set_partition(self.rank, self.world_size)
        self._model = ddp_utils.wrap_ddp(self._model, device)
        self._object_group = ddp_utils.object_group()
        torch.distributed.barrier()

    def get_training_callbacks(self, training_callback_attributes):
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                                          self._after_train_iteration))
        trainer = training_callback_attributes.trainer
        if trainer is not None:  # nerfstudio runs max_num_iterations steps from wherever it starts (or resumes)
            self.planned_steps = int(trainer.config.max_num_iterations)
        if self.world_size > 1 and trainer is not None:
            from nerfstudio.utils.misc import step_check

            def before_save(step: int) -> None:  # the trainer saves (rank 0) after this, at the same steps
                cfg = trainer.config
                last = getattr(trainer, "_start_step", 0) + cfg.max_num_iterations - 1
                if step_check(step, cfg.steps_per_save) or step == last:
                    self.gather_rank_states(step)

            callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], before_save))
        return callbacks

    def gather_rank_states(self, step: int) -> None:
        """Collective (every rank calls it at the same step): every rank's resumable state, i.e. its scheduler
        position and its segment store, to rank 0, whose next checkpoint then holds them (rank 0's own store is
        the model's ``segments`` entry already)."""
        dm = self.datamanager
        mine = {"rank": self.rank, "step": int(step), "scheduler": dm.scheduler.state_dict(),
                "train_count": int(dm.train_count),
                "segments": None if self.rank == 0 else self.ff_model.segments.get_extra_state()}
        states = ddp_utils.gather_to_rank0(mine, self._object_group)
        if states is not None:
            self._rank_states = states

    def get_extra_state(self) -> Dict[str, Any]:
        """Multi-GPU checkpoints: every rank's state as gathered by :meth:`gather_rank_states` (plain types only)."""
        if self.world_size <= 1 or self._rank_states is None:
            return {}
        return {"format": ddp_utils.RANKS_FORMAT, "version": ddp_utils.RANKS_VERSION, "world_size": self.world_size,
                "partition": str(self.datamanager.config.ddp_partition), "ranks": self._rank_states}

    def set_extra_state(self, state: Any) -> None:
        self._ddp_checkpoint_state = dict(state) if state else None  # applied by load_state_dict, after the rest

    def load_state_dict(self, state_dict, strict: Optional[bool] = None):
        self._ddp_checkpoint_state = None
        out = super().load_state_dict(state_dict, strict=strict)
        store_key = next((k for k in state_dict if k.startswith("_model.") and k.endswith("segments._extra_state")),
                         None)
        self._resume_ranks(self._ddp_checkpoint_state, state_dict.get("datamanager._extra_state"),
                           state_dict.get(store_key) if store_key is not None else None)
        self._ddp_checkpoint_state = None
        return out

    def _resume_ranks(self, ddp_state: Optional[Dict[str, Any]], dm_state: Optional[Dict[str, Any]],
                      store0: Optional[Dict[str, Any]]) -> None:
        """Give this rank its own scheduler position and segment store out of a checkpoint written by rank 0.

        Same number of processes (and partition): rank r takes exactly rank r's state. Otherwise (resuming on
        more or fewer GPUs, or evaluating a multi-GPU checkpoint) the segment stores of all saved ranks are merged,
        a training rank keeps the segments it owns now, and the schedule restarts at the pass after the furthest
        saved one."""
        ranks = None
        if ddp_state and ddp_state.get("format") == ddp_utils.RANKS_FORMAT:
            ranks = [dict(r) for r in ddp_state["ranks"]]
        if ranks is None:
            if self.world_size == 1:
                return  # a single-process checkpoint into a single process: loaded as it is
            ranks = [{"rank": 0, "scheduler": (dm_state or {}).get("scheduler"),
                      "train_count": int((dm_state or {}).get("train_count", 0)), "segments": None}]
        ranks[0]["segments"] = store0  # rank 0's store is the model's own entry
        training = self.test_mode == "val"
        dm, store = self.datamanager, self.ff_model.segments
        same = (len(ranks) == self.world_size and
                (self.world_size == 1 or (ddp_state or {}).get("partition") == dm.config.ddp_partition))
        if same:
            mine = ranks[self.rank]
            if self.rank != 0 and mine.get("segments"):
                store.set_extra_state(mine["segments"])
            if training and mine.get("scheduler"):
                dm.scheduler.load_state_dict(mine["scheduler"])
                dm.train_count = int(mine.get("train_count", 0))
            return
        keep = (lambda key: dm.scheduler.owns(*key)) if training else None
        merged = ddp_utils.merge_segment_states([r.get("segments") for r in ranks], keep=keep)
        if merged is not None:
            store.set_extra_state(merged)
        if training:
            passes = [int(r["scheduler"]["pass"]) for r in ranks if r.get("scheduler")]
            dm.scheduler.restart(max(passes) + 1 if passes else 0)
            logger.warning("checkpoint of %d process(es) resumed by %d: segment states merged, the schedule restarts "
                           "at pass %d", len(ranks), self.world_size, dm.scheduler.state_dict()["pass"])

    # ----------------------------------------------------------------------------------------------- train
    def get_train_loss_dict(self, step: int):
        self._prebuild_for_training()
        cameras, batch = self.datamanager.next_train(step)
        metrics = self.train_on_batch(batch, step)
        loss = torch.tensor(metrics.pop("loss_value"), device=batch.target.image.device).requires_grad_(True)
        return {}, {"loss": loss}, metrics

    def train_on_batch(self, batch: SegmentBatch, step: int) -> Dict[str, Any]:
        """One train step (:mod:`evolsplat_ns.pipeline.train_step`); the viewer is served after it, by a training
        callback (:meth:`_after_train_iteration`), never from inside the step."""
        ddp = None
        if self.world_size > 1:  # one gradient all-reduce, on the last backward
            wrapped = self._model
            ddp = DistributedHooks(no_sync=wrapped.no_sync, final_backward=ddp_utils.final_backward(wrapped),
                                   reduce_status=ddp_utils.reduce_step_status,
                                   after_step=lambda: ddp_utils.sync_buffers(wrapped))
        metrics, shared = self.train_step(self.ff_model, lambda: self.activate(batch.scene_id, batch.segment_id),
                                          batch, step, grad_scaler=self.grad_scaler, ddp=ddp)
        self._trained_steps += 1
        self._last_trained = (shared.detached(), batch)  # the viewer's callback shows it (_after_train_iteration)
        return metrics

    @property
    def skipped_steps(self) -> int:
        """Train steps skipped for a non-finite loss or gradient."""
        return self.train_step.skipped_steps

    @property
    def shared_extractions(self) -> int:
        return self.train_step.shared_extractions

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
    def render_target(self, batch: SegmentBatch, shared, v: int) -> Dict[str, torch.Tensor]:
        """Target view ``v`` of ``batch`` from its reconstruction ``shared``, as evaluation scores it: with depth,
        so through the reference composite ``fg + (1 - alpha_fg) bg`` (two rasterizations)."""
        tgt = batch.target
        return self.ff_model.render_view(shared.tensors, shared, tgt.extrinsics[v], tgt.intrinsics[v], tgt.height,
                                         tgt.width, render_depth=True)

    @torch.no_grad()
    def render_targets(self, batch: SegmentBatch, shared=None) -> List[Dict[str, torch.Tensor]]:
        """Every target view of ``batch`` (:meth:`render_target`), reconstructing it first unless ``shared``."""
        shared = shared if shared is not None else self.reconstruct(batch)
        return [self.render_target(batch, shared, v) for v in range(len(batch.target))]

    def get_eval_loss_dict(self, step: int):
        """nerfstudio's periodic evaluation batch: the evaluation plan's batches in turn (every target view)."""
        cameras, batch = self.datamanager.next_eval(step)
        outs = self.render_targets(batch)
        model = self.ff_model
        losses = [model.view_loss(o, batch.target.image[v], step) for v, o in enumerate(outs)]
        loss_dict = {k: torch.stack([l[k] for l in losses]).mean() for k in losses[0]}
        metrics = [model.image_metrics(o["rgb"], batch.target.image[v]) for v, o in enumerate(outs)]
        metrics_dict = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        return {}, loss_dict, metrics_dict

    def get_eval_image_metrics_and_images(self, step: int):
        """nerfstudio's periodic evaluation image: the first target view of the evaluation plan's next batch."""
        cameras, batch = self.datamanager.next_eval(step)
        model = self.ff_model
        o, gt = self.render_target(batch, self.reconstruct(batch), 0), batch.target.image[0]
        metrics = model.image_metrics(o["rgb"], gt)
        metrics["num_rays"] = int(gt.shape[0] * gt.shape[1])  # the Trainer logs rendered pixels per second
        images = {"img": torch.cat([gt, o["rgb"], (o["rgb"] - gt).abs()], dim=1), "accumulation": o["accumulation"]}
        return metrics, images

    @torch.no_grad()
    def get_average_eval_image_metrics(self, step: Optional[int] = None, output_path: Optional[Path] = None,
                                       get_std: bool = False) -> Dict[str, Any]:
        """Mean metrics over every held-out image of the evaluation scenes, each scored once
        (:mod:`evolsplat_ns.pipeline.evaluation`), and ``num_views``.

        Called by ns-eval (``step=None``), whose JSON then also gets ``views``: one row per image (scene, segment,
        frame, camera, metrics). The Trainer calls it with its step and logs every value as a scalar, so the rows
        are left out there. ``output_path``: a side-by-side PNG per image (ground truth | prediction | error)."""
        from evolsplat_ns.pipeline.evaluation import evaluate

        if self.config.prebuild_pointclouds:  # first-seen clouds built up front, with a progress bar
            keys = self.datamanager.eval_keys()
            self.prebuild_pointclouds([k for k in keys if k not in self.ff_model.segments], "Segment clouds (evaluation)")
        result = evaluate(self, render_dir=output_path)
        out: Dict[str, Any] = result.summary(get_std=get_std)
        if step is None:
            out["views"] = result.views
        return out


def _checkpoint_of_eval_setup() -> Optional[Path]:
    """The checkpoint nerfstudio's ``eval_setup`` (behind ns-eval, ns-viewer, ns-render, ns-export) will load into
    the pipeline it is building now, or None when the pipeline is built by anything else.

    nerfstudio 1.1.5 gives the pipeline no handle on it: ``eval_setup`` sets ``config.load_dir`` / ``load_step``,
    builds the pipeline, then ``torch.load``s the file. Its ``config`` local is read from the call stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "eval_setup" and frame.f_globals.get("__name__") == "nerfstudio.utils.eval_utils":
            cfg = frame.f_locals.get("config")
            if cfg is None or getattr(cfg, "load_dir", None) is None:
                return None
            return resolve_checkpoint(cfg.load_dir, getattr(cfg, "load_step", None), None)
        frame = frame.f_back
    return None
