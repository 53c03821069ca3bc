"""Raw KITTI drives (synced + rectified), as distributed.

::

    2011_09_26/                                   # a date folder: the data root
      calib_cam_to_cam.txt                        # calib_time, then K_0i, D_0i, R_0i, T_0i, S_rect_0i, R_rect_0i,
                                                  #   P_rect_0i for i = 00..03 ("key: numbers" lines)
      calib_velo_to_cam.txt                       # R: (9), T: (3)  Velodyne -> unrectified camera 0
      calib_imu_to_velo.txt                       # R: (9), T: (3)  IMU -> Velodyne
      2011_09_26_drive_0001_sync/                 # a scene
        image_02/data/0000000000.png ...          # left colour camera (rectified)
        image_03/data/0000000000.png ...          # right colour camera (rectified)
        image_02/timestamps.txt, image_03/...     # optional: "YYYY-MM-DD HH:MM:SS.fffffffff" per frame
        velodyne_points/data/0000000000.bin ...   # float32 x, y, z, reflectance (Velodyne frame)
        velodyne_points/timestamps.txt            # optional
        oxts/data/0000000000.txt ...              # 30 numbers: lat lon alt roll pitch yaw vn ve vf vl vu ax ...

The calibration files are looked up in the drive folder, then in its parent (the date folder).

Poses: each OXTS packet gives IMU-to-world by the standard Mercator conversion (scale = cos of the first packet's
latitude); poses are made relative to the first frame. A rectified camera ``i`` sees Velodyne points through
``T_i @ R_rect_00 @ [R|T]_velo_to_cam`` with ``P_rect_0i = K_i [I | t_i]``, ``T_i`` = translation ``t_i``;
so ``c2w_i(t) = T_w_imu(t) @ inv(T_velo_imu) @ inv(T_cam_i_velo)`` — already OpenCV axes (x right, y down,
z forward). Camera ids are KITTI's: 2 = ``image_02`` (front, left colour), 3 = ``image_03``. No sky masks.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from evolsplat_ns.cameras import kitti_rectified_camera, oxts_mercator_scale, oxts_to_pose, rigid_inverse, rigid_matrix
from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.data.layouts.common import (
    LayoutOptions,
    RawImage,
    build_scene,
    check_camera_sizes,
    read_text,
    select_camera_ids,
)
from evolsplat_ns.data.layouts.lidar import LidarSource, Sweep, attach, check_rows, default_cache_dir, read_float32_rows
from evolsplat_ns.data.records import SceneRecord

logger = logging.getLogger(__name__)

NAME = "kitti-raw"
CAMERAS = {2: "image_02", 3: "image_03"}
OXTS_FIELDS = 30


def is_scene(d: Path) -> bool:
    return (d / "image_02" / "data").is_dir() and (d / "oxts" / "data").is_dir()


def read_calib(path: Path) -> Dict[str, object]:
    """A KITTI calibration text file: ``key: values`` per line -> {key: float array, or the raw string}."""
    if not path.exists():
        raise DataValidationError(path, None, "the KITTI calibration file (in the drive folder or its date folder)",
                                  "missing file")
    out: Dict[str, object] = {}
    for line in read_text(path, "the KITTI calibration file").splitlines():
        if ":" not in line:
            continue
        key, val = line.split(":", 1)
        try:
            out[key.strip()] = np.array([float(x) for x in val.split()], dtype=np.float64)
        except ValueError:
            out[key.strip()] = val.strip()  # calib_time: 09-Jan-2012 13:57:47
    return out


def _entry(calib: Dict[str, object], path: Path, key: str, n: int) -> np.ndarray:
    v = calib.get(key)
    if not isinstance(v, np.ndarray) or v.size != n:
        raise DataValidationError(path, key, f"{n} numbers", "missing" if v is None else repr(v)[:60])
    if not np.all(np.isfinite(v)):
        raise DataValidationError(path, key, "finite numbers", "NaN or inf")
    return v


def _rt(calib: Dict[str, object], path: Path) -> np.ndarray:
    R = _entry(calib, path, "R", 9).reshape(3, 3)
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-3) or abs(np.linalg.det(R) - 1) > 1e-3:
        raise DataValidationError(path, "R", "a rotation matrix (orthonormal, det +1)")
    return rigid_matrix(nearest_rotation(R), _entry(calib, path, "T", 3))


def nearest_rotation(R: np.ndarray) -> np.ndarray:
    """The rotation nearest to ``R`` (KITTI publishes rotations to 7 digits: orthonormal to ~1e-7 only; poses
    built from them are kept exactly rigid so that inverses are transposes)."""
    U, _, Vt = np.linalg.svd(R)
    out = U @ Vt
    if np.linalg.det(out) < 0:
        U[:, -1] *= -1
        out = U @ Vt
    return out


def read_timestamps(path: Path, frames: Sequence[int]) -> Optional[List[float]]:
    """``timestamps.txt`` (line k: frame k's ``YYYY-MM-DD HH:MM:SS.fffffffff``, for every frame of the drive) ->
    seconds of each of ``frames`` (frame numbers, the files' stems: a crop of a drive keeps its numbers, so line k,
    not the k-th file, is frame k's time); ``None`` if absent."""
    if not path.exists():
        return None
    lines = [ln.strip() for ln in read_text(path, "timestamps, one per frame").splitlines() if ln.strip()]
    if frames and max(frames) >= len(lines):
        raise DataValidationError(path, None, f"a timestamp for every frame up to frame {max(frames)} "
                                  "(line k: frame k)", f"{len(lines)} lines")
    out = []
    for i, ln in ((k, lines[k]) for k in frames):
        try:
            day, clock = ln.split()
            hh, mm, ss = clock.split(":")
            base = datetime.strptime(day, "%Y-%m-%d").toordinal() * 86400.0
            out.append(base + int(hh) * 3600 + int(mm) * 60 + float(ss))
        except ValueError:
            raise DataValidationError(path, f"line {i + 1}", "YYYY-MM-DD HH:MM:SS.fffffffff", ln) from None
    return out


def read_oxts(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataValidationError(path, None, f"an OXTS packet ({OXTS_FIELDS} numbers)", "missing file")
    text = read_text(path, f"an OXTS packet ({OXTS_FIELDS} numbers)")
    try:
        v = np.array([float(x) for x in text.split()], dtype=np.float64)
    except ValueError as e:
        raise DataValidationError(path, None, f"{OXTS_FIELDS} numbers", str(e)[:60]) from None
    if v.size != OXTS_FIELDS or not np.all(np.isfinite(v[:6])):
        raise DataValidationError(path, None, f"{OXTS_FIELDS} numbers (lat lon alt roll pitch yaw ... finite)",
                                  f"{v.size} numbers")
    return v


def read_velodyne(path: Path) -> np.ndarray:
    """``[M, 3]`` points of a Velodyne sweep (float32 x, y, z, reflectance rows; Velodyne frame)."""
    return read_float32_rows(path, 4)[:, :3]


def _calib_dir(d: Path) -> Path:
    return d if (d / "calib_cam_to_cam.txt").exists() else d.parent


def parse(scene_dir: Path, scene_id: int, options: LayoutOptions) -> SceneRecord:
    d = Path(scene_dir)
    present = {c: n for c, n in CAMERAS.items() if (d / n / "data").is_dir()}
    cams = select_camera_ids(options.cameras, present, d)
    stems = sorted(p.stem for p in (d / "image_02" / "data").glob("*.png"))
    if not stems:
        raise DataValidationError(d / "image_02" / "data", None, "images 0000000000.png ...", "none")
    cdir = _calib_dir(d)
    c2c_path, v2c_path, i2v_path = cdir / "calib_cam_to_cam.txt", cdir / "calib_velo_to_cam.txt", cdir / "calib_imu_to_velo.txt"
    c2c = read_calib(c2c_path)
    T_cam0_velo = _rt(read_calib(v2c_path), v2c_path)  # Velodyne -> unrectified camera 0
    T_velo_imu = _rt(read_calib(i2v_path), i2v_path)  # IMU -> Velodyne
    R_rect = rigid_matrix(nearest_rotation(_entry(c2c, c2c_path, "R_rect_00", 9).reshape(3, 3)), np.zeros(3))
    # IMU poses from OXTS, relative to the first frame
    oxts = [read_oxts(d / "oxts" / "data" / f"{s}.txt") for s in stems]
    scale = oxts_mercator_scale(oxts[0][0])
    T_w_imu = [oxts_to_pose(*o[:6], scale=scale) for o in oxts]
    T0_inv = rigid_inverse(T_w_imu[0])
    T_w_imu = [T0_inv @ T for T in T_w_imu]
    imu_from_velo = rigid_inverse(T_velo_imu)
    raws: List[RawImage] = []
    for c in cams:
        key = f"{c:02d}"
        K, T_rect0_to_i = kitti_rectified_camera(_entry(c2c, c2c_path, f"P_rect_{key}", 12))
        S = _entry(c2c, c2c_path, f"S_rect_{key}", 2)
        w, h = int(round(S[0])), int(round(S[1]))
        T_cam_velo = T_rect0_to_i @ R_rect @ T_cam0_velo  # Velodyne -> rectified camera c
        velo_from_cam = rigid_inverse(T_cam_velo)
        times = read_timestamps(d / CAMERAS[c] / "timestamps.txt", [int(s) for s in stems])
        for t, s in enumerate(stems):
            img = d / CAMERAS[c] / "data" / f"{s}.png"
            raws.append(RawImage(timestep=int(s), camera_id=c, image_path=img,
                                 c2w_world=T_w_imu[t] @ imu_from_velo @ velo_from_cam, K=K, width=w, height=h,
                                 timestamp=None if times is None else times[t]))
    check_camera_sizes(raws, options.check_files)
    scene = build_scene(d, scene_id, raws, dict(present), front_camera_id=2, layout=NAME, source_file=c2c_path,
                        metadata={"calib_time": c2c.get("calib_time")})
    vdir = d / "velodyne_points" / "data"
    if vdir.is_dir():
        vtimes = read_timestamps(d / "velodyne_points" / "timestamps.txt", [int(s) for s in stems])
        sweeps = []
        for t, s in enumerate(stems):
            p = vdir / f"{s}.bin"
            if p.exists() and options.check_files:
                check_rows(p, 4)
            sweeps.append(Sweep(p if p.exists() else None, to_world=T_w_imu[t] @ imu_from_velo,
                                timestamp=None if vtimes is None else vtimes[t]))
        source = LidarSource(scene.name, sweeps, read_velodyne, scene.align,
                             cache_dir=default_cache_dir(options, d), max_time_offset=options.lidar_max_time_offset,
                             cache_tag=NAME)
        attach(scene, source, provide_depth=options.depth_source in ("auto", "lidar"))
    return scene
