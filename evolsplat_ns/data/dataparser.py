"""The ``evolsplat-multiscene`` dataparser: a folder of scenes -> validated :class:`SceneRecord` objects.

Reads the multi-scene root format (``docs/DATA_FORMAT.md``): one sub-folder per scene, each with a
nerfstudio-style ``transforms.json``, or a single scene folder. Everything is validated up front (files exist,
fields are present and well-formed, images of one camera share a size, depth maps and sky masks match their
image) so that a bad file is reported in seconds, naming the file and the field.

Poses are converted exactly once from OpenGL to OpenCV (:mod:`evolsplat_ns.cameras`) and re-expressed relative
to the first front-camera image; nothing is rescaled (poses stay metric).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.cameras import intrinsics_matrix, opengl_to_opencv, rigid_inverse
from evolsplat_ns.data.depth_check import NON_FINITE_DEPTH_KEY
from evolsplat_ns.data.plausibility import check_intrinsics
from evolsplat_ns.errors import DataValidationError, error_text, missing_text
from evolsplat_ns.data.records import SKY_0_IS_SKY, SKY_255_IS_SKY, ImageRecord, SceneRecord

logger = logging.getLogger(__name__)

TRANSFORMS = "transforms.json"
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
#: nerfstudio's ``camera_model`` values of a perspective (pinhole) projection; the rest (OPENCV_FISHEYE,
#: EQUIRECTANGULAR, ...) cannot be rendered by a pinhole rasteriser.
PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
#: nerfstudio's distortion keys: read, never applied (the images must be undistorted).
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2", "distortion_params")


def find_scene_dirs(root: Path) -> List[Path]:
    """Scene folders of a data root: the root itself if it holds ``transforms.json``, else its sub-folders that do.

    Raises :class:`DataValidationError` for a missing or empty root.
    """
    root = Path(root)
    if not root.exists():
        raise DataValidationError(root, None, "an existing data folder (a multi-scene root or a scene folder)")
    if not root.is_dir():
        raise not_a_folder(root)
    if (root / TRANSFORMS).exists():
        return [root]
    entries = list_folder(root)
    subdirs = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    check_transforms_links([root] + subdirs)
    scenes = [p for p in subdirs if (p / TRANSFORMS).exists()]
    if not scenes:
        raise no_scenes(root, entries, subdirs, f"scene sub-folders each holding {TRANSFORMS}",
                        lambda d: (d / TRANSFORMS).exists())
    missing = [p.name for p in subdirs if not (p / TRANSFORMS).exists()]
    if missing:
        logger.warning("Ignoring %d folders of %s without %s: %s", len(missing), root, TRANSFORMS, ", ".join(missing))
    return scenes


def not_a_folder(root: Path) -> DataValidationError:
    """The error for a data root that is a file (``transforms.json`` itself, say): names the folder to pass."""
    hint = f" (pass the folder holding it: {root.parent})" if root.name == TRANSFORMS else ""
    return DataValidationError(root, None, "a folder (a scene folder or a folder of scenes)", f"a file{hint}")


def check_transforms_links(folders: List[Path]) -> None:
    """A ``transforms.json`` that is a broken symbolic link (or a loop) is named, rather than its scene being taken
    for a folder without one."""
    for d in folders:
        link = d / TRANSFORMS
        if link.is_symlink() and not link.exists():
            raise DataValidationError(link, None, "the scene's transforms.json (a readable file)", missing_text(link))


def no_scenes(root: Path, entries: List[Path], subdirs: List[Path], what: str, is_scene) -> DataValidationError:
    """The error for a data root without scenes, saying what it holds instead: scene folders one level down (the
    folder above the data root) or files (a scene's ``images/``); ``is_scene(folder)`` recognises a scene folder."""
    if subdirs:
        got = f"{len(subdirs)} folders without one"
        for d in subdirs:
            try:
                inner = [q for q in d.iterdir() if q.is_dir() and not q.name.startswith(".")]
            except OSError:
                continue
            if any(is_scene(q) for q in inner):
                got += f" ({d.name} holds scene folders: pass --data {d})"
                break
        return DataValidationError(root, None, what, got)
    files = [p for p in entries if not p.is_dir()]
    if not files:
        return DataValidationError(root, None, what, "an empty folder")
    got = f"a folder of {len(files)} files and no scene folders"
    if is_scene(root.parent):
        got += f" (a folder inside the scene {root.parent.name}? pass --data {root.parent}, or its parent)"
    return DataValidationError(root, None, what, got)


def list_folder(folder: Path, field: Optional[str] = None) -> List[Path]:
    """The entries of a user's folder; a folder that cannot be listed (permissions, I/O) is a
    :class:`DataValidationError` naming it."""
    try:
        return list(Path(folder).iterdir())
    except OSError as e:
        raise DataValidationError(folder, field, "a readable folder", error_text(e)) from None


#: The last chunk of every complete PNG file (length 0, type IEND, its CRC).
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _check_png_complete(path: Path, where: str) -> None:
    """A PNG ends with its IEND chunk: a file cut anywhere in its pixel data does not (its last 64 bytes read, no
    decoding)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as e:
        raise DataValidationError(path, where, "a readable PNG file", error_text(e)) from None
    if _PNG_END not in tail:
        raise DataValidationError(path, where, "a complete PNG file (ending with its IEND chunk)",
                                  f"a truncated file ({size} bytes)")


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise DataValidationError(path, where, "a finite number", repr(value))
    return float(value)


def _pose(path: Path, where: str, value: Any) -> np.ndarray:
    try:
        T = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataValidationError(path, where, "a 4x4 matrix of numbers", repr(value)[:80]) from None
    if T.shape == (3, 4):
        T = np.concatenate([T, [[0.0, 0.0, 0.0, 1.0]]], axis=0)
    if T.shape != (4, 4):
        raise DataValidationError(path, where, "a 4x4 (or 3x4) matrix", f"shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise DataValidationError(path, where, "finite values", "NaN or inf")
    R = T[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-3) or abs(np.linalg.det(R) - 1.0) > 1e-3:
        norms = np.linalg.norm(R, axis=0)
        det = float(np.linalg.det(R))
        hint = " (a scaled pose: divide the rotation by its scale, and poses stay in metres)" if \
            np.allclose(norms, norms[0], rtol=1e-3) and abs(norms[0] - 1.0) > 1e-3 and det > 0 else \
            " (a mirror: a left-handed frame?)" if np.allclose(norms, 1.0, atol=1e-3) and det < 0 else ""
        raise DataValidationError(path, where, "a rigid camera-to-world transform (orthonormal rotation, det +1)",
                                  f"rotation columns of length {', '.join(f'{n:.4g}' for n in norms)}, "
                                  f"det {det:.4g}{hint}")
    if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-6):
        raise DataValidationError(path, where, "last row [0, 0, 0, 1]", T[3].tolist())
    return T


def _image_size(path: Path, where: str, complete: bool = False, what: str = "image",
                readable: Optional[str] = None) -> Tuple[int, int]:
    """(w, h) from the image header (nothing decoded); with ``complete`` a PNG must also end with its IEND chunk.
    ``what`` the file is ("image", "sky mask", "depth map") and ``readable`` what a file PIL cannot identify should
    have been, for the messages."""
    from PIL import Image, UnidentifiedImageError

    art = "an" if what[0] in "aeiou" else "a"
    if not path.exists():
        raise DataValidationError(path, where, f"an existing {what} file", missing_text(path))
    if path.is_dir():
        raise DataValidationError(path, where, f"{art} {what} file", "a folder")
    try:
        with Image.open(path) as im:  # reads the header only
            size, fmt = im.size, im.format  # (w, h)
    except UnidentifiedImageError:
        raise DataValidationError(path, where, readable or f"a readable {what} (in a format PIL reads)",
                                  not_an_image(path)) from None
    except Image.DecompressionBombError as e:  # a header declaring a gigantic image (a corrupt or hostile file)
        declared = str(e).split("(")[1].split(")")[0] if "(" in str(e) else str(e)
        raise DataValidationError(path, where, f"{art} {what} of at most {2 * Image.MAX_IMAGE_PIXELS} pixels (PIL's "
                                  "decompression-bomb limit)", f"a header declaring {declared} in a file of "
                                  f"{path.stat().st_size} bytes (a corrupt file?)") from None
    except OSError as e:
        raise DataValidationError(path, where, f"a readable {what}", error_text(e)) from None
    if complete and fmt == "PNG":
        _check_png_complete(path, where)
    return size


def not_an_image(path: Path) -> str:
    """The 'got' part for a file PIL does not recognise: its size and first bytes (text shows as text)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as e:
        return error_text(e)
    return f"a file of {size} bytes that is not an image (starting with {head!r})" if size else "an empty file"


_DEPTH_FILE = "a depth map: a .npy array in metres, or a 16-bit PNG in millimetres"


def _depth_shape(path: Path, where: str) -> Tuple[int, int]:
    if not path.exists():
        raise DataValidationError(path, where, "an existing depth file (.npy metres or 16-bit .png millimetres)",
                                  missing_text(path))
    if path.is_dir():
        raise DataValidationError(path, where, "a depth file (.npy metres or 16-bit .png millimetres)", "a folder")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except OSError as e:
            raise DataValidationError(path, where, "a readable .npy array", error_text(e)) from None
        except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file
            raise DataValidationError(path, where, "a readable .npy array", type(e).__name__) from None
        shape = arr.shape
        if len(shape) == 3 and shape[-1] == 1:
            shape = shape[:2]
        if len(shape) != 2:
            raise DataValidationError(path, where, "a depth map of shape [H, W]", f"shape {arr.shape}")
        return (shape[1], shape[0])
    return _image_size(path, where, complete=True, what="depth map", readable=_DEPTH_FILE)


def _check_depth_file(path: Path, where: str, non_finite: str) -> None:
    from evolsplat_ns.data.depth_check import check_depth_values
    from evolsplat_ns.data.views import read_depth

    from evolsplat_ns.data.plausibility import check_depth_unit

    # raises DataValidationError naming the file, the field and (NaN / inf) the fraction of bad pixels; then the
    # unit (median depth) and, in read_depth, the bit depth / dtype
    d = check_depth_values(read_depth(path, check_values=False), path, where, non_finite)  # type: ignore[arg-type]
    check_depth_unit(d, path, "npy" if path.suffix == ".npy" else "png")


def _check_camera_model(tf_path: Path, meta: dict, frames: list) -> None:
    """A pinhole ``camera_model`` (error otherwise: a fisheye image rendered as a pinhole one is wrong everywhere);
    non-zero distortion coefficients are not applied (one warning naming them: undistort the images first)."""
    where_model = [("camera_model", meta.get("camera_model"))] + [
        (f"frames[{i}].camera_model", f.get("camera_model")) for i, f in enumerate(frames) if isinstance(f, dict)]
    for field_name, model in where_model:
        if model is not None and (not isinstance(model, str) or model.upper() not in PINHOLE_MODELS):
            raise DataValidationError(tf_path, field_name, f"a pinhole camera model ({', '.join(PINHOLE_MODELS)}; "
                                      "images undistorted to pinhole)", f"{model!r} (not supported: undistort the "
                                      "images to a pinhole camera first)")
    found = []
    for prefix, d in [("", meta)] + [(f"frames[{i}].", f) for i, f in enumerate(frames) if isinstance(f, dict)]:
        for k in DISTORTION_KEYS:
            v = d.get(k)
            vals = v if isinstance(v, list) else [v]
            if v is not None and any(not isinstance(x, (int, float)) or x != 0 for x in vals):
                found.append(f"{prefix}{k}={v!r}")
    if found:
        logger.warning("%s: distortion %s%s is not applied (the model projects with a pinhole camera): undistort the "
                       "images (and drop the coefficients) or geometry is off towards the image borders", tf_path,
                       ", ".join(found[:4]), f" (and {len(found) - 4} more)" if len(found) > 4 else "")


def parse_scene(scene_dir: Path, scene_id: int, check_files: bool = True, check_depth_values: bool = True,
                non_finite_depth: str = "error") -> SceneRecord:
    """Parse and validate one scene folder into a :class:`SceneRecord` (project frame, OpenCV).

    With ``check_files`` every referenced file is checked (headers: existence, type, size); with
    ``check_depth_values`` too, every depth map is also read once and its values checked (all zero, NaN / inf:
    :mod:`evolsplat_ns.data.depth_check`; ``non_finite_depth`` is the NaN / inf policy, kept in the record).
    """
    from evolsplat_ns.data.layouts.common import read_json

    tf_path = scene_dir / TRANSFORMS
    if not tf_path.exists():
        raise DataValidationError(tf_path, None, "a transforms.json file", "missing file")
    meta = read_json(tf_path, "the scene's transforms.json")
    if not isinstance(meta, dict):
        raise DataValidationError(tf_path, None, "a JSON object at the top level", type(meta).__name__)
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DataValidationError(tf_path, "frames", "a non-empty list of frames", repr(frames)[:60])

    convention = meta.get("sky_mask_convention", SKY_255_IS_SKY)
    if convention not in (SKY_255_IS_SKY, SKY_0_IS_SKY):
        raise DataValidationError(tf_path, "sky_mask_convention", f"'{SKY_255_IS_SKY}' or '{SKY_0_IS_SKY}'", convention)

    _check_camera_model(tf_path, meta, frames)
    n_cams_declared = len({repr(f.get("camera", 0)) for f in frames if isinstance(f, dict)})
    parsed = []
    seen_paths: Dict[str, int] = {}
    for i, fr in enumerate(frames):
        where = f"frames[{i}]"
        if not isinstance(fr, dict):
            raise DataValidationError(tf_path, where, "an object", type(fr).__name__)
        if "file_path" not in fr:
            raise DataValidationError(tf_path, f"{where}.file_path", "an image path relative to the scene folder")
        for k in ("file_path", "depth_file_path", "sky_mask_path"):  # optional ones may be absent, null or ""
            if (k == "file_path" or fr.get(k)) and not (isinstance(fr.get(k), str) and fr.get(k)):
                raise DataValidationError(tf_path, f"{where}.{k}", "a file path (a string) relative to the scene "
                                          "folder", repr(fr.get(k))[:60])
        key = os.path.normpath(fr["file_path"])
        if key in seen_paths:  # one image, two poses (or timesteps): at most one can be right
            raise DataValidationError(tf_path, f"{where}.file_path", "each image in one frame only",
                                      f"{fr['file_path']!r} again (also frames[{seen_paths[key]}].file_path)")
        seen_paths[key] = i
        if "transform_matrix" not in fr:
            raise DataValidationError(tf_path, f"{where}.transform_matrix", "a 4x4 OpenGL camera-to-world matrix")
        intr = {}
        for k in _INTRINSIC_KEYS:
            v = fr.get(k, meta.get(k))
            if v is None:
                raise DataValidationError(tf_path, f"{where}.{k}", f"intrinsic '{k}' in the frame or at the top level")
            intr[k] = _number(tf_path, f"{where}.{k}" if k in fr else k, v)
        if intr["fl_x"] <= 0 or intr["fl_y"] <= 0 or intr["w"] < 1 or intr["h"] < 1:
            raise DataValidationError(tf_path, f"{where}.fl_x/fl_y/w/h", "positive focal lengths and image size")
        check_intrinsics(tf_path, where, intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"], intr["w"], intr["h"])
        cam = fr.get("camera", 0)
        if isinstance(cam, bool) or not isinstance(cam, int) or cam < 0:
            raise DataValidationError(tf_path, f"{where}.camera", "a non-negative integer camera id", repr(cam))
        if "timestep" in fr:
            ts = fr["timestep"]
            if isinstance(ts, bool) or not isinstance(ts, int):
                raise DataValidationError(tf_path, f"{where}.timestep", "an integer", repr(ts))
        elif n_cams_declared == 1:
            ts = i
        else:
            raise DataValidationError(tf_path, f"{where}.timestep", "an integer timestep (required with several cameras)")
        c2w_gl = _pose(tf_path, f"{where}.transform_matrix", fr["transform_matrix"])
        parsed.append((ts, cam, fr, intr, c2w_gl, where))

    timesteps = sorted({p[0] for p in parsed})
    camera_ids = sorted({p[1] for p in parsed})
    grid: Dict[Tuple[int, int], tuple] = {}
    for p in parsed:
        key = (p[0], p[1])
        if key in grid:
            raise DataValidationError(tf_path, f"{p[5]}", f"one image per (timestep, camera); duplicate of {grid[key][5]}")
        grid[key] = p
    for ts in timesteps:
        for cam in camera_ids:
            if (ts, cam) not in grid:
                raise DataValidationError(
                    tf_path, "frames", f"an image for every camera at every timestep", f"none for camera {cam} at timestep {ts}"
                )
    front = 0 if 0 in camera_ids else camera_ids[0]
    first_front = grid[(timesteps[0], front)]
    align = rigid_inverse(opengl_to_opencv(first_front[4]))  # data world -> project frame

    images: List[ImageRecord] = []
    cam_sizes: Dict[int, Tuple[int, int, str]] = {}
    for t_idx, ts in enumerate(timesteps):
        for cam in camera_ids:
            _, _, fr, intr, c2w_gl, where = grid[(ts, cam)]
            img_path = scene_dir / fr["file_path"]
            w, h = int(round(intr["w"])), int(round(intr["h"]))
            if check_files:
                size = _image_size(img_path, f"{where}.file_path (in {tf_path})")
                if size != (w, h):
                    raise DataValidationError(img_path, f"{where}.w/h", f"an image of {w}x{h} (from {TRANSFORMS})", f"{size[0]}x{size[1]}")
                if cam in cam_sizes and cam_sizes[cam][:2] != size:
                    raise DataValidationError(
                        img_path, f"{where}", f"images of camera {cam} all of one size ({cam_sizes[cam][0]}x{cam_sizes[cam][1]}, as {cam_sizes[cam][2]})", f"{size[0]}x{size[1]}"
                    )
                cam_sizes.setdefault(cam, (size[0], size[1], str(img_path)))
            depth_path = scene_dir / fr["depth_file_path"] if fr.get("depth_file_path") else None
            sky_path = scene_dir / fr["sky_mask_path"] if fr.get("sky_mask_path") else None
            if check_files and depth_path is not None:
                dsize = _depth_shape(depth_path, f"{where}.depth_file_path")
                if dsize != (w, h):
                    raise DataValidationError(depth_path, f"{where}.depth_file_path", f"a depth map of {h}x{w} (H x W) like its image", f"{dsize[1]}x{dsize[0]}")
                if check_depth_values:
                    _check_depth_file(depth_path, f"{where}.depth_file_path", non_finite_depth)
            if check_files and sky_path is not None:
                ssize = _image_size(sky_path, f"{where}.sky_mask_path", complete=True, what="sky mask")
                if ssize != (w, h):
                    raise DataValidationError(sky_path, f"{where}.sky_mask_path", f"a mask of {w}x{h} like its image", f"{ssize[0]}x{ssize[1]}")
            c2w = align @ opengl_to_opencv(c2w_gl)
            images.append(
                ImageRecord(
                    image_path=img_path,
                    frame_index=t_idx,
                    camera_id=cam,
                    timestep=ts,
                    c2w=c2w,
                    K=intrinsics_matrix(intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"]),
                    width=w,
                    height=h,
                    depth_path=depth_path,
                    sky_mask_path=sky_path,
                )
            )
    ply = meta.get("ply_file_path")
    if ply and not isinstance(ply, str):
        raise DataValidationError(tf_path, "ply_file_path", "a PLY path (a string) relative to the scene folder",
                                  repr(ply)[:60])
    ply_path = scene_dir / ply if ply else None
    if check_files and ply_path is not None and not ply_path.exists():
        raise DataValidationError(tf_path, "ply_file_path", "an existing PLY file", f"missing {ply_path}")
    if check_files and ply_path is not None:
        from evolsplat_ns.pointcloud.plyio import check_ply

        if check_ply(ply_path, "ply_file_path") == 0:  # header against the file size: a cut or lying PLY is named now
            raise DataValidationError(ply_path, "ply_file_path", "a seed point cloud with at least one vertex",
                                      "0 vertices (an empty PLY; drop ply_file_path to go without one)")
    names = meta.get("camera_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataValidationError(tf_path, "camera_names", "a list of camera names indexed by camera id, e.g. "
                                  '["front", "front_left"]', repr(names)[:60])
    return SceneRecord(
        scene_id=scene_id,
        name=scene_dir.name,
        root=scene_dir,
        images=images,
        camera_ids=camera_ids,
        num_frames=len(timesteps),
        align=align,
        seed_ply_path=ply_path,
        sky_mask_convention=convention,
        front_camera_id=front,
        metadata={"camera_names": list(names) if isinstance(names, list) else None, "transforms": str(tf_path),
                  NON_FINITE_DEPTH_KEY: non_finite_depth},
    )


def load_scenes(root: Path, scene_ids: Optional[Sequence[int]] = None, check_files: bool = True,
                check_depth_values: bool = True, non_finite_depth: str = "error") -> List[SceneRecord]:
    """Parse the scenes of a data root. ``scene_ids`` (positions in the sorted scene list) restricts which."""
    dirs = find_scene_dirs(Path(root))
    ids = list(range(len(dirs))) if scene_ids is None else list(scene_ids)
    for i in ids:
        if not 0 <= i < len(dirs):
            raise DataValidationError(root, "scene ids", f"scene ids in [0, {len(dirs) - 1}] ({len(dirs)} scenes)", i)
    return [parse_scene(dirs[i], i, check_files=check_files, check_depth_values=check_depth_values,
                        non_finite_depth=non_finite_depth) for i in ids]


def split_scene_ids(
    num_scenes: int, train_scene_ids: Optional[Sequence[int]], eval_scene_ids: Optional[Sequence[int]], root: Path
) -> Tuple[List[int], List[int]]:
    """Train/eval scene ids. Default: the last scene is held out for evaluation (all scenes train if only one)."""
    def check(ids: Sequence[int], name: str) -> List[int]:
        out = []
        for i in ids:
            if not 0 <= int(i) < num_scenes:
                raise DataValidationError(root, name, f"scene ids in [0, {num_scenes - 1}] ({num_scenes} scenes found)", int(i))
            out.append(int(i))
        return out

    if eval_scene_ids is None:
        ev = [num_scenes - 1] if num_scenes > 1 else []
    else:
        ev = check(eval_scene_ids, "eval_scene_ids")
    if train_scene_ids is None:
        tr = [i for i in range(num_scenes) if i not in ev] or list(range(num_scenes))
    else:
        tr = check(train_scene_ids, "train_scene_ids")
    if not tr:
        raise DataValidationError(root, "train_scene_ids", "at least one training scene")
    return tr, ev
