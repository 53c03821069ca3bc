"""Scene records: what every data format is parsed into.

A *scene* is one recording: ``T`` timesteps ("frames") x ``C`` cameras, each pair one image. All poses
are OpenCV camera-to-world in the scene's **project frame**: metric, re-expressed relative to the first
front-camera image (that camera's centre is the origin, its axes the world axes). ``align`` maps the
data's own world frame (the frame of its ``transforms.json`` poses and seed PLY) into the project frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

#: Sky-mask conventions, pinned per data format. The value says which pixel values mean "sky".
SKY_255_IS_SKY = "255_is_sky"  # multi-scene root (ours, the synthetic scenes) and DriveStudio
SKY_0_IS_SKY = "0_is_sky"  # masks that mark valid (non-sky) pixels with 255
SKY_LABEL_10_IS_SKY = "label_10_is_sky"  # Cityscapes train-id label maps (10 = sky): the reference's semantic/instance

#: ``scene.metadata[DEPTH_PROVIDER_KEY](image_record) -> [H, W] float32`` metric z-depth at the record's size, for
#: images without a depth file (LiDAR-derived sparse depth of the real-data layouts; 0 = no return).
DEPTH_PROVIDER_KEY = "depth_provider"


@dataclass(frozen=True)
class ImageRecord:
    """One image of one camera at one timestep."""

    image_path: Path
    frame_index: int
    """Index of the timestep in the scene (0..T-1, in time order)."""
    camera_id: int
    """Camera id as given by the data (0 = front by convention)."""
    timestep: int
    """Timestep label as given by the data (not necessarily contiguous)."""
    c2w: np.ndarray
    """[4, 4] float64 OpenCV camera-to-world, project frame."""
    K: np.ndarray
    """[3, 3] float64 pinhole intrinsics for an image of ``width`` x ``height``."""
    width: int
    height: int
    depth_path: Optional[Path] = None
    """Metric z-depth: ``.npy`` float [H, W] in metres, or 16-bit ``.png`` in millimetres. 0 = no depth."""
    sky_mask_path: Optional[Path] = None
    native_size: Optional[Tuple[int, int]] = None
    """(width, height) of the files on disk when the scene is down-scaled on load (``None``: ``width`` x ``height``).
    Images, depth maps and sky masks are resized to ``width`` x ``height`` where they are decoded
    (:func:`evolsplat_ns.data.views.fit_to_record`); ``K`` is already scaled to match."""

    @property
    def center(self) -> np.ndarray:
        return self.c2w[:3, 3]


@dataclass
class SceneRecord:
    """A parsed scene: its images on a (frame, camera) grid, plus scene-level files."""

    scene_id: int
    """Position of the scene in the data root (sorted folder names)."""
    name: str
    root: Path
    images: List[ImageRecord]
    """Sorted frame-major then camera."""
    camera_ids: List[int]
    """Sorted camera ids present in every frame."""
    num_frames: int
    align: np.ndarray = field(default_factory=lambda: np.eye(4))
    """[4, 4] data world frame -> project frame."""
    seed_ply_path: Optional[Path] = None
    sky_mask_convention: str = SKY_255_IS_SKY
    front_camera_id: int = 0
    lidar_paths: Optional[List[Optional[Path]]] = None
    """Per frame, the LiDAR sweep file (``None`` where it is missing); the real-data layouts fill it."""
    metadata: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._grid: Dict[Tuple[int, int], ImageRecord] = {(r.frame_index, r.camera_id): r for r in self.images}

    @property
    def num_cameras(self) -> int:
        return len(self.camera_ids)

    def image(self, frame_index: int, camera_id: int) -> ImageRecord:
        return self._grid[(frame_index, camera_id)]

    def frame_images(self, frame_index: int) -> List[ImageRecord]:
        """All cameras of one frame, in ``camera_ids`` order."""
        return [self._grid[(frame_index, c)] for c in self.camera_ids]

    def front_centers(self) -> np.ndarray:
        """[T, 3] front-camera centres over time (the trajectory keyframes are cut from)."""
        return np.stack([self._grid[(t, self.front_camera_id)].center for t in range(self.num_frames)])
