"""PLY point clouds with colours: reading, writing, atomic writing.

open3d writes when it is importable, otherwise plyfile (a dependency of the package, present on every machine)
writes the same files. plyfile reads them, strictly (:func:`read_ply`: the header checked against the file, exactly
the vertices it declares; a bad file is a user error naming it, where open3d would pad a cut file with zeros).
Colours are ``[N, 3]`` float32 in [0, 1] in memory and 8-bit
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


#: Bytes of each PLY scalar type (both spellings of the format).
_PLY_TYPE_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
                   "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def check_ply(path, field: Optional[str] = None) -> int:
    """Check a PLY file's header against the file, reading the header only (start-up; also the first step of
    :func:`read_ply`); returns the number of vertices it declares.

    A :class:`DataValidationError` names the file and ``field`` when the file is missing, a folder, unreadable, not a
    PLY (no ``ply`` magic, no ``end_header``), has no ``vertex`` element with ``x``, ``y``, ``z``, or — binary
    files of fixed-size rows — is not exactly as long as its header declares (a cut body, or a wrong vertex count).
    """
    from evolsplat_ns.errors import DataValidationError, error_text

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DataValidationError(path, field, "a readable PLY file", error_text(e)) from None
    if not head.startswith(b"ply"):
        raise DataValidationError(path, field, "a PLY file (starting with 'ply')",
                                  f"a file starting with {head[:12]!r}" if head else "an empty file")
    end = head.find(b"end_header")
    if end < 0:
        raise DataValidationError(path, field, "a PLY header ending with 'end_header'", "none in the first 64 KiB")
    nl = head.find(b"\n", end)
    header_bytes = nl + 1 if nl >= 0 else len(head)
    fmt, elements = "", []  # [(name, count, row bytes or None when a property is a list)]
    for line in head[:end].decode("ascii", errors="replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "format":
            fmt = words[1]
        elif len(words) == 3 and words[0] == "element":
            elements.append([words[1], int(words[2]) if words[2].isdigit() else -1, 0, []])
        elif len(words) >= 3 and words[0] == "property" and elements:
            el, nbytes = elements[-1], _PLY_TYPE_SIZES.get(words[1])  # a list or an unknown type: no size check
            el[3].append(words[-1])
            el[2] = None if nbytes is None or el[2] is None else el[2] + nbytes
    vertex = next((el for el in elements if el[0] == "vertex"), None)
    xyz = "a PLY file whose 'vertex' element has a vertex count and properties x, y, z"
    if vertex is None:
        raise DataValidationError(path, field, xyz, "no vertex element")
    if vertex[1] < 0 or not all(k in vertex[3] for k in ("x", "y", "z")):
        raise DataValidationError(path, field, xyz, f"'element vertex' with properties {vertex[3]}")
    count = vertex[1]
    if fmt.startswith("binary") and all(el[2] for el in elements):
        expected = header_bytes + sum(el[1] * el[2] for el in elements)
        if size != expected:
            raise DataValidationError(
                path, field, f"{expected} bytes as its header declares ({count} vertices of {vertex[2]} bytes after "
                f"a {header_bytes}-byte header)", f"{size} bytes (a cut file, or a header with the wrong vertex count)")
    return count


def read_ply(path, points_dtype=np.float32, field: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``(points [N, 3], colours [N, 3] float32 in [0, 1])``; grey 0.5 when the file has no colour. Points
    come as ``points_dtype``: float64 keeps world coordinates far from the origin exact (UTM: 5e6 m, where float32
    rounds to 0.5 m).

    Strict: the header is checked against the file first (:func:`check_ply`) and exactly the vertices it declares
    are returned; anything else is a :class:`DataValidationError` naming the file (never zeros or fewer points)."""
    from evolsplat_ns.errors import DataValidationError, error_text

    path = Path(path)
    count = check_ply(path, field)
    try:  # plyfile: it reads every PLY we write in ~50 ms for 600 k points (open3d's reader pads a cut file with zeros)
        pts, cols = _read_plyfile(path, points_dtype)
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file
        raise DataValidationError(path, field, f"a readable PLY file ({count} vertices as its header declares)",
                                  error_text(e)) from None
    if len(pts) != count:
        raise DataValidationError(path, field, f"{count} vertices as its header declares", f"{len(pts)} read")
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
