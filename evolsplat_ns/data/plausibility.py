"""Plausibility of input values, not only their presence: intrinsics, image bit depth, depth units, image size,
timestamps against the poses.

Each check is cheap and runs before long work (the dataparser's start-up pass) or when a file is decoded; a value
that cannot be right is a one-line :class:`DataValidationError` naming the file, the field, the value and what was
expected, with what the value suggests (e.g. "a focal length in normalised units?").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.errors import DataValidationError

logger = logging.getLogger(__name__)

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
    _warn_transparency(im, path)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


_TRANSPARENCY_WARNED: set = set()


def _warn_transparency(im, path: Optional[Path]) -> None:
    """Alpha is dropped when an image is read: transparent pixels are read as whatever RGB they hold (often
    black). One warning per folder of images that have transparent pixels."""
    if not ("A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)):
        return
    alpha = np.asarray(im.convert("RGBA").getchannel("A") if im.mode == "P" else im.getchannel("A"))
    frac = float(np.mean(alpha < 255)) if alpha.size else 0.0
    folder = str(Path(path).parent) if path is not None else None
    if frac > 0 and folder not in _TRANSPARENCY_WARNED:
        _TRANSPARENCY_WARNED.add(folder)
        logger.warning("%s: %.1f%% of its pixels are transparent (alpha < 255); alpha is ignored, so they are read as "
                       "the RGB values they hold (often black) and supervise the model as such: flatten or crop the "
                       "images (further images of %s with transparency are not reported)", path, 100 * frac, folder)


#: Colour masks: a pixel whose channels differ by more than this is coloured; a mask with more than
#: SKY_MASK_COLOURED_FRACTION of such pixels is a colour image (a colour-coded segmentation), not a mask.
SKY_MASK_CHANNEL_SPREAD = 32
SKY_MASK_COLOURED_FRACTION = 0.01


def read_sky_mask(path: Path, convention: Optional[str] = None, field: str = "sky_mask_path") -> np.ndarray:
    """``[H, W]`` uint8 of a sky mask (colour masks are read as their luminance). A colour image (channels that
    differ: a colour-coded segmentation) is an error; under a binary ``convention`` (``255_is_sky`` /
    ``0_is_sky``) so is a mask that is not blank but has no value >= 128 (a 0/1 mask, or a label map), which would
    read as no sky at all (or all sky). A file that cannot be decoded is named too."""
    from PIL import Image

    from evolsplat_ns.data.records import SKY_0_IS_SKY, SKY_255_IS_SKY
    from evolsplat_ns.errors import error_text

    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
                spread = rgb.max(axis=-1) - rgb.min(axis=-1)
                coloured = spread > SKY_MASK_CHANNEL_SPREAD
                if coloured.mean() > SKY_MASK_COLOURED_FRACTION:
                    example = tuple(int(v) for v in rgb[np.unravel_index(np.argmax(spread), spread.shape)])
                    raise DataValidationError(path, field, "a greyscale sky mask (one channel, 255 = sky unless "
                                              "sky_mask_convention says otherwise)", f"a colour image ({im.mode}, "
                                              f"{100 * coloured.mean():.0f}% of its pixels coloured, e.g. RGB "
                                              f"{example}): a colour-coded segmentation?")
            mask = np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except DataValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable, cut or corrupt (OSError, ValueError, SyntaxError, ...)
        raise DataValidationError(path, field, "a readable image (a sky mask)", error_text(e)) from None
    if convention in (SKY_255_IS_SKY, SKY_0_IS_SKY):
        top = int(mask.max(initial=0))
        if 0 < top < 128:
            values = np.unique(mask)
            shown = ", ".join(str(int(v)) for v in values[:6]) + (" ..." if len(values) > 6 else "")
            raise DataValidationError(path, field, f"a binary mask of 0 and 255 ({convention}: values >= 128 are "
                                      f"{'sky' if convention == SKY_255_IS_SKY else 'not sky'})",
                                      f"values {shown} only, none >= 128 (a 0/1 mask, or a label map? it would read "
                                      f"as {'no' if convention == SKY_255_IS_SKY else 'all'} sky)")
    return mask


def check_depth_png_mode(im, path: Optional[Path]) -> None:
    """A depth PNG holds 16-bit millimetres: an 8-bit one cannot (255 mm at most)."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        raise DataValidationError(path, "depth_file_path", "a 16-bit PNG in millimetres (or a float .npy in metres)",
                                  f"an image of mode {im.mode} ({'8-bit' if im.mode in ('L', 'P', 'RGB', 'RGBA') else 'not 16-bit'})")


def check_depth_npy_dtype(d: np.ndarray, path: Optional[Path]) -> None:
    """A ``.npy`` depth map holds float metres."""
    if d.dtype.kind not in "f":
        hint = "millimetres stored as integers? divide by 1000 and save float" if d.dtype.kind in "iu" else \
            "a validity mask, not depth?" if d.dtype.kind == "b" else "not a depth map in metres"
        raise DataValidationError(path, "depth_file_path", "a float .npy in metres (or a 16-bit PNG in millimetres)",
                                  f"dtype {d.dtype} ({hint})")


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


# ------------------------------------------------------------------------------------------------ image size

SSIM_WINDOW = 11
"""The usual SSIM window, px (pytorch_msssim's and torchmetrics' default; published SSIM numbers use it)."""
MIN_IMAGE_SIDE = 3
"""Smallest image side, px, the loss and the metrics can use. The model shrinks the SSIM window to fit a small image
(:func:`ssim_window`, which the model's loss and metrics use) but not below 3 px: under it pytorch_msssim skips its
Gaussian filter (a warning at every step) or fails."""


def ssim_window(h: int, w: int) -> int:
    """The SSIM window the model uses for an ``h`` x ``w`` image: :data:`SSIM_WINDOW` unless the image is smaller,
    then the largest odd size that fits, at least 3."""
    win = SSIM_WINDOW
    while win > 3 and (win > h or win > w):
        win -= 2
    return win


def check_image_size(path: Optional[Path], field: str, w: int, h: int, downscale: float = 1.0,
                     native: Optional[tuple] = None) -> None:
    """An image of ``w`` x ``h`` px (after the configured ``downscale`` of its ``native`` size) must have at least
    :data:`MIN_IMAGE_SIDE` px on each side."""
    if min(w, h) >= MIN_IMAGE_SIDE:
        return
    how = ""
    if downscale != 1.0:
        how = f" after downscale {downscale:g}" + (f" of {native[0]}x{native[1]}" if native else "") + \
            " (a smaller downscale factor?)"
    raise DataValidationError(path, field, f"an image of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px (the smallest "
                              f"SSIM window; the usual SSIM needs {SSIM_WINDOW}x{SSIM_WINDOW})", f"{w}x{h} px{how}")


# ------------------------------------------------------------------------------------------------ timestamps

MAX_VEHICLE_SPEED_MPS = 70.0
"""Fastest plausible speed of a recording vehicle, m/s (252 km/h): above it, between two consecutive frames of one
camera, the timestamps or the poses are in another unit, or the frames are out of order."""
FRAME_INTERVAL_RANGE_S = (1e-3, 10.0)
"""Plausible median time between consecutive frames of one camera, seconds (1000 Hz .. one frame per 10 s)."""


def check_timestamps(path: Optional[Path], field_of: Callable[[int], str], times: Sequence[Optional[float]],
                     num_poses: int, what: str = "") -> None:
    """Timestamps (seconds) of one camera, in the frame order the data uses: one per pose, finite, strictly
    increasing. ``field_of(i)`` names frame ``i``'s entry in ``path`` (e.g. ``[3]``, ``line 4``); ``what`` says
    which camera. Errors name the file, the entry, the value and the frame."""
    have = [t for t in times if t is not None]
    if len(have) != num_poses or len(times) != num_poses:
        missing = [i for i, t in enumerate(times) if t is None]
        got = f"{len(have)}" + (f" (none for frames {missing[:5]}{' ...' if len(missing) > 5 else ''})" if missing
                                else "")
        raise DataValidationError(path, "timestamps", f"one timestamp per pose ({num_poses}{what})", got)
    prev: Optional[float] = None
    for i, t in enumerate(have):
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(float(t)):
            raise DataValidationError(path, field_of(i), f"a finite time in seconds (frame {i}{what})", repr(t))
        if prev is not None and not float(t) > prev:
            raise DataValidationError(path, field_of(i), f"timestamps strictly increasing in frame order (frame {i}"
                                      f"{what}: after frame {i - 1} at {prev!r} s)", f"{float(t)!r} s")
        prev = float(t)


def implausible_motion(times: Sequence[float], centers: np.ndarray) -> List[Tuple[int, float, float, float]]:
    """``(frame, speed m/s, distance m, interval s)`` of every frame whose move from the previous frame, over the
    time between their (strictly increasing) timestamps, is faster than :data:`MAX_VEHICLE_SPEED_MPS`."""
    t = np.asarray(times, dtype=np.float64)
    c = np.asarray(centers, dtype=np.float64).reshape(len(t), 3)
    dist = np.linalg.norm(np.diff(c, axis=0), axis=1)
    dt = np.diff(t)
    speed = dist / dt
    fast = np.flatnonzero(speed > MAX_VEHICLE_SPEED_MPS)
    return [(int(i) + 1, float(speed[i]), float(dist[i]), float(dt[i])) for i in fast]


def interval_hint(median_dt: float) -> Optional[str]:
    """What a median frame interval outside :data:`FRAME_INTERVAL_RANGE_S` suggests, or None when it is within."""
    lo, hi = FRAME_INTERVAL_RANGE_S
    if lo <= median_dt <= hi:
        return None
    if median_dt > hi:
        return "timestamps in milliseconds?" if median_dt <= 1e4 else \
            "timestamps in microseconds?" if median_dt <= 1e7 else "timestamps in nanoseconds?"
    return "timestamps in a unit larger than seconds, or frames repeated?"


_TIMESTAMP_FILES: Dict[str, Tuple[Callable[[Path], Path], Callable[[int], str]]] = {
    # layout: (the timestamps file of an image's camera, the entry of frame i in it), as the readers read them
    "pandaset": (lambda image: image.parent / "timestamps.json", lambda i: f"[{i}]"),
    "kitti-raw": (lambda image: image.parent.parent / "timestamps.txt", lambda i: f"line {i + 1}"),
}


def check_scene(scene, downscale: float = 1.0, check_files: bool = True) -> None:
    """Start-up plausibility of a parsed (and down-scaled) scene, any layout: every image at least
    :data:`MIN_IMAGE_SIDE` px on each side (error) and, below :data:`SSIM_WINDOW`, a warning that SSIM uses a smaller
    window; where the layout gives timestamps, per camera: one per pose, finite and strictly increasing
    (:func:`check_timestamps`, error), and a warning for a median frame interval outside
    :data:`FRAME_INTERVAL_RANGE_S` or a move faster than :data:`MAX_VEHICLE_SPEED_MPS` between consecutive frames."""
    seen = set()
    smallest = None
    for r in scene.images:
        key = (r.camera_id, r.width, r.height)
        if key in seen:
            continue
        seen.add(key)
        check_image_size(r.image_path, "image size", r.width, r.height, downscale, r.native_size)
        if smallest is None or min(r.width, r.height) < min(smallest.width, smallest.height):
            smallest = r
    if smallest is not None and min(smallest.width, smallest.height) < SSIM_WINDOW:
        win = ssim_window(smallest.height, smallest.width)
        logger.warning("scene %s: images of %dx%d px (%s%s) are smaller than the usual %d px SSIM window: the loss and "
                       "the SSIM metric use a %d px window, so SSIM values are not comparable with the usual SSIM",
                       scene.name, smallest.width, smallest.height, smallest.image_path.name,
                       f", downscale {downscale:g}" if downscale != 1.0 else "", SSIM_WINDOW, win)
    if check_files:  # masks of one camera come from one tool: its first mask (decoded) shows a wrong format now
        for cam in scene.camera_ids:
            first = next((r for r in scene.images if r.camera_id == cam and r.sky_mask_path is not None), None)
            if first is not None:
                read_sky_mask(first.sky_mask_path, scene.sky_mask_convention)
    _check_scene_timestamps(scene)


def _check_scene_timestamps(scene) -> None:
    stamps = scene.metadata.get("timestamps") if isinstance(scene.metadata, dict) else None
    if not stamps or all(v is None for v in stamps.values()):
        return
    file_of, field_of = _TIMESTAMP_FILES.get(str(scene.metadata.get("layout")),
                                              (lambda image: image, lambda i: f"timestamp of frame {i}"))
    names = scene.metadata.get("camera_name_by_id") or {}
    fast, slow = [], []
    for cam in scene.camera_ids:
        recs = [scene.image(t, cam) for t in range(scene.num_frames)]
        times = [stamps.get((t, cam)) for t in range(scene.num_frames)]
        if all(t is None for t in times):
            continue
        path = file_of(recs[0].image_path)
        what = f", camera {names.get(cam, cam)}"
        check_timestamps(path, field_of, times, len(recs), what)
        if len(times) < 2:
            continue
        median_dt = float(np.median(np.diff(np.asarray(times, dtype=np.float64))))
        hint = interval_hint(median_dt)
        if hint is not None:
            slow.append((path, median_dt, hint, names.get(cam, cam)))
        for frame, speed, dist, dt in implausible_motion(times, np.stack([r.c2w[:3, 3] for r in recs])):
            fast.append((speed, frame, dist, dt, path, recs[frame], names.get(cam, cam)))
    for path, median_dt, hint, name in slow[:1]:
        lo, hi = FRAME_INTERVAL_RANGE_S
        logger.warning("%s: median time between frames of camera %s is %.4g s; expected %g-%g s for a camera's frames "
                       "(%s)", path, name, median_dt, lo, hi, hint)
    if fast:
        speed, frame, dist, dt, path, rec, name = max(fast, key=lambda x: x[0])
        logger.warning("%s: frame %d (camera %s, %s): implied speed %.4g m/s (%.4g km/h), a move of %.3g m in %.3g s "
                       "after frame %d; expected at most %g m/s (%g km/h) for a vehicle: poses in another unit "
                       "(millimetres or centimetres, not metres?), timestamps of other frames, or frames out of order? "
                       "(%d frame pair(s) of %d camera(s) this fast)", path, frame, name, rec.image_path.name, speed,
                       speed * 3.6, dist, dt, frame - 1, MAX_VEHICLE_SPEED_MPS, MAX_VEHICLE_SPEED_MPS * 3.6, len(fast),
                       len({f[6] for f in fast}))
