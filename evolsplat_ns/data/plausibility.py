"""Plausibility of input values, not only their presence: intrinsics, image bit depth, depth units.

Each check is cheap and runs before long work (the dataparser's start-up pass) or when a file is decoded; a value
that cannot be right is a one-line :class:`DataValidationError` naming the file, the field, the value and what was
expected, with what the value suggests (e.g. "a focal length in normalised units?").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from evolsplat_ns.errors import DataValidationError

FOV_RANGE_DEG = (2.0, 160.0)
"""Field of view a pinhole camera of a driving rig can have (per axis)."""
PRINCIPAL_POINT_RANGE = (0.05, 0.95)
"""Where the principal point may lie, as a fraction of the image size (per axis)."""
DEPTH_MEDIAN_RANGE_M = (0.1, 2000.0)
"""Median of a depth map's positive values, metres, for street scenes: outside it the unit is wrong."""


def check_intrinsics(path: Optional[Path], field: str, fx: float, fy: float, cx: float, cy: float, w: float,
                     h: float) -> None:
    """Focal lengths and principal point of a ``w`` x ``h`` pinhole camera, in pixels: each axis' field of view
    within :data:`FOV_RANGE_DEG`, the principal point within :data:`PRINCIPAL_POINT_RANGE` of the image (cropped
    images move it off centre, never to the border)."""
    for name, f, size in (("fl_x", fx, w), ("fl_y", fy, h)):
        fov = math.degrees(2.0 * math.atan(0.5 * size / f)) if f > 0 else 180.0
        if not FOV_RANGE_DEG[0] <= fov <= FOV_RANGE_DEG[1]:
            hint = " (a focal length in normalised units, not pixels?)" if f < 0.1 * size else \
                " (a focal length of another image size, or in another unit?)"
            raise DataValidationError(path, f"{field}.{name}", f"a focal length in pixels giving a field of view "
                                      f"within {FOV_RANGE_DEG[0]:g}-{FOV_RANGE_DEG[1]:g} degrees over {size:g} px",
                                      f"{f:g} px = {fov:.1f} degrees{hint}")
    lo, hi = PRINCIPAL_POINT_RANGE
    for name, c, size in (("cx", cx, w), ("cy", cy, h)):
        if not lo * size <= c <= hi * size:
            hint = " (normalised, not pixels?)" if 0.0 < c <= 1.0 else ""
            raise DataValidationError(path, f"{field}.{name}", f"a principal point inside the image, within "
                                      f"{lo * size:g}..{hi * size:g} px of its {size:g}", f"{c:g}{hint}")


def image_to_rgb8(im, path: Optional[Path]) -> np.ndarray:
    """``[H, W, 3]`` uint8 of a PIL image of any usual mode. 16-bit and 32-bit greyscale are scaled to 8 bits (PIL's
    own conversion clips them: a 16-bit image would read all white), greyscale is repeated over RGB, alpha and
    palettes are dropped by PIL's conversion."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "I" and a.max(initial=0) > 65535:
            raise DataValidationError(path, "file_path", "an 8- or 16-bit image", f"32-bit values up to {a.max():g}")
        g = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 1.0 + 1e-6:
            raise DataValidationError(path, "file_path", "a float image with values in [0, 1]",
                                      f"values in [{np.nanmin(a):g}, {np.nanmax(a):g}]")
        return np.repeat(np.round(a * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def check_depth_png_mode(im, path: Optional[Path]) -> None:
    """A depth PNG holds 16-bit millimetres: an 8-bit one cannot (255 mm at most)."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        raise DataValidationError(path, "depth_file_path", "a 16-bit PNG in millimetres (or a float .npy in metres)",
                                  f"an image of mode {im.mode} ({'8-bit' if im.mode in ('L', 'P', 'RGB', 'RGBA') else 'not 16-bit'})")


def check_depth_npy_dtype(d: np.ndarray, path: Optional[Path]) -> None:
    """A ``.npy`` depth map holds float metres."""
    if d.dtype.kind not in "f":
        raise DataValidationError(path, "depth_file_path", "a float .npy in metres (or a 16-bit PNG in millimetres)",
                                  f"dtype {d.dtype} (millimetres stored as integers? divide by 1000 and save float)")


def check_depth_unit(depth_m: np.ndarray, path: Optional[Path], source: str) -> None:
    """The median positive depth of a map read as metres must lie in :data:`DEPTH_MEDIAN_RANGE_M`; otherwise the
    file is in another unit, and the error says which one the value suggests."""
    pos = depth_m[depth_m > 0]
    if pos.size == 0:
        return  # all zero: check_depth_values reports it
    med = float(np.median(pos))
    lo, hi = DEPTH_MEDIAN_RANGE_M
    if lo <= med <= hi:
        return
    if source == "png":
        hint = "this 16-bit PNG looks like metres (or decimetres); depth PNGs hold millimetres" if med < lo else \
            "too far for millimetres"
    else:
        hint = "looks like millimetres or centimetres; .npy depth holds metres" if med > hi else \
            "looks like kilometres (or a normalised depth); .npy depth holds metres"
    raise DataValidationError(path, "depth_file_path", f"metric depth with a median positive value within "
                              f"{lo:g}-{hi:g} m", f"median {med:.4g} m as read ({hint})")
