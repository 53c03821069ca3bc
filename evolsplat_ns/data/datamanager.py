"""``EvolSplatDataManager``: the nerfstudio DataManager that emits segment batches.

Data flow: dataparser (scene records) -> scene index (keyframes, segments) -> scheduler (which segment this
step) -> view selection (which frames are sources and targets) -> scene cache + assembly (tensors).
``next_train(step)`` returns the target views as nerfstudio ``Cameras`` and a :class:`SegmentBatch`.

Evaluation follows the evaluation plan (:mod:`evolsplat_ns.data.eval_plan`): ``eval_batches()`` scores every
held-out image of every evaluation scene exactly once. The viewer's per-segment display reconstruction
(``eval_keys()`` / ``eval_batch(scene, segment)``) keeps the fixed selection of :mod:`evolsplat_ns.data.sampling`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Tuple, Type, Union

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from torch.nn import Parameter

from evolsplat_ns.cameras import to_nerfstudio_cameras
from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.errors import ConfigError, DataValidationError
from evolsplat_ns.data.eval_plan import PlannedBatch, plan_scene
from evolsplat_ns.data.ns_dataparser import EvolSplatDataParser, EvolSplatDataParserConfig
from evolsplat_ns.data.records import SceneRecord
from evolsplat_ns.data.sampling import (ViewSelection, min_target_candidates, select_near, select_views,
                                       source_windows)
from evolsplat_ns.data.scene_index import (
    IndexOptions,
    SceneIndex,
    Segment,
    index_scene,
    keyframe_rule,
    travelled_distance,
)
from evolsplat_ns.data.scheduler import SegmentScheduler
from evolsplat_ns.data.views import SceneCache, assemble_views

logger = logging.getLogger(__name__)


@dataclass
class EvolSplatDataManagerConfig(DataManagerConfig):
    """Segment batches over many driving scenes (the design document's MultiSceneDataset options)."""

    _target: Type = field(default_factory=lambda: EvolSplatDataManager)
    dataparser: EvolSplatDataParserConfig = field(default_factory=EvolSplatDataParserConfig)
    num_source_keyframes: int = 3
    """Source keyframes per batch (one frame each, all cameras): the network's input views."""
    num_target_keyframes: int = 6
    """Target keyframes per batch (one frame each, all cameras): the supervised views."""
    targets_include_sources: bool = False
    """Allow source frames as targets (default: novel-view supervision only)."""
    view_selection: Literal["near", "spread"] = "near"
    """Training batches: 'near' = a random anchor frame, its nearest input frames as sources and the frames nearest to
    it as targets, as evaluation reconstructs each held-out frame from its nearest inputs; 'spread' = the design
    document's source keyframes spread over the segment and targets anywhere in it (sources and targets up to a
    segment, ~20 m, apart). See evolsplat_ns.data.sampling."""
    keyframe_min_length: float = 2.0
    """A keyframe is a slice of at least this many metres of the front camera's trajectory ..."""
    keyframe_min_count: int = 1
    """... and of at least this many frames."""
    keyframe_max_frames: int = 10
    """... or, when the car barely moves (waiting at a light), of this many frames (10 = 1 s at the 10 Hz of KITTI,
    Waymo and PandaSet): a wait becomes a keyframe per second, not one keyframe. A moving car reaches
    keyframe-min-length first and gets the same keyframes as without it. 0 turns it off (distance only)."""
    min_keyframes_per_scene: int = 10
    """Scenes with fewer keyframes are skipped with a warning."""
    keyframes_per_segment: int = 10
    """Keyframes per segment window."""
    min_keyframes_per_segment: int = 6
    """Every segment has at least this many keyframes."""
    segment_overlap_ratio: float = 0.5
    """Overlap of consecutive segments, as a fraction of a segment (clamped to [0, 0.5])."""
    batches_per_segment: int = 20
    """Consecutive training batches drawn from one segment before moving on."""
    segment_order: Literal["random", "sequential"] = "random"
    """Order of the segments within a scene in each pass."""
    scene_order: Literal["random", "sequential"] = "random"
    """Order of the training scenes in each pass."""
    cache_scenes: int = 4
    """Decoded scenes kept in memory (LRU); steady-state batches then read nothing from disk."""
    aabb_far: float = 40.0
    """Segment boxes cover the cameras' frusta up to this depth (metres)."""
    aabb_vertical: Tuple[float, float] = (-9.0, 3.8)
    """Vertical extent of segment boxes relative to the mean camera height (project-frame y points down)."""
    seed: int = 42
    """Seed of the schedule and of the random view selection (a batch is a function of seed and step)."""
    ddp_partition: Literal["segment", "scene"] = "segment"
    """Multi-GPU: how training segments are shared among the processes; every segment has one owner rank for the
    whole run. 'segment': dealt out one by one (balanced to one segment); 'scene': whole scenes per rank (each
    rank decodes only its own scenes; needs at least as many training scenes as processes)."""

    def index_options(self) -> IndexOptions:
        return IndexOptions(
            keyframe_min_length=self.keyframe_min_length,
            keyframe_min_count=self.keyframe_min_count,
            keyframe_max_frames=self.keyframe_max_frames,
            min_keyframes_per_scene=self.min_keyframes_per_scene,
            keyframes_per_segment=self.keyframes_per_segment,
            min_keyframes_per_segment=self.min_keyframes_per_segment,
            segment_overlap_ratio=self.segment_overlap_ratio,
            aabb_far=self.aabb_far,
            aabb_vertical=tuple(self.aabb_vertical),  # type: ignore[arg-type]
        )

    def validate(self) -> None:
        """Option combinations that cannot work, reported before any data is read."""
        if self.num_source_keyframes < 1 or self.num_target_keyframes < 1:
            raise ConfigError("num_source_keyframes and num_target_keyframes must be >= 1")
        if self.min_keyframes_per_segment < 1:
            raise ConfigError("min_keyframes_per_segment must be >= 1")
        if self.keyframes_per_segment < self.min_keyframes_per_segment:
            raise ConfigError(
                f"keyframes_per_segment={self.keyframes_per_segment} < min_keyframes_per_segment="
                f"{self.min_keyframes_per_segment}"
            )
        if self.num_source_keyframes > self.keyframes_per_segment:
            raise ConfigError(
                f"num_source_keyframes={self.num_source_keyframes} > keyframes_per_segment={self.keyframes_per_segment}"
            )
        if not self.targets_include_sources and self.num_source_keyframes + self.num_target_keyframes > 2 * self.keyframes_per_segment:
            raise ConfigError("num_source_keyframes + num_target_keyframes cannot fit in one segment")
        if self.keyframe_min_length < 0 or self.keyframe_min_count < 1:
            raise ConfigError("keyframe_min_length must be >= 0 and keyframe_min_count >= 1")
        if self.keyframe_max_frames < 0 or 0 < self.keyframe_max_frames < self.keyframe_min_count:
            raise ConfigError(
                f"keyframe_max_frames={self.keyframe_max_frames} must be 0 (off) or >= keyframe_min_count="
                f"{self.keyframe_min_count}"
            )
        if self.batches_per_segment < 1 or self.cache_scenes < 1:
            raise ConfigError("batches_per_segment and cache_scenes must be >= 1")
        if self.min_keyframes_per_scene < self.min_keyframes_per_segment:
            raise ConfigError("min_keyframes_per_scene must be >= min_keyframes_per_segment")


class EvolSplatDataManager(DataManager):
    """Emits :class:`SegmentBatch` objects; see the module docstring."""

    config: EvolSplatDataManagerConfig

    def __init__(
        self,
        config: EvolSplatDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        self.config = config
        self.device = device
        self.test_mode = test_mode
        self.world_size = world_size
        self.local_rank = local_rank
        config.validate()
        if config.data is not None:
            config.dataparser.data = Path(config.data)
        self.dataparser: EvolSplatDataParser = config.dataparser.setup()
        self.train_scene_ids, self.eval_scene_ids = self.dataparser.split()
        scenes = self.dataparser.scenes()
        self.scenes: Dict[int, SceneRecord] = {s.scene_id: s for s in scenes}
        opts = config.index_options()
        self.index: Dict[int, SceneIndex] = {}
        self.skipped: Dict[int, str] = {}
        for sid in sorted(set(self.train_scene_ids) | set(self.eval_scene_ids)):
            idx = index_scene(self.scenes[sid], opts)
            if idx is None:
                self.skipped[sid] = f"fewer than {opts.min_keyframes_per_scene} keyframes of {keyframe_rule(opts)}"
            else:
                self.index[sid] = idx
        self.train_scene_ids = [i for i in self.train_scene_ids if i in self.index]
        self.eval_scene_ids = [i for i in self.eval_scene_ids if i in self.index]
        both = sorted(set(self.train_scene_ids) & set(self.eval_scene_ids))
        if both and test_mode == "val":  # training (evaluation and inference may use one list for both)
            logger.warning(
                "scenes %s are both training and evaluation scenes (train_scene_ids %s, eval_scene_ids %s%s): "
                "training sees their held-out frames, so their evaluation scores are not held-out scores; give "
                "disjoint --pipeline.datamanager.dataparser.train-scene-ids / eval-scene-ids", both,
                self.train_scene_ids, self.eval_scene_ids,
                "; train_scene_ids unset and every scene is an evaluation scene, so all of them train"
                if config.dataparser.train_scene_ids is None else "")
        if not self.train_scene_ids:
            raise DataValidationError(
                config.dataparser.data, "train_scene_ids",
                f"at least one training scene with >= {opts.min_keyframes_per_scene} keyframes of "
                f"{keyframe_rule(opts)} (skipped: {sorted(self.skipped)})",
            )
        self._input_frames = {sid: self.dataparser.input_frames(self.scenes[sid]) for sid in self.index}
        self._check_segments()
        self._eval_plan = self._make_eval_plan()  # cheap (no pixels); bad options are reported at set-up
        self._eval_cursor = 0
        self.scheduler = self._make_scheduler(local_rank, world_size)
        self.cache = SceneCache(config.cache_scenes)
        self.train_dataparser_outputs = self.dataparser.get_dataparser_outputs(split="train")
        self.train_dataset = InputDataset(self.train_dataparser_outputs)
        n_cams = {self.scenes[i].num_cameras for i in self.index}
        if len(n_cams) != 1:
            raise ConfigError(
                f"all scenes used must have the same number of cameras (the network's input width depends on it); "
                f"found {sorted(n_cams)}"
            )
        # The model's input width: source views per batch.
        self.train_dataset.metadata["num_source_views"] = config.num_source_keyframes * n_cams.pop()
        self.eval_dataset = InputDataset(self.dataparser.get_dataparser_outputs(split="test"))
        super().__init__()

    def _make_scheduler(self, rank: int, world_size: int) -> SegmentScheduler:
        c = self.config
        return SegmentScheduler(
            {sid: [s.segment_id for s in self.index[sid].segments] for sid in self.train_scene_ids},
            batches_per_segment=c.batches_per_segment,
            segment_order=c.segment_order,
            scene_order=c.scene_order,
            seed=c.seed,
            rank=rank,
            world_size=world_size,
            partition=c.ddp_partition,
        )

    def set_partition(self, rank: int, world_size: int) -> None:
        """Train as process ``rank`` (global rank) of ``world_size``: a fresh schedule over this rank's segments."""
        self.local_rank, self.world_size = int(rank), int(world_size)
        self.scheduler = self._make_scheduler(int(rank), int(world_size))

    # ----------------------------------------------------------------------------------------------- indexing
    def _target_frames(self, scene_id: int) -> Optional[set]:
        inputs = self._input_frames[scene_id]
        if inputs is None:
            return None
        return {t for t in range(self.scenes[scene_id].num_frames) if t not in inputs}

    def _check_segments(self) -> None:
        c = self.config
        for sid, idx in self.index.items():
            for seg in idx.segments:
                if c.num_source_keyframes > len(seg.keyframe_indices):
                    raise ConfigError(
                        f"scene {sid} ({idx.scene.name}) segment {seg.segment_id}: num_source_keyframes="
                        f"{c.num_source_keyframes} but the segment has {len(seg.keyframe_indices)} keyframes"
                    )
                n = min_target_candidates(idx.keyframes, seg, c.num_source_keyframes, self._input_frames[sid],
                                          self._target_frames(sid), c.targets_include_sources)
                if n < c.num_target_keyframes:
                    raise ConfigError(
                        f"scene {sid} ({idx.scene.name}) segment {seg.segment_id}: num_target_keyframes="
                        f"{c.num_target_keyframes} but only {n} keyframes are guaranteed to hold a non-source frame; "
                        f"lower num_target_keyframes, raise keyframes_per_segment, or set targets_include_sources"
                    )

    def segment(self, scene_id: int, segment_id: int) -> Segment:
        return self.index[scene_id].segments[segment_id]

    def input_frames(self, scene_id: int) -> Optional[set]:
        """Frames the network (and the segment point cloud) may see for this scene; ``None`` = all."""
        return self._input_frames[scene_id]

    # ----------------------------------------------------------------------------------------------- batches
    def select(self, scene_id: int, segment_id: int, rng: Optional[np.random.Generator],
               rule: Optional[str] = None) -> ViewSelection:
        """Sources and targets of one batch by ``rule`` (default: ``view_selection``); ``rng=None``: fixed."""
        idx = self.index[scene_id]
        rule = select_near if (rule or self.config.view_selection) == "near" else select_views
        return rule(
            idx.keyframes,
            idx.segments[segment_id],
            self.config.num_source_keyframes,
            self.config.num_target_keyframes,
            rng=rng,
            input_frames=self._input_frames[scene_id],
            target_frames=self._target_frames(scene_id),
            targets_include_sources=self.config.targets_include_sources,
        )

    def make_batch(self, scene_id: int, segment_id: int, sel: ViewSelection, is_new_segment: bool) -> SegmentBatch:
        scene = self.scenes[scene_id]
        arrays = self.cache.get(scene)
        return SegmentBatch(
            scene_id=scene_id,
            segment_id=segment_id,
            source=assemble_views(scene, arrays, sel.source_frames, sel.source_keyframes, self.device),
            target=assemble_views(scene, arrays, sel.target_frames, sel.target_keyframes, self.device),
            is_new_segment=is_new_segment,
        )

    @staticmethod
    def target_cameras(batch: SegmentBatch) -> Cameras:
        t = batch.target
        return to_nerfstudio_cameras(t.extrinsics, t.intrinsics, t.height, t.width).to(t.image.device)

    def next_train(self, step: int) -> Tuple[Cameras, SegmentBatch]:  # type: ignore[override]
        """Target cameras and the segment batch of training step ``step`` (a function of seed, schedule, step)."""
        self.train_count += 1
        item = self.scheduler.next()
        rng = np.random.default_rng([self.config.seed, int(step)])
        sel = self.select(item.scene_id, item.segment_id, rng)
        batch = self.make_batch(item.scene_id, item.segment_id, sel, item.is_new_segment)
        return self.target_cameras(batch), batch

    def eval_keys(self) -> List[Tuple[int, int]]:
        """Every segment of every eval scene (train scenes if there are none): the viewer's segment list."""
        return [(sid, seg.segment_id) for sid in self.eval_list() for seg in self.index[sid].segments]

    def eval_list(self) -> List[int]:
        """Scenes evaluated: the eval scenes, or the training scenes when there are none."""
        return list(self.eval_scene_ids or self.train_scene_ids)

    def eval_batch(self, scene_id: int, segment_id: int) -> SegmentBatch:
        """The fixed (deterministic) display batch of one segment: sources spread over the segment (the viewer's
        reconstruction; evaluation scores through :meth:`eval_plan` instead)."""
        return self.make_batch(scene_id, segment_id, self.select(scene_id, segment_id, None, rule="spread"), True)

    def window_batches(self, scene_id: int, segment_id: int) -> List[SegmentBatch]:
        """One batch per distinct near-source window of the segment (:func:`~.sampling.source_windows`), in time
        order: the segment reconstructed at each time of its span."""
        idx = self.index[scene_id]
        windows = source_windows(idx.keyframes, idx.segments[segment_id], self.config.num_source_keyframes,
                                 self._input_frames[scene_id])
        return [self.make_batch(scene_id, segment_id, w, i == 0) for i, w in enumerate(windows)]

    def _make_eval_plan(self) -> List[PlannedBatch]:
        c = self.config
        plan: List[PlannedBatch] = []
        for sid in self.eval_list():
            idx = self.index[sid]
            plan += plan_scene(idx.keyframes, idx.segments, self.scenes[sid].num_frames, c.num_source_keyframes,
                               self._input_frames[sid], c.targets_include_sources)
        if not plan:
            raise ConfigError(f"no held-out frames to evaluate in scenes {self.eval_list()}")
        return plan

    def eval_plan(self) -> List[PlannedBatch]:
        """The evaluation plan (:mod:`evolsplat_ns.data.eval_plan`): batches that score every held-out image of
        every evaluated scene exactly once, deterministic."""
        return list(self._eval_plan)

    def held_out_views(self) -> List[Tuple[int, int, int]]:
        """Every (scene id, frame, camera id) the plan scores, in plan order."""
        return [(p.scene_id, t, c) for p in self._eval_plan for t in p.selection.target_frames
                for c in self.scenes[p.scene_id].camera_ids]

    def planned_batch(self, item: PlannedBatch, is_new_segment: bool = True) -> SegmentBatch:
        """The :class:`SegmentBatch` of one entry of the plan."""
        return self.make_batch(item.scene_id, item.segment_id, item.selection, is_new_segment)

    def eval_batches(self) -> Iterator[SegmentBatch]:
        """The evaluation plan's batches, in order (``is_new_segment`` on the first batch of each segment)."""
        prev = None
        for item in self._eval_plan:
            key = (item.scene_id, item.segment_id)
            yield self.planned_batch(item, key != prev)
            prev = key

    def next_eval(self, step: int) -> Tuple[Cameras, SegmentBatch]:  # type: ignore[override]
        """nerfstudio's periodic evaluation during training: the plan's batches in turn, one per call (a call
        counter, not ``step``: evaluation steps are multiples of a period, which would revisit the same few)."""
        self.eval_count += 1
        item = self._eval_plan[self._eval_cursor % len(self._eval_plan)]
        self._eval_cursor += 1
        batch = self.planned_batch(item)
        return self.target_cameras(batch), batch

    def next_eval_image(self, step: int) -> Tuple[Cameras, SegmentBatch]:  # type: ignore[override]
        return self.next_eval(step)

    # ----------------------------------------------------------------------------------------------- nerfstudio
    def setup_train(self) -> None:
        """Nothing to prepare: scenes are decoded lazily into the LRU cache."""

    def setup_eval(self) -> None:
        """Nothing to prepare: evaluation batches are assembled on demand."""

    def get_train_rays_per_batch(self) -> int:
        """Supervised pixels per step (used by nerfstudio's throughput log)."""
        s = self.scenes[self.train_scene_ids[0]]
        r = s.images[0]
        return self.config.num_target_keyframes * s.num_cameras * r.width * r.height

    def get_eval_rays_per_batch(self) -> int:
        return self.get_train_rays_per_batch()

    def get_datapath(self) -> Path:
        return self.config.dataparser.data

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {}

    # The scheduler position travels in the pipeline's state_dict (checkpoints) through nn.Module extra state.
    def get_extra_state(self):
        return {"scheduler": self.scheduler.state_dict(), "train_count": int(self.train_count)}

    def set_extra_state(self, state) -> None:
        # Only a training run resumes the schedule; evaluation / inference may load a checkpoint on other data.
        if not state or self.test_mode != "val":
            return
        saved = state["scheduler"]
        if (int(saved.get("rank", 0)), int(saved.get("world_size", 1))) != (self.scheduler.rank,
                                                                            self.scheduler.world_size):
            # Multi-GPU checkpoints hold rank 0's position here and every rank's in the pipeline's own state; the
            # pipeline gives each rank its own (or restarts the schedule when the number of processes changed).
            return
        self.scheduler.load_state_dict(saved)
        self.train_count = int(state.get("train_count", 0))

    # ----------------------------------------------------------------------------------------------- summary
    def summary(self) -> Dict[str, object]:
        """What the data side sees (used by ``evolsplat-ns-inspect``)."""
        scenes = []
        for sid, scene in sorted(self.scenes.items()):
            role = "train" if sid in self.train_scene_ids else ("eval" if sid in self.eval_scene_ids else "unused")
            entry: Dict[str, object] = {
                "scene_id": sid,
                "name": scene.name,
                "role": role if sid not in self.skipped else "skipped",
                "num_frames": scene.num_frames,
                "num_cameras": scene.num_cameras,
                "layout": str(scene.metadata.get("layout", "multiscene")),
                "cameras": [str(n) for n in (scene.metadata.get("camera_names") or scene.camera_ids)],
                "image_size": [scene.images[0].width, scene.images[0].height],
                "lidar": scene.lidar_paths is not None,
            }
            if sid in self.skipped:
                entry["skipped"] = self.skipped[sid]
                entry["num_keyframes"] = 0
                entry["keyframes"] = []
                entry["segments"] = []
            else:
                idx = self.index[sid]
                entry["num_keyframes"] = len(idx.keyframes)
                travelled = travelled_distance(scene.front_centers())
                entry["keyframes"] = [
                    {
                        "frames": [kf.start, kf.stop - 1],
                        "num_frames": len(kf),
                        # as the cut measures it: to the next keyframe's first frame (the last one: to its own last)
                        "travel_m": round(float(travelled[min(kf.stop, scene.num_frames - 1)] - travelled[kf.start]), 3),
                    }
                    for kf in idx.keyframes
                ]
                entry["segments"] = [
                    {
                        "segment_id": seg.segment_id,
                        "keyframe_indices": list(seg.keyframe_indices),
                        "frames": [seg.frame_indices[0], seg.frame_indices[-1]],
                        "aabb": [list(seg.aabb[0]), list(seg.aabb[1])],
                    }
                    for seg in idx.segments
                ]
            scenes.append(entry)
        evaluation = {"scene_ids": self.eval_list(), "batches": len(self._eval_plan),
                      "held_out_frames": sum(len(p.selection.target_frames) for p in self._eval_plan),
                      "held_out_images": len(self.held_out_views())}
        return {"data": str(self.config.dataparser.data), "train_scene_ids": self.train_scene_ids,
                "eval_scene_ids": self.eval_scene_ids, "scenes": scenes, "evaluation": evaluation}
