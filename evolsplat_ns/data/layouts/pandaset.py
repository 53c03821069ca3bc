"""Raw PandaSet sequences (``NNN/``), as distributed.

::

    NNN/
      camera/<name>_camera/             # front, front_left, front_right, left, right, back
        NN.jpg                          # 1920 x 1080, undistorted; NN = 00, 01, ...
        intrinsics.json                 # {"fx", "fy", "cx", "cy"}
        poses.json                      # one per frame: {"position": {x, y, z}, "heading": {w, x, y, z}}
        timestamps.json                 # one per frame, seconds
      lidar/
        NN.pkl.gz                       # gzipped pickled pandas DataFrame: x, y, z (world), i, t, d
        poses.json, timestamps.json     # LiDAR poses and sweep times (seconds)

Camera poses are camera-to-world with OpenCV camera axes (PandaSet projects world points with the inverse pose
and a plain pinhole); the quaternion is scalar-first. LiDAR points are in world coordinates; ``d`` is 0 for the
360 spinning sensor and 1 for the forward-facing one. Sweeps can be missing in real copies: the scene is still
read (a warning names them; those frames get no LiDAR). Each image is paired with the sweep nearest in time
(``lidar_max_time_offset``). No sky masks.

Reading the sweeps needs pandas (the files are pickled DataFrames).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from evolsplat_ns.cameras import intrinsics_matrix, pandaset_pose_to_c2w
from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.data.layouts.common import (
    LayoutOptions,
    RawImage,
    build_scene,
    check_camera_sizes,
    read_json,
    select_camera_ids,
)
from evolsplat_ns.data.layouts.lidar import LidarSource, Sweep, attach, default_cache_dir
from evolsplat_ns.data.records import SceneRecord

logger = logging.getLogger(__name__)

NAME = "pandaset"
CAMERAS = ["front", "front_left", "front_right", "left", "right", "back"]
IMAGE_SIZE = (1920, 1080)


def is_scene(d: Path) -> bool:
    cam = d / "camera"
    return cam.is_dir() and any((cam / f"{n}_camera" / "poses.json").exists() for n in CAMERAS)


def _pose(path: Path, i: int, pose: Any) -> np.ndarray:
    where = f"[{i}]"
    try:
        T = pandaset_pose_to_c2w(pose)
    except (KeyError, TypeError, ValueError) as e:
        raise DataValidationError(path, where, "{position: {x, y, z}, heading: {w, x, y, z}} with a non-zero "
                                  "quaternion", f"{type(e).__name__}: {e}") from None
    if not np.all(np.isfinite(T)):
        raise DataValidationError(path, where, "finite position and heading", "NaN or inf")
    return T


def _numbers(path: Path, values: Any, n: int, what: str) -> List[float]:
    if not isinstance(values, list) or len(values) != n:
        raise DataValidationError(path, None, f"a list of {n} {what} (one per frame)",
                                  f"{type(values).__name__} of {len(values) if isinstance(values, list) else '?'}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise DataValidationError(path, f"[{i}]", "a finite number (seconds)", repr(v))
        out.append(float(v))
    return out


def parse(scene_dir: Path, scene_id: int, options: LayoutOptions) -> SceneRecord:
    d = Path(scene_dir)
    present = {i: n for i, n in enumerate(CAMERAS) if (d / "camera" / f"{n}_camera").is_dir()}
    cams = select_camera_ids(options.cameras, present, d)
    raws: List[RawImage] = []
    num_frames: Optional[int] = None
    for c in cams:
        cdir = d / "camera" / f"{CAMERAS[c]}_camera"
        intr = read_json(cdir / "intrinsics.json", "camera intrinsics {fx, fy, cx, cy}")
        try:
            fx, fy, cx, cy = (float(intr[k]) for k in ("fx", "fy", "cx", "cy"))
        except (KeyError, TypeError, ValueError):
            raise DataValidationError(cdir / "intrinsics.json", "fx/fy/cx/cy", "numbers fx, fy, cx, cy",
                                      repr(intr)[:80]) from None
        if not (fx > 0 and fy > 0):
            raise DataValidationError(cdir / "intrinsics.json", "fx/fy", "positive focal lengths", (fx, fy))
        poses = read_json(cdir / "poses.json", "a list of camera poses, one per frame")
        if not isinstance(poses, list) or not poses:
            raise DataValidationError(cdir / "poses.json", None, "a non-empty list of poses", type(poses).__name__)
        if num_frames is None:
            num_frames = len(poses)
        elif len(poses) != num_frames:
            raise DataValidationError(cdir / "poses.json", None, f"{num_frames} poses (as the other cameras)",
                                      len(poses))
        times = _numbers(cdir / "timestamps.json", read_json(cdir / "timestamps.json", "camera timestamps"),
                         num_frames, "timestamps")
        K = intrinsics_matrix(fx, fy, cx, cy)
        for t in range(num_frames):
            img = cdir / f"{t:02d}.jpg"
            raws.append(RawImage(timestep=t, camera_id=c, image_path=img, c2w_world=_pose(cdir / "poses.json", t, poses[t]),
                                 K=K, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1], timestamp=times[t]))
    if options.check_files:
        # PandaSet's images are 1920x1080; take each camera's size from its first image and check the rest
        from dataclasses import replace

        from evolsplat_ns.data.layouts.common import image_size

        sizes = {c: image_size(d / "camera" / f"{CAMERAS[c]}_camera" / "00.jpg", "image") for c in cams}
        raws = [replace(r, width=sizes[r.camera_id][0], height=sizes[r.camera_id][1]) for r in raws]
    check_camera_sizes(raws, options.check_files)
    scene = build_scene(d, scene_id, raws, dict(present), front_camera_id=0, layout=NAME,
                        source_file=d / "camera" / f"{CAMERAS[cams[0]]}_camera" / "poses.json")
    if (d / "lidar").is_dir():
        source = _lidar(d, scene, int(num_frames or 0), options)
        attach(scene, source, provide_depth=options.depth_source in ("auto", "lidar"))
    return scene


def read_sweep(path: Path, sensor: str = "both") -> np.ndarray:
    """``[M, 3]`` world points of one PandaSet sweep (``NN.pkl.gz``: a gzipped pickled pandas DataFrame).

    ``sensor``: ``both``, ``spinning`` (d == 0) or ``forward`` (d == 1).
    """
    try:
        import pandas as pd
    except ImportError:
        raise DataValidationError(path, None, "pandas installed to read PandaSet sweeps (pickled pandas DataFrames): "
                                  "pip install pandas") from None
    try:
        # read_pickle (not pickle.load): it also reads pickles of older pandas versions, as PandaSet's are
        df = pd.read_pickle(path, compression="gzip")
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file
        raise DataValidationError(path, None, "a gzipped pickled pandas DataFrame", f"{type(e).__name__}: {e}") from None
    cols = getattr(df, "columns", None)
    if cols is None or not all(k in cols for k in ("x", "y", "z")):
        raise DataValidationError(path, "columns", "a DataFrame with columns x, y, z (and i, t, d)",
                                  list(cols) if cols is not None else type(df).__name__)
    pts = df[["x", "y", "z"]].to_numpy(dtype=np.float64)
    if sensor != "both" and "d" in cols:
        pts = pts[df["d"].to_numpy() == (0 if sensor == "spinning" else 1)]
    return pts


def _lidar(d: Path, scene: SceneRecord, num_frames: int, options: LayoutOptions) -> LidarSource:
    times: List[Optional[float]] = [None] * num_frames
    tpath = d / "lidar" / "timestamps.json"
    if tpath.exists():
        raw = read_json(tpath, "LiDAR sweep timestamps")
        if isinstance(raw, list) and len(raw) >= num_frames:
            times = _numbers(tpath, raw[:num_frames], num_frames, "timestamps")  # type: ignore[assignment]
        else:
            raise DataValidationError(tpath, None, f"a list of {num_frames} timestamps (one per frame)",
                                      len(raw) if isinstance(raw, list) else type(raw).__name__)
    sweeps = []
    for t in range(num_frames):
        p = d / "lidar" / f"{t:02d}.pkl.gz"
        sweeps.append(Sweep(p if p.exists() else None, to_world=None, timestamp=times[t]))
    sensor = options.pandaset_lidar
    return LidarSource(scene.name, sweeps, partial(read_sweep, sensor=sensor), scene.align,
                       cache_dir=default_cache_dir(options, d), max_time_offset=options.lidar_max_time_offset,
                       cache_tag=f"{NAME}:{sensor}")
