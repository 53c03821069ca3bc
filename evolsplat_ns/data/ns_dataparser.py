"""nerfstudio boundary of the data side: the ``evolsplat-multiscene`` dataparser.

nerfstudio's viewer and bookkeeping want a :class:`DataparserOutputs` (image list + ``Cameras``); the method
itself consumes :class:`SceneRecord` objects (:meth:`EvolSplatDataParser.scenes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox

from evolsplat_ns.cameras import k_to_4x4, to_nerfstudio_cameras
from evolsplat_ns.data.dataparser import find_scene_dirs, load_scenes, split_scene_ids
from evolsplat_ns.data.records import SceneRecord


@dataclass
class EvolSplatDataParserConfig(DataParserConfig):
    """A folder of driving scenes (multi-scene root, or one scene folder); see docs/DATA_FORMAT.md."""

    _target: Type = field(default_factory=lambda: EvolSplatDataParser)
    data: Path = Path("data/synthetic")
    """Multi-scene root (sub-folders with transforms.json) or a single scene folder."""
    train_scene_ids: Optional[Tuple[int, ...]] = None
    """Scenes (positions in the sorted folder list) used for training. Default: all but the eval scenes."""
    eval_scene_ids: Optional[Tuple[int, ...]] = None
    """Scenes held out for evaluation. Default: the last scene (none if there is only one)."""
    eval_holdout: Literal["odd", "none", "Drop25", "Drop50", "Drop80", "Drop90"] = "odd"
    """Frames of eval scenes the network may not see: 'odd' = 'Drop50' = the reference's protocol (even timesteps
    are inputs, odd ones are tested); 'Drop25' holds out t % 4 == 2; 'Drop80' / 'Drop90' keep t % 5 == 0 /
    t % 10 == 0 as inputs; 'none' = any frame can be an input (targets still differ from sources)."""
    layout: Literal["auto", "multiscene", "reference", "drivestudio", "pandaset", "kitti-raw"] = "auto"
    """Folder layout of the scenes: 'auto' recognises each scene by its files; see docs/DATA_FORMAT.md."""
    cameras: Optional[Tuple[str, ...]] = None
    """Cameras to use, by name or id (e.g. 'front front_left front_right', or '0 1 2'); default: all."""
    downscale: float = 1.0
    """Shrink images (and depth maps, sky masks) by this factor on load; intrinsics are scaled to match."""
    depth_source: Literal["auto", "files", "lidar", "none"] = "auto"
    """Depth per image: 'auto' = the layout's depth files where present, else LiDAR-derived sparse depth;
    'files' / 'lidar' = only that source; 'none' = no depth."""
    seed_ply: Literal["Drop25", "Drop50", "Drop80", "Drop90", "full"] = "Drop50"
    """Reference layout: the seed PLY of this sparsity (ply_file_path_<sparsity>), else ply_file_path."""
    lidar_cache_dir: Optional[Path] = None
    """Cache of LiDAR-derived depth maps (default <data>/.evolsplat_cache/lidar_depth)."""
    lidar_max_time_offset: float = 0.06
    """Seconds: an image takes the LiDAR sweep nearest in time if within this offset (layouts with timestamps)."""
    pandaset_lidar: Literal["both", "spinning", "forward"] = "both"
    """PandaSet sweeps: both sensors, the 360 spinning LiDAR (d = 0) or the forward-facing one (d = 1)."""
    check_depth_values: bool = True
    """Read every depth map once at start-up and check its values (all zero, NaN / inf), so that a bad map is
    reported before training; off: each map is checked when its scene is first decoded."""
    non_finite_depth: Literal["error", "unknown"] = "error"
    """NaN / inf depth pixels: an error naming the file and the fraction of bad pixels, or read as 0 (unknown)."""

    def layout_options(self):
        """The layout options of this config (:class:`evolsplat_ns.data.layouts.LayoutOptions`)."""
        from evolsplat_ns.data.layouts import LayoutOptions

        return LayoutOptions(
            layout=self.layout, cameras=tuple(str(c) for c in self.cameras) if self.cameras else None,
            downscale=float(self.downscale), depth_source=self.depth_source, seed_ply=self.seed_ply,
            lidar_cache_dir=self.lidar_cache_dir, lidar_max_time_offset=float(self.lidar_max_time_offset),
            pandaset_lidar=self.pandaset_lidar, data_root=Path(self.data),
        ).validate()


class EvolSplatDataParser(DataParser):
    config: EvolSplatDataParserConfig

    def __init__(self, config: EvolSplatDataParserConfig):
        super().__init__(config)
        self._scenes: Optional[List[SceneRecord]] = None
        self._split: Optional[Tuple[List[int], List[int]]] = None

    def scenes(self) -> List[SceneRecord]:
        """All scenes of the root, parsed and validated once."""
        if self._scenes is None:
            from evolsplat_ns.data.layouts import load_layout_scenes

            # every layout (multiscene, reference, drivestudio, pandaset, kitti-raw) -> the same scene records
            self._scenes = load_layout_scenes(self.config.data, self.config.layout_options(),
                                              check_depth_values=self.config.check_depth_values,
                                              non_finite_depth=self.config.non_finite_depth)
        return self._scenes

    def split(self) -> Tuple[List[int], List[int]]:
        """(train scene ids, eval scene ids)."""
        if self._split is None:
            from evolsplat_ns.data.layouts import find_layout_scenes

            n = len(find_layout_scenes(self.config.data, self.config.layout))
            self._split = split_scene_ids(n, self.config.train_scene_ids, self.config.eval_scene_ids, self.config.data)
        return self._split

    def input_frames(self, scene: SceneRecord) -> Optional[set]:
        """Frames of ``scene`` that may feed the network (and its point cloud); ``None`` = all."""
        _, eval_ids = self.split()
        if scene.scene_id in eval_ids:
            from evolsplat_ns.data.layouts import protocol_input_frames

            return protocol_input_frames(scene.num_frames, self.config.eval_holdout)
        return None

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        train_ids, eval_ids = self.split()
        ids = train_ids if split == "train" else (eval_ids or train_ids)
        by_id = {s.scene_id: s for s in self.scenes()}
        recs = [r for i in ids for r in by_id[i].images]
        c2w = torch.as_tensor(np.stack([r.c2w for r in recs]), dtype=torch.float32)
        K = torch.as_tensor(np.stack([k_to_4x4(r.K) for r in recs]), dtype=torch.float32)
        heights = torch.tensor([[r.height] for r in recs])
        widths = torch.tensor([[r.width] for r in recs])
        cameras = to_nerfstudio_cameras(c2w, K, heights, widths)
        centers = c2w[:, :3, 3]
        margin = 20.0
        aabb = torch.stack([centers.min(0).values - margin, centers.max(0).values + margin])
        return DataparserOutputs(
            image_filenames=[r.image_path for r in recs],
            cameras=cameras,
            scene_box=SceneBox(aabb=aabb),
            metadata={"scene_ids": [int(i) for i in ids]},
        )
