"""PLY point clouds with colours: reading, writing, atomic writing.

open3d does the I/O when it is importable; otherwise plyfile (a dependency of the package, present on every
machine) reads and writes the same files. Colours are ``[N, 3]`` float32 in [0, 1] in memory and 8-bit
``red green blue`` in the files (lossless for colours that came from 8-bit images).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)


def open3d_module():
    """open3d, or None when it cannot be imported (e.g. the GPU machine, or a missing libusb)."""
    try:
        import open3d  # noqa: PLC0415 - imported lazily on purpose

        return open3d
    except Exception:  # noqa: BLE001 - ImportError or OSError of its shared libraries
        return None


def quantise_colours(colours: np.ndarray) -> np.ndarray:
    """Colours as stored in a PLY and read back: ``round(c * 255) / 255`` as float32."""
    return (np.round(np.clip(np.asarray(colours, dtype=np.float64), 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _colours_u8(colours: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(colours, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_ply(path, points: np.ndarray, colours: Optional[np.ndarray] = None) -> None:
    """Write a binary PLY (x y z, and red green blue when ``colours`` is given)."""
    path = Path(path)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    o3d = open3d_module()
    if o3d is not None:
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
        if colours is not None:
            # open3d stores colours as uchar: quantise here so that both writers produce the same values
            pc.colors = o3d.utility.Vector3dVector(_colours_u8(colours).astype(np.float64) / 255.0)
        if not o3d.io.write_point_cloud(str(path), pc, write_ascii=False, compressed=False, print_progress=False):
            raise OSError(f"open3d could not write {path}")
        return
    from plyfile import PlyData, PlyElement

    fields = [("x", "<f8"), ("y", "<f8"), ("z", "<f8")]
    if colours is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    v = np.empty(len(points), dtype=fields)
    v["x"], v["y"], v["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colours is not None:
        c = _colours_u8(colours)
        v["red"], v["green"], v["blue"] = c[:, 0], c[:, 1], c[:, 2]
    PlyData([PlyElement.describe(v, "vertex")], text=False, byte_order="<").write(str(path))


def read_ply(path, points_dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``(points [N, 3], colours [N, 3] float32 in [0, 1])``; grey 0.5 when the file has no colour. Points
    come as ``points_dtype``: float64 keeps world coordinates far from the origin exact (UTM: 5e6 m, where float32
    rounds to 0.5 m)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no PLY file at {path}")
    try:  # plyfile first: it reads every PLY we write in ~50 ms for 600 k points, without importing open3d
        return _read_plyfile(path, points_dtype)
    except Exception:  # noqa: BLE001 - a variant plyfile cannot parse: let open3d try, else report plyfile's error
        o3d = open3d_module()
        if o3d is None:
            raise
    pc = o3d.io.read_point_cloud(str(path), format="ply")
    pts = np.asarray(pc.points, dtype=points_dtype).reshape(-1, 3)
    if len(pts) == 0 and path.stat().st_size > 0:
        _check_empty_with_plyfile(path)
    cols = quantise_colours(np.asarray(pc.colors, dtype=np.float64)) if pc.has_colors() else np.full_like(pts, 0.5)
    return pts, cols


def _read_plyfile(path: Path, points_dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    from plyfile import PlyData

    ply = PlyData.read(str(path))
    v = ply["vertex"].data
    pts = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(points_dtype)
    names = v.dtype.names or ()
    if all(c in names for c in ("red", "green", "blue")):
        cols = np.stack([v["red"], v["green"], v["blue"]], axis=1)
        if cols.dtype.kind == "f":  # float colours already in [0, 1]
            cols = cols.astype(np.float32)
        else:
            cols = (cols.astype(np.float64) / 255.0).astype(np.float32)
    else:
        cols = np.full_like(pts, 0.5)
    return pts, cols


def _check_empty_with_plyfile(path: Path) -> None:
    """open3d reads a malformed file as an empty cloud (with a warning); a real reader error is clearer."""
    _read_plyfile(path)


def write_ply_atomic(path, points: np.ndarray, colours: Optional[np.ndarray] = None) -> Path:
    """Write through a temporary file in the same folder and ``os.replace`` it into place.

    A reader never sees a partial file: either the old file (or none) or the complete new one. If writing fails
    the temporary file is removed and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.ply"
    try:
        write_ply(tmp, points, colours)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path
