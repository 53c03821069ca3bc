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
    eval_holdout: Literal["odd", "none"] = "odd"
    """Frames of eval scenes the network may not see: 'odd' = the reference's Drop50 protocol (even frames are
    inputs, odd frames are tested); 'none' = any frame can be an input (targets still differ from sources)."""


class EvolSplatDataParser(DataParser):
    config: EvolSplatDataParserConfig

    def __init__(self, config: EvolSplatDataParserConfig):
        super().__init__(config)
        self._scenes: Optional[List[SceneRecord]] = None
        self._split: Optional[Tuple[List[int], List[int]]] = None

    def scenes(self) -> List[SceneRecord]:
        """All scenes of the root, parsed and validated once."""
        if self._scenes is None:
            self._scenes = load_scenes(self.config.data)
        return self._scenes

    def split(self) -> Tuple[List[int], List[int]]:
        """(train scene ids, eval scene ids)."""
        if self._split is None:
            n = len(find_scene_dirs(self.config.data))
            self._split = split_scene_ids(n, self.config.train_scene_ids, self.config.eval_scene_ids, self.config.data)
        return self._split

    def input_frames(self, scene: SceneRecord) -> Optional[set]:
        """Frames of ``scene`` that may feed the network (and its point cloud); ``None`` = all."""
        _, eval_ids = self.split()
        if scene.scene_id in eval_ids and self.config.eval_holdout == "odd":
            return {t for t in range(scene.num_frames) if t % 2 == 0}
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
