"""The segment batch: what one training step gives the model.

Field names follow the user's design document (``batch["source"]["image"]`` works as well as
``batch.source.image``). ``V = keyframes x cameras``, ordered frame-major then camera.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterator

import torch
from torch import Tensor


class _ItemAccess:
    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self):
        return [f.name for f in fields(self)]  # type: ignore[arg-type]

    def items(self) -> Iterator:
        return ((k, getattr(self, k)) for k in self.keys())


@dataclass
class Views(_ItemAccess):
    """A set of views (all cameras of a few frames of one segment)."""

    image: Tensor
    """[V, H, W, 3] float32 in [0, 1]."""
    extrinsics: Tensor
    """[V, 4, 4] float32 OpenCV camera-to-world (project frame of the scene)."""
    intrinsics: Tensor
    """[V, 4, 4] float32, identity with K in the top-left 3x3."""
    depth: Tensor
    """[V, H, W] float32 metric z-depth, 0 where unknown (zeros if the data has no depth)."""
    frame_indices: Tensor
    """[V] int64 frame (timestep) index of each view."""
    cam_indices: Tensor
    """[V] int64 camera id of each view."""
    keyframe_indices: Tensor
    """[F] int64 keyframe index of each chosen frame (F = V / cameras)."""

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    def to(self, device: torch.device | str) -> "Views":
        return Views(**{k: v.to(device) for k, v in self.items()})

    def select(self, index: int) -> "Views":
        """One view as a 1-view :class:`Views` (keyframe index of its frame kept)."""
        n_cams = len(self) // max(1, int(self.keyframe_indices.shape[0]))
        kf = self.keyframe_indices[index // max(1, n_cams)].reshape(1)
        return Views(
            image=self.image[index : index + 1],
            extrinsics=self.extrinsics[index : index + 1],
            intrinsics=self.intrinsics[index : index + 1],
            depth=self.depth[index : index + 1],
            frame_indices=self.frame_indices[index : index + 1],
            cam_indices=self.cam_indices[index : index + 1],
            keyframe_indices=kf,
        )


# The design document's vocabulary.
SourceViews = Views
TargetViews = Views


@dataclass
class SegmentBatch(_ItemAccess):
    """Source views (the network input) and target views (supervision) of one segment."""

    scene_id: int
    segment_id: int
    source: Views
    target: Views
    is_new_segment: bool
    """True when the previous training step used another segment."""

    def to(self, device: torch.device | str) -> "SegmentBatch":
        return SegmentBatch(self.scene_id, self.segment_id, self.source.to(device), self.target.to(device), self.is_new_segment)

    def shapes(self) -> Dict[str, Dict[str, list]]:
        return {
            part: {k: list(v.shape) for k, v in getattr(self, part).items()} for part in ("source", "target")
        }
