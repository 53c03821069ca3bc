"""Reading a scene's images and depth maps, cached decoded in memory.

:class:`SceneCache` decodes every image (uint8) and depth map (float32) of a scene the first time the scene is
used and keeps up to ``capacity`` scenes (least recently used evicted), so that steady-state batches read
nothing from disk. :func:`assemble_views` turns a frame selection into a :class:`Views`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from evolsplat_ns.cameras import k_to_4x4
from evolsplat_ns.data.batch import Views
from evolsplat_ns.data.depth_check import depth_policy
from evolsplat_ns.errors import DataValidationError, error_text
from evolsplat_ns.data.records import SceneRecord

logger = logging.getLogger(__name__)


def read_image(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB."""
    from PIL import Image

    from evolsplat_ns.data.plausibility import image_to_rgb8

    try:
        with Image.open(path) as im:
            return image_to_rgb8(im, path)  # 16-bit greyscale scaled, not clipped to white
    except DataValidationError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # e.g. cut pixel data
        raise DataValidationError(path, "file_path", "a readable image", error_text(e)) from None


def read_depth(path: Path, non_finite: str = "error", check_values: bool = True) -> np.ndarray:
    """[H, W] float32 metres. ``.npy`` holds metres; a 16-bit PNG holds millimetres.

    With ``check_values`` the values are checked (:mod:`evolsplat_ns.data.depth_check`): all zero is an error,
    NaN / inf an error (``non_finite="error"``, with the fraction) or read as 0 (``"unknown"``).
    """
    from evolsplat_ns.data import plausibility

    try:
        if path.suffix == ".npy":
            raw = np.load(path)
            plausibility.check_depth_npy_dtype(raw, path)
            d = raw.astype(np.float32)
            if d.ndim == 3 and d.shape[-1] == 1:
                d = d[..., 0]
        else:
            from PIL import Image

            with Image.open(path) as im:
                plausibility.check_depth_png_mode(im, path)
                d = np.asarray(im, dtype=np.float32) / 1000.0
    except DataValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable, cut or corrupt (OSError, ValueError, EOFError, struct.error)
        raise DataValidationError(path, "depth_file_path", "a readable .npy array (metres)" if path.suffix == ".npy"
                                  else "a readable 16-bit PNG (millimetres)", error_text(e)) from None
    if d.ndim != 2:
        raise DataValidationError(path, "depth", "a depth map of shape [H, W]", f"shape {d.shape}")
    if check_values:
        from evolsplat_ns.data.depth_check import check_depth_values

        d = check_depth_values(d, path, "depth_file_path", non_finite)  # type: ignore[arg-type]
        plausibility.check_depth_unit(d, path, "npy" if path.suffix == ".npy" else "png")
    return d


@dataclass
class SceneArrays:
    """Decoded images and depth of one scene on a (frame, camera) grid."""

    images: torch.Tensor
    """[T, C, H, W, 3] uint8."""
    depth: Optional[torch.Tensor]
    """[T, C, H, W] float32, or None if the scene has no depth maps."""


class SceneCache:
    """LRU cache of decoded scenes."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = max(1, int(capacity))
        self._data: "OrderedDict[int, SceneArrays]" = OrderedDict()
        self.loads = 0

    def __contains__(self, scene_id: int) -> bool:
        return scene_id in self._data

    def get(self, scene: SceneRecord) -> SceneArrays:
        arrays = self._data.get(scene.scene_id)
        if arrays is not None:
            self._data.move_to_end(scene.scene_id)
            return arrays
        arrays = self._load(scene)
        self._data[scene.scene_id] = arrays
        self.loads += 1
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)
        return arrays

    @staticmethod
    def _load(scene: SceneRecord) -> SceneArrays:
        first = scene.images[0]
        sizes = {(r.width, r.height) for r in scene.images}
        if len(sizes) > 1:
            raise DataValidationError(
                scene.root, "w/h", "all cameras of a scene to share one image size (batches stack their views)",
                sorted(sizes),
            )
        T, C, H, W = scene.num_frames, scene.num_cameras, first.height, first.width
        images = np.empty((T, C, H, W, 3), dtype=np.uint8)
        provider = depth_provider(scene)
        has_depth = provider is not None or any(r.depth_path is not None for r in scene.images)
        depth = np.zeros((T, C, H, W), dtype=np.float32) if has_depth else None
        for t in range(T):
            for c, rec in enumerate(scene.frame_images(t)):
                img = fit_to_record(read_image(rec.image_path), rec, rec.image_path)  # down-scaled on load
                if img.shape[:2] != (H, W):
                    raise DataValidationError(rec.image_path, "image", f"an image of {W}x{H}", f"{img.shape[1]}x{img.shape[0]}")
                images[t, c] = img
                if depth is not None and rec.depth_path is not None:
                    d = read_depth(rec.depth_path, non_finite=depth_policy(scene))
                    d = fit_to_record(d, rec, rec.depth_path)
                    if d.shape != (H, W):
                        raise DataValidationError(rec.depth_path, "depth", f"a depth map of {H}x{W}", f"{d.shape}")
                    depth[t, c] = d
                elif depth is not None and provider is not None:
                    depth[t, c] = provider(rec)  # e.g. LiDAR-derived sparse depth (0 = no return)
        return SceneArrays(torch.from_numpy(images), torch.from_numpy(depth) if depth is not None else None)


def assemble_views(
    scene: SceneRecord,
    arrays: SceneArrays,
    frames: Sequence[int],
    keyframes: Sequence[int],
    device: torch.device | str = "cpu",
) -> Views:
    """All cameras of ``frames`` (frame-major, then camera) as a :class:`Views` on ``device``."""
    cams = scene.camera_ids
    t_idx = torch.as_tensor(list(frames), dtype=torch.long)
    imgs = arrays.images[t_idx]  # [F, C, H, W, 3]
    F_, C, H, W, _ = imgs.shape
    image = imgs.reshape(F_ * C, H, W, 3).to(device=device).float().div_(255.0)
    if arrays.depth is not None:
        depth = arrays.depth[t_idx].reshape(F_ * C, H, W).to(device)
    else:
        depth = torch.zeros(F_ * C, H, W, device=device)
    recs = [scene.image(t, c) for t in frames for c in cams]
    c2w = torch.as_tensor(np.stack([r.c2w for r in recs]), dtype=torch.float32, device=device)
    K = torch.as_tensor(np.stack([k_to_4x4(r.K) for r in recs]), dtype=torch.float32, device=device)
    return Views(
        image=image,
        extrinsics=c2w,
        intrinsics=K,
        depth=depth,
        frame_indices=torch.as_tensor([r.frame_index for r in recs], dtype=torch.long, device=device),
        cam_indices=torch.as_tensor([r.camera_id for r in recs], dtype=torch.long, device=device),
        keyframe_indices=torch.as_tensor(list(keyframes), dtype=torch.long, device=device),
    )


# ----------------------------------------------------------------------------------------------------------------
# down-scaling on load, and depth without a depth file (the real-data layouts)
# ----------------------------------------------------------------------------------------------------------------


def depth_provider(scene: SceneRecord):
    """The scene's ``metadata["depth_provider"]`` (``rec -> [H, W]`` float32 at the record's size), or ``None``."""
    from evolsplat_ns.data.records import DEPTH_PROVIDER_KEY

    p = scene.metadata.get(DEPTH_PROVIDER_KEY) if isinstance(scene.metadata, dict) else None
    return p if callable(p) else None


def fit_to_record(arr: np.ndarray, rec, path: Optional[Path] = None) -> np.ndarray:
    """Resize a decoded image ``[h, w, 3]`` uint8, depth map ``[h, w]`` float or mask ``[h, w]`` uint8 to the record's
    ``width`` x ``height``.

    Arrays already of the record's size are returned as they are. Arrays of the record's ``native_size`` (a scene
    down-scaled on load) are resized: images by area averaging (PIL's box filter), depth maps and masks by taking,
    for each output pixel, the input pixel under its centre (no mixing of depths across edges, masks stay binary).
    Anything else is left to the caller's size check (which names the file).
    """
    H, W = int(rec.height), int(rec.width)
    h, w = arr.shape[:2]
    if (h, w) == (H, W) or rec.native_size is None or (w, h) != tuple(rec.native_size):
        return arr
    if arr.ndim == 3 and arr.dtype == np.uint8:
        from PIL import Image

        return np.asarray(Image.fromarray(arr).resize((W, H), Image.BOX), dtype=np.uint8).copy()
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return np.ascontiguousarray(arr[rows][:, cols])
