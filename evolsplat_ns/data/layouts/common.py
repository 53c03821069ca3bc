"""Shared pieces of the real-data layouts: options, camera selection, scene assembly, down-scaling, Drop-N.

Every layout parser gathers :class:`RawImage` entries (OpenCV camera-to-world in the data's own world frame) and
hands them to :func:`build_scene`, which re-expresses the poses relative to the first front-camera image (the
project frame) exactly as the multi-scene parser does. Down-scaling (:func:`downscale_scene`) and camera selection
of the multi-scene layout (:func:`restrict_cameras`) are applied to finished records, for every layout alike.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.cameras import rigid_inverse, scale_intrinsics
from evolsplat_ns.errors import DataValidationError, error_text
from evolsplat_ns.data.records import SKY_255_IS_SKY, ImageRecord, SceneRecord

logger = logging.getLogger(__name__)

LAYOUT_NAMES: Tuple[str, ...] = ("multiscene", "reference", "drivestudio", "pandaset", "kitti-raw")
HOLDOUT_MODES: Tuple[str, ...] = ("odd", "none", "Drop25", "Drop50", "Drop80", "Drop90")


@dataclass
class LayoutOptions:
    """How real-data layouts are read (the dataparser's options, gathered; see ``EvolSplatDataParserConfig``)."""

    layout: Literal["auto", "multiscene", "reference", "drivestudio", "pandaset", "kitti-raw"] = "auto"
    cameras: Optional[Tuple[str, ...]] = None
    """Cameras to use, by name (e.g. ``front``) or id (e.g. ``0``); ``None`` = every camera of the layout."""
    downscale: float = 1.0
    """Images, depth maps and sky masks are shrunk by this factor on load; intrinsics are scaled to match."""
    depth_source: Literal["auto", "files", "lidar", "none"] = "auto"
    """auto: the layout's depth files where present, LiDAR-derived sparse depth for the other images."""
    seed_ply: Literal["Drop25", "Drop50", "Drop80", "Drop90", "full"] = "Drop50"
    """Reference layout: which ``ply_file_path_<sparsity>`` seed cloud to use (else ``ply_file_path``)."""
    lidar_cache_dir: Optional[Path] = None
    """Where LiDAR-derived sparse depth maps are cached (default ``<data>/.evolsplat_cache/lidar_depth``)."""
    lidar_max_time_offset: float = 0.06
    """Seconds: a camera image takes the sweep nearest in time, if within this offset (layouts with timestamps)."""
    pandaset_lidar: Literal["both", "spinning", "forward"] = "both"
    """PandaSet sweeps: both sensors, the 360 spinning one (d = 0) or the forward-facing one (d = 1)."""
    check_files: bool = True
    data_root: Optional[Path] = None
    """Filled by the loader: the data root (default home of the LiDAR depth cache)."""

    def validate(self) -> "LayoutOptions":
        from evolsplat_ns.errors import ConfigError

        if self.layout != "auto" and self.layout not in LAYOUT_NAMES:
            raise ConfigError(f"layout must be 'auto' or one of {LAYOUT_NAMES}, got {self.layout!r}")
        if not (isinstance(self.downscale, (int, float)) and math.isfinite(self.downscale) and self.downscale >= 1.0):
            raise ConfigError(f"downscale must be a finite factor >= 1 (1 = full size), got {self.downscale!r}")
        if self.depth_source not in ("auto", "files", "lidar", "none"):
            raise ConfigError(f"depth_source must be auto | files | lidar | none, got {self.depth_source!r}")
        if self.lidar_max_time_offset < 0:
            raise ConfigError(f"lidar_max_time_offset must be >= 0, got {self.lidar_max_time_offset}")
        if self.cameras is not None and len(self.cameras) == 0:
            raise ConfigError("cameras: give at least one camera name or id (or leave it unset for all)")
        return self


@dataclass
class RawImage:
    """One image as a layout reads it: pose in the data's own world frame (OpenCV axes), native intrinsics."""

    timestep: int
    camera_id: int
    image_path: Path
    c2w_world: np.ndarray
    """[4, 4] OpenCV camera-to-world, data world frame."""
    K: np.ndarray
    """[3, 3] for an image of ``width`` x ``height``."""
    width: int
    height: int
    depth_path: Optional[Path] = None
    sky_mask_path: Optional[Path] = None
    timestamp: Optional[float] = None
    """Seconds (layouts with timestamps; used to time-align LiDAR sweeps)."""


def select_camera_ids(
    wanted: Optional[Sequence[str]], available: Dict[int, str], where: Path, field_name: str = "cameras"
) -> List[int]:
    """Camera ids chosen by ``wanted`` (names or ids, any mix), sorted; all of ``available`` when ``None``.

    ``available`` maps the layout's camera ids to names. An unknown entry is a :class:`DataValidationError` that
    lists what the data has.
    """
    if wanted is None:
        return sorted(available)
    by_name = {name.lower(): cid for cid, name in available.items()}
    out = []
    for w in wanted:
        key = str(w).strip().lower()
        if key in by_name:
            out.append(by_name[key])
        elif key.lstrip("-").isdigit() and int(key) in available:
            out.append(int(key))
        else:
            have = ", ".join(f"{cid}={name}" for cid, name in sorted(available.items()))
            raise DataValidationError(where, field_name, f"camera names or ids among [{have}]", repr(w))
    return sorted(set(out))


def front_of(camera_ids: Sequence[int], preferred: int) -> int:
    return preferred if preferred in camera_ids else min(camera_ids)


def build_scene(
    scene_dir: Path,
    scene_id: int,
    raws: List[RawImage],
    camera_names: Dict[int, str],
    front_camera_id: int,
    layout: str,
    sky_mask_convention: str = SKY_255_IS_SKY,
    seed_ply_path: Optional[Path] = None,
    metadata: Optional[dict] = None,
    source_file: Optional[Path] = None,
) -> SceneRecord:
    """A :class:`SceneRecord` from a layout's images: a full (timestep x camera) grid is required; poses are
    re-expressed relative to the first front-camera image (``align`` = inverse of its data-world pose)."""
    grid: Dict[Tuple[int, int], RawImage] = {}
    for r in raws:
        key = (r.timestep, r.camera_id)
        if key in grid:
            raise DataValidationError(r.image_path, "timestep/camera", "one image per (timestep, camera)",
                                      f"a second image for timestep {r.timestep} camera {r.camera_id}")
        grid[key] = r
    timesteps = sorted({k[0] for k in grid})
    cams = sorted({k[1] for k in grid})
    if not timesteps:
        raise DataValidationError(scene_dir, None, f"images of the {layout} layout", "none found")
    for ts in timesteps:
        for c in cams:
            if (ts, c) not in grid:
                raise DataValidationError(scene_dir, "images", "an image for every camera at every timestep",
                                          f"none for camera {c} ({camera_names.get(c, c)}) at timestep {ts}")
    sizes = {}
    for r in raws:
        sizes.setdefault((r.width, r.height), []).append(camera_names.get(r.camera_id, str(r.camera_id)))
    if len(sizes) > 1:  # batches stack the views of all cameras: report it now, not at the first batch
        have = "; ".join(f"{w}x{h}: {', '.join(sorted(set(n)))}" for (w, h), n in sorted(sizes.items()))
        raise DataValidationError(scene_dir, "cameras", "cameras of one image size (choose them with the cameras "
                                  "option)", have)
    front = front_of(cams, front_camera_id)
    align = rigid_inverse(np.asarray(grid[(timesteps[0], front)].c2w_world, dtype=np.float64))
    images = []
    for t_idx, ts in enumerate(timesteps):
        for c in cams:
            r = grid[(ts, c)]
            images.append(ImageRecord(
                image_path=r.image_path, frame_index=t_idx, camera_id=c, timestep=ts,
                c2w=align @ np.asarray(r.c2w_world, dtype=np.float64), K=np.asarray(r.K, dtype=np.float64),
                width=int(r.width), height=int(r.height), depth_path=r.depth_path, sky_mask_path=r.sky_mask_path,
            ))
    meta = {"camera_names": [camera_names.get(c, str(c)) for c in cams], "layout": layout,
            "camera_name_by_id": {int(c): camera_names.get(c, str(c)) for c in cams},
            "timestamps": {(t_idx, c): grid[(ts, c)].timestamp for t_idx, ts in enumerate(timesteps) for c in cams}}
    if source_file is not None:
        meta["transforms"] = str(source_file)  # stamped into point-cloud cache keys
    meta.update(metadata or {})
    return SceneRecord(scene_id=scene_id, name=scene_dir.name, root=scene_dir, images=images, camera_ids=cams,
                       num_frames=len(timesteps), align=align, seed_ply_path=seed_ply_path,
                       sky_mask_convention=sky_mask_convention, front_camera_id=front, metadata=meta)


def image_size(path: Path, where: str, complete: bool = False, what: str = "image") -> Tuple[int, int]:
    """(w, h) from the image header; a missing or unreadable file is a :class:`DataValidationError`; with
    ``complete`` a PNG must also end with its IEND chunk (a truncated sky mask or depth map is named at start-up);
    ``what`` the file is, for the messages."""
    from evolsplat_ns.data.dataparser import _image_size

    return _image_size(path, where, complete=complete, what=what)


def read_text(path: Path, what: str, field: Optional[str] = None) -> str:
    """The text of a user's file (UTF-8; a leading byte-order mark, as Windows editors write, is dropped). Every way
    it cannot be read — missing, a folder, not UTF-8, not readable (permissions, I/O) — is a
    :class:`DataValidationError` naming the file, ``field`` and ``what`` was expected."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataValidationError(path, field, f"{what} (UTF-8 text)",
                                  f"undecodable bytes (0x{e.object[e.start]:02x} at byte {e.start})") from None
    except OSError as e:
        kind = "a file" if isinstance(e, IsADirectoryError) else "a readable file"
        raise DataValidationError(path, field, f"{what} ({kind})", error_text(e)) from None


def read_json(path: Path, what: str, field: Optional[str] = None) -> Any:
    """A user's JSON file, parsed (:func:`read_text`, then ``valid JSON (what)``: the parser's message and line);
    the caller checks the types of what it holds."""
    text = read_text(path, what, field)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataValidationError(path, field, f"valid JSON ({what})",
                                  f"{e.msg} at line {e.lineno} column {e.colno}") from None


def read_numbers(path: Path, what: str, field: Optional[str] = None) -> np.ndarray:
    """A whitespace-separated table of numbers (``np.savetxt``) -> float64 array; words, rows of different lengths
    or an unreadable file are a :class:`DataValidationError` naming the file and ``field``."""
    text = read_text(path, what, field)
    try:
        return np.loadtxt(text.splitlines(), dtype=np.float64)
    except ValueError as e:
        raise DataValidationError(path, field, f"{what}: rows of numbers", str(e).split(";")[0][:80]) from None


def check_camera_sizes(raws: Sequence[RawImage], check_files: bool) -> None:
    """Every camera's intrinsics are plausible for its image size
    (:func:`evolsplat_ns.data.plausibility.check_intrinsics`); with ``check_files`` every image exists, is readable
    and has its camera's declared size (headers only)."""
    from evolsplat_ns.data.plausibility import check_intrinsics

    seen = set()
    for r in raws:
        key = (r.camera_id, tuple(np.round(np.asarray(r.K, dtype=np.float64).reshape(-1), 6)), r.width, r.height)
        if key not in seen:
            seen.add(key)
            K = np.asarray(r.K, dtype=np.float64)
            check_intrinsics(r.image_path, f"camera {r.camera_id} intrinsics", K[0, 0], K[1, 1], K[0, 2], K[1, 2],
                             r.width, r.height)
    if not check_files:
        return
    for r in raws:
        size = image_size(r.image_path, "image")
        if size != (r.width, r.height):
            raise DataValidationError(r.image_path, "image size", f"{r.width}x{r.height} (from the calibration / "
                                      f"the camera's first image)", f"{size[0]}x{size[1]}")
        if r.sky_mask_path is not None:
            ssize = image_size(r.sky_mask_path, "sky mask", complete=True, what="sky mask")
            if ssize != size:
                raise DataValidationError(r.sky_mask_path, "sky mask", f"a mask of {size[0]}x{size[1]} like its image",
                                          f"{ssize[0]}x{ssize[1]}")
        if r.depth_path is not None:
            from evolsplat_ns.data.dataparser import _depth_shape

            dsize = _depth_shape(r.depth_path, "depth")
            if dsize != size:
                raise DataValidationError(r.depth_path, "depth", f"a depth map of {size[1]}x{size[0]} (H x W) like "
                                          f"its image", f"{dsize[1]}x{dsize[0]}")


def read_matrix_txt(path: Path, where: str, shape=(4, 4), rigid: bool = True) -> np.ndarray:
    """A whitespace-separated matrix file (``np.savetxt``), validated (finite; rigid with last row 0 0 0 1)."""
    if not path.exists():
        raise DataValidationError(path, where, f"an existing {shape[0]}x{shape[1]} matrix file", "missing file")
    M = read_numbers(path, f"a {shape[0]}x{shape[1]} matrix of numbers", where)
    if M.size != int(np.prod(shape)):
        raise DataValidationError(path, where, f"a {shape[0]}x{shape[1]} matrix ({int(np.prod(shape))} numbers)",
                                  f"{M.size} numbers")
    M = M.reshape(shape)
    if rigid:
        from evolsplat_ns.data.dataparser import _pose

        M = _pose(path, where, M)
    elif not np.all(np.isfinite(M)):
        raise DataValidationError(path, where, "finite values", "NaN or inf")
    return M


_NUM = re.compile(r"^-?\d+$")


def is_int(s: str) -> bool:
    return bool(_NUM.match(s))


# ----------------------------------------------------------------------------------------------------------------
# transforms applied to finished scenes (every layout)
# ----------------------------------------------------------------------------------------------------------------


def downscale_scene(scene: SceneRecord, factor: float) -> SceneRecord:
    """The scene with every image shrunk by ``factor`` on load: sizes ``round(w / f) x round(h / f)``, ``K`` scaled
    by the exact ratios (pixel-centre convention kept), ``native_size`` remembering the files' size."""
    if factor == 1.0:
        return scene
    new = []
    for r in scene.images:
        w0, h0 = r.native_size or (r.width, r.height)
        w, h = max(1, int(round(w0 / factor))), max(1, int(round(h0 / factor)))
        if w < 2 or h < 2:
            raise DataValidationError(r.image_path, "downscale", f"a factor leaving at least 2x2 pixels of {w0}x{h0}",
                                      factor)
        K0 = scale_intrinsics(r.K, w0 / r.width, h0 / r.height)  # back to native, if already scaled
        new.append(replace(r, K=scale_intrinsics(K0, w / w0, h / h0), width=w, height=h, native_size=(w0, h0)))
    return _with_images(scene, new)


def _with_images(scene: SceneRecord, images: List[ImageRecord], **changes) -> SceneRecord:
    kw = dict(scene_id=scene.scene_id, name=scene.name, root=scene.root, images=images, camera_ids=scene.camera_ids,
              num_frames=scene.num_frames, align=scene.align, seed_ply_path=scene.seed_ply_path,
              sky_mask_convention=scene.sky_mask_convention, front_camera_id=scene.front_camera_id,
              lidar_paths=scene.lidar_paths, metadata=dict(scene.metadata))
    kw.update(changes)
    return SceneRecord(**kw)


def restrict_cameras(scene: SceneRecord, wanted: Optional[Sequence[str]]) -> SceneRecord:
    """Keep only the chosen cameras of a finished scene (multi-scene layout). If the front camera is dropped the
    project frame moves to the first image of the new front camera (poses and ``align`` re-expressed)."""
    if wanted is None:
        return scene
    names = scene.metadata.get("camera_names") if isinstance(scene.metadata, dict) else None
    available = {c: (names[c] if isinstance(names, list) and c < len(names) else str(c)) for c in scene.camera_ids}
    keep = select_camera_ids(wanted, available, Path(scene.metadata.get("transforms", scene.root)))
    if keep == list(scene.camera_ids):
        return scene
    front = front_of(keep, scene.front_camera_id)
    A = np.eye(4)
    if front != scene.front_camera_id:
        A = rigid_inverse(scene.image(0, front).c2w)
    images = [replace(r, c2w=A @ r.c2w) for r in scene.images if r.camera_id in keep]
    if scene.metadata.get(LIDAR_KEY) is not None and front != scene.front_camera_id:
        raise DataValidationError(scene.root, "cameras", "the front camera kept when the scene has LiDAR")
    return _with_images(scene, images, camera_ids=keep, front_camera_id=front, align=A @ scene.align)


LIDAR_KEY = "lidar_loader"


# ----------------------------------------------------------------------------------------------------------------
# the reference's Drop-N input / test protocol, by timestep
# ----------------------------------------------------------------------------------------------------------------


def protocol_input_frames(num_frames: int, mode: str) -> Optional[set]:
    """Frames (positions 0..T-1 in time order) that may be network inputs under a hold-out protocol.

    ``odd`` / ``Drop50``: even timesteps are inputs, odd ones are tested (the reference's Drop50: it keeps image
    positions p % 4 in {0, 1} of KITTI-360's two-camera list, i.e. even timesteps; every other Waymo frame);
    ``Drop25``: t % 4 == 2 is held out; ``Drop80``: t % 5 == 0 are inputs; ``Drop90``: t % 10 == 0 are inputs;
    ``none``: ``None`` (no restriction).
    """
    rules = {
        "odd": lambda t: t % 2 == 0,
        "Drop50": lambda t: t % 2 == 0,
        "Drop25": lambda t: t % 4 != 2,
        "Drop80": lambda t: t % 5 == 0,
        "Drop90": lambda t: t % 10 == 0,
    }
    if mode == "none":
        return None
    if mode not in rules:
        from evolsplat_ns.errors import ConfigError

        raise ConfigError(f"eval_holdout must be one of {HOLDOUT_MODES}, got {mode!r}")
    return {t for t in range(num_frames) if rules[mode](t)}
