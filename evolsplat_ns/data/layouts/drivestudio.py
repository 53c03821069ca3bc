"""DriveStudio processed scenes (``NNN/``), as DriveStudio's preprocessing writes them.

::

    NNN/
      images/{t:03d}_{cam}.jpg          # one image per timestep and camera
      intrinsics/{cam}.txt              # 9 numbers: fx fy cx cy k1 k2 p1 p2 k3 (distortion ignored: undistorted)
      extrinsics/{cam}.txt              # Waymo style: camera -> ego 4x4, Waymo camera axes (x fwd, y left, z up)
      ego_pose/{t:03d}.txt              #   + ego -> world 4x4 per timestep
      extrinsics/{t:03d}_{cam}.txt      # or nuScenes / PandaSet style: camera -> world 4x4, OpenCV axes already
      lidar/{t:03d}.bin                 # optional, float32 rows; columns depend on the source (below)
      lidar_pose/{t:03d}.txt            # nuScenes style: LiDAR -> world 4x4
      sky_masks/{t:03d}_{cam}.png       # optional, 255 = sky
      depth/{t:03d}_{cam}.npy           # optional metric z-depth (metres)

LiDAR rows by source (DriveStudio's writers): Waymo 14 columns (origin xyz, point xyz, flow xyz, flow class,
ground, intensity, elongation, laser id; points in the ego frame, moved by ``ego_pose``); nuScenes 4 columns
(x y z intensity in the LiDAR frame, moved by ``lidar_pose``); PandaSet 5 columns (x y z intensity laser id in the
ego frame, moved by ``ego_pose``). The style is recognised from which files exist. No timestamps: sweep ``t``
pairs with the images of timestep ``t``.

Camera names follow the source: Waymo ``front, front_left, front_right, left, right``; nuScenes ``front,
front_left, front_right, back_left, back_right, back``; PandaSet ``front, front_left, front_right, left, right,
back``.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Dict, List

import numpy as np

from evolsplat_ns.cameras import intrinsics_matrix, waymo_camera_to_opencv
from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.data.layouts.common import (
    LayoutOptions,
    RawImage,
    build_scene,
    check_camera_sizes,
    image_size,
    read_matrix_txt,
    read_numbers,
    select_camera_ids,
)
from evolsplat_ns.data.layouts.lidar import LidarSource, Sweep, attach, check_rows, default_cache_dir, read_float32_rows
from evolsplat_ns.data.records import SKY_255_IS_SKY, SceneRecord

logger = logging.getLogger(__name__)

NAME = "drivestudio"
_IMAGE = re.compile(r"^(\d+)_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
NAMES = {
    "waymo": ["front", "front_left", "front_right", "left", "right"],
    "nuscenes": ["front", "front_left", "front_right", "back_left", "back_right", "back"],
    "pandaset": ["front", "front_left", "front_right", "left", "right", "back"],
}
#: (float32 columns per row, columns holding x y z, which pose moves the points to the world)
LIDAR_ROWS = {"waymo": (14, slice(3, 6), "ego_pose"), "nuscenes": (4, slice(0, 3), "lidar_pose"),
              "pandaset": (5, slice(0, 3), "ego_pose")}


def is_scene(d: Path) -> bool:
    return (d / "images").is_dir() and (d / "intrinsics").is_dir() and (d / "extrinsics").is_dir()


def _style(d: Path, cams: List[int]) -> str:
    if all((d / "extrinsics" / f"{c}.txt").exists() for c in cams):
        return "waymo"
    return "nuscenes" if (d / "lidar_pose").is_dir() else "pandaset"


def parse(scene_dir: Path, scene_id: int, options: LayoutOptions) -> SceneRecord:
    d = Path(scene_dir)
    from evolsplat_ns.data.dataparser import list_folder

    found: Dict[tuple, Path] = {}
    for p in sorted(list_folder(d / "images", "images")):
        m = _IMAGE.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise DataValidationError(d / "images", None, "images named {t:03d}_{cam}.jpg", "none")
    all_cams = sorted({c for _, c in found})
    style = _style(d, all_cams)
    names = {c: (NAMES[style][c] if c < len(NAMES[style]) else f"camera_{c}") for c in all_cams}
    cams = select_camera_ids(options.cameras, names, d)
    timesteps = sorted({t for t, _ in found})
    raws: List[RawImage] = []
    ego: Dict[int, np.ndarray] = {}
    if style == "waymo" or style == "pandaset":
        for t in timesteps:
            p = d / "ego_pose" / f"{t:03d}.txt"
            if style == "waymo" or p.exists():
                ego[t] = read_matrix_txt(p, "ego_pose (ego -> world, 4x4)")
    for c in cams:
        ipath = d / "intrinsics" / f"{c}.txt"
        if not ipath.exists():
            raise DataValidationError(ipath, "intrinsics", "fx fy cx cy k1 k2 p1 p2 k3 of the camera", "missing file")
        vals = read_numbers(ipath, "fx fy cx cy k1 k2 p1 p2 k3 of the camera", "intrinsics").reshape(-1)
        if vals.size < 4 or not np.all(np.isfinite(vals[:4])) or vals[0] <= 0 or vals[1] <= 0:
            raise DataValidationError(ipath, "intrinsics", "9 numbers fx fy cx cy k1 k2 p1 p2 k3 (fx, fy > 0)",
                                      vals.tolist()[:9])
        K = intrinsics_matrix(vals[0], vals[1], vals[2], vals[3])
        cam_to_ego = read_matrix_txt(d / "extrinsics" / f"{c}.txt", "extrinsics (camera -> ego, 4x4)") \
            if style == "waymo" else None
        size = None
        for t in timesteps:
            img = found.get((t, c))
            if img is None:
                raise DataValidationError(d / "images", "images", "an image for every camera at every timestep",
                                          f"no {t:03d}_{c}.* (camera {names[c]})")
            if size is None:
                size = image_size(img, "image") if options.check_files else _size_unchecked(img)
            if style == "waymo":
                c2w = waymo_camera_to_opencv(ego[t] @ cam_to_ego)  # Waymo camera axes -> OpenCV, once
            else:
                c2w = read_matrix_txt(d / "extrinsics" / f"{t:03d}_{c}.txt", "extrinsics (camera -> world, 4x4)")
            depth = d / "depth" / f"{t:03d}_{c}.npy"
            sky = d / "sky_masks" / f"{t:03d}_{c}.png"
            raws.append(RawImage(timestep=t, camera_id=c, image_path=img, c2w_world=c2w, K=K, width=size[0],
                                 height=size[1], depth_path=depth if depth.exists() else None,
                                 sky_mask_path=sky if sky.exists() else None))
    if options.depth_source in ("lidar", "none"):
        raws = [_no_depth(r) for r in raws]
    check_camera_sizes(raws, options.check_files)
    scene = build_scene(d, scene_id, raws, names, front_camera_id=0, layout=NAME,
                        sky_mask_convention=SKY_255_IS_SKY, source_file=d / "intrinsics" / f"{cams[0]}.txt",
                        metadata={"drivestudio_style": style})
    if (d / "lidar").is_dir():
        source = _lidar(d, scene, style, ego, timesteps, options)
        attach(scene, source, provide_depth=options.depth_source in ("auto", "lidar"))
    return scene


def _read_xyz(path: Path, columns: int, xyz: slice) -> np.ndarray:
    return read_float32_rows(path, columns)[:, xyz]


def _no_depth(r: RawImage) -> RawImage:
    from dataclasses import replace

    return replace(r, depth_path=None)


def _size_unchecked(p: Path):
    from PIL import Image

    with Image.open(p) as im:
        return im.size


def _lidar(d: Path, scene: SceneRecord, style: str, ego: Dict[int, np.ndarray], timesteps: List[int],
           options: LayoutOptions) -> LidarSource:
    cols, xyz, pose_kind = LIDAR_ROWS[style]
    sweeps: List[Sweep] = []
    for t in timesteps:
        p = d / "lidar" / f"{t:03d}.bin"
        if not p.exists():
            sweeps.append(Sweep(None))
            continue
        if options.check_files:
            check_rows(p, cols)
        if pose_kind == "lidar_pose":
            to_world = read_matrix_txt(d / "lidar_pose" / f"{t:03d}.txt", "lidar_pose (LiDAR -> world, 4x4)")
        else:
            if t not in ego:
                raise DataValidationError(d / "ego_pose" / f"{t:03d}.txt", "ego_pose",
                                          "the ego pose of every timestep with a LiDAR sweep", "missing file")
            to_world = ego[t]
        sweeps.append(Sweep(p, to_world=to_world))

    reader = partial(_read_xyz, columns=cols, xyz=xyz)  # picklable (scenes may be copied to other processes)
    return LidarSource(scene.name, sweeps, reader, scene.align, cache_dir=default_cache_dir(options, d),
                       max_time_offset=options.lidar_max_time_offset, cache_tag=f"{NAME}:{style}")
