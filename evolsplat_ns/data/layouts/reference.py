"""The reference's (EVolSplat's) preprocessed KITTI-360 / Waymo scenes.

::

    seq_00_nerfacto_0400_40/
      transforms.json        # fl_x fl_y cx cy w h (global), inv_pose, ply_file_path_{Drop25,Drop50,Drop80,full},
                             #   frames: [{file_path, transform_matrix}]
      3960_00.png 3960_01.png ...   # KITTI-360: {frame}_{camera:02d}.png (two cameras); Waymo: {frame:06d}.png
      depth/3960_00.npy ...  # metric z-depth (metres), sorted like the frames
      Drop50/400.ply ...     # seed clouds by sparsity, in the same (normalised) frame as the poses
      semantic/instance/<stem>.png # optional: Cityscapes train-id label map, 10 = sky (the reference's sky source)
      sky_masks/<image stem>.png   # optional (ours): 255 = sky; preferred when both exist

``transform_matrix`` is an OpenGL camera-to-world expressed relative to the middle image of the list (which is
the identity); ``inv_pose`` is the inverse of that image's original camera-to-world, so ``inv(inv_pose) @ M``
(with OpenCV axes) gives back the dataset's own world frame (kept in ``metadata["original_world_from_data"]``).
The data world frame of this project is the normalised one (that of the poses and the seed PLYs).

As the reference does, frames are ordered by file name and depth files are paired with the frames in sorted order
(by matching stem when the names match). Timesteps and cameras come from the names: ``{frame}_{camera}.png``
gives both; an all-digit stem is the timestep of a single camera; otherwise the position in the sorted list.
The reference's Drop50 protocol (even timesteps are inputs, odd ones tested) is the dataparser's
``eval_holdout`` (``odd`` = ``Drop50``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

from evolsplat_ns.cameras import intrinsics_matrix, opengl_to_opencv, rigid_inverse
from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.data.layouts.common import (
    LayoutOptions,
    RawImage,
    build_scene,
    check_camera_sizes,
    read_json,
    select_camera_ids,
)
from evolsplat_ns.data.records import SKY_255_IS_SKY, SKY_LABEL_10_IS_SKY, SceneRecord

logger = logging.getLogger(__name__)

NAME = "reference"
TRANSFORMS = "transforms.json"
_TWO = re.compile(r"^(\d+)_(\d+)$")
CAMERA_NAMES = {0: "image_00", 1: "image_01"}  # KITTI-360's two front cameras (left, right)


def _meta(d: Path) -> Optional[dict]:
    try:
        meta = json.loads((d / TRANSFORMS).read_text(encoding="utf-8-sig"))  # as read_text: a BOM is dropped
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_scene(d: Path) -> bool:
    """A ``transforms.json`` with the reference's markers (``inv_pose`` or ``ply_file_path_<sparsity>`` keys)."""
    if not (d / TRANSFORMS).exists():
        return False
    meta = _meta(d)
    return meta is not None and ("inv_pose" in meta or any(k.startswith("ply_file_path_") for k in meta))


def _labels(names: List[str]) -> List[tuple]:
    """(timestep, camera) per sorted file name; see the module docstring."""
    stems = [Path(n).stem for n in names]
    if all(_TWO.match(s) for s in stems):
        return [(int(_TWO.match(s).group(1)), int(_TWO.match(s).group(2))) for s in stems]  # type: ignore[union-attr]
    if all(s.isdigit() for s in stems):
        return [(int(s), 0) for s in stems]
    return [(i, 0) for i in range(len(stems))]


def parse(scene_dir: Path, scene_id: int, options: LayoutOptions) -> SceneRecord:
    from evolsplat_ns.data.dataparser import _number, _pose

    d = Path(scene_dir)
    tf = d / TRANSFORMS
    meta = read_json(tf, "the reference's transforms.json")
    if not isinstance(meta, dict):
        raise DataValidationError(tf, None, "a JSON object at the top level", type(meta).__name__)
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DataValidationError(tf, "frames", "a non-empty list of frames", repr(frames)[:60])
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or not isinstance(fr.get("file_path"), str) or "transform_matrix" not in fr:
            raise DataValidationError(tf, f"frames[{i}]", "an object with file_path (a path relative to the scene "
                                      "folder) and transform_matrix", repr(fr)[:60])
    order = sorted(range(len(frames)), key=lambda i: str(Path(frames[i]["file_path"])))  # the reference's order
    frames = [frames[i] for i in order]
    labels = _labels([fr["file_path"] for fr in frames])
    all_cams = sorted({c for _, c in labels})
    names = {c: CAMERA_NAMES.get(c, f"camera_{c}") if len(all_cams) > 1 else "front" for c in all_cams}
    cams = select_camera_ids(options.cameras, names, tf)
    # depth: depth/*.npy, by stem when the names match, else by position in sorted order (the reference's rule)
    depth_dir = d / "depth"
    depths: List[Optional[Path]] = [None] * len(frames)
    if depth_dir.is_dir() and options.depth_source in ("auto", "files"):
        files = sorted(depth_dir.glob("*.npy"), key=lambda p: p.name)
        by_stem = {p.stem: p for p in files}
        stems = [Path(fr["file_path"]).stem for fr in frames]
        if files and all(s in by_stem for s in stems):
            depths = [by_stem[s] for s in stems]
        elif files:
            if len(files) != len(frames):
                raise DataValidationError(depth_dir, None, f"one depth .npy per frame ({len(frames)}, paired with the "
                                          f"frames in sorted order)", f"{len(files)} files")
            depths = list(files)
    raws: List[RawImage] = []
    for i, (fr, (ts, cam)) in enumerate(zip(frames, labels)):
        if cam not in cams:
            continue
        where = f"frames[{order[i]}]"
        intr = {}
        for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
            v = fr.get(k, meta.get(k))
            if v is None:
                raise DataValidationError(tf, f"{where}.{k}", f"intrinsic '{k}' at the top level (or in the frame)")
            intr[k] = _number(tf, k, v)
        c2w_gl = _pose(tf, f"{where}.transform_matrix", fr["transform_matrix"])
        stem = Path(fr["file_path"]).stem
        sky = d / "sky_masks" / f"{stem}.png"
        if not sky.exists() and (d / "semantic" / "instance" / f"{stem}.png").exists():
            sky = d / "semantic" / "instance" / f"{stem}.png"  # the reference's Cityscapes train ids, 10 = sky
        raws.append(RawImage(timestep=ts, camera_id=cam, image_path=d / fr["file_path"],
                             c2w_world=opengl_to_opencv(c2w_gl),
                             K=intrinsics_matrix(intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"]),
                             width=int(round(intr["w"])), height=int(round(intr["h"])), depth_path=depths[i],
                             sky_mask_path=sky if sky.exists() else None))
    check_camera_sizes(raws, options.check_files)
    # seed cloud by sparsity; the reference names all four keys even when only some clouds were generated
    ply = None
    for key in (f"ply_file_path_{options.seed_ply}", "ply_file_path"):
        if isinstance(meta.get(key), str) and (d / meta[key]).exists():
            ply = d / meta[key]
            if options.check_files:
                from evolsplat_ns.pointcloud.plyio import check_ply

                check_ply(ply, key)  # header against the file size: a cut or lying PLY is named now
            break
    if ply is None and any(k.startswith("ply_file_path") for k in meta):
        logger.warning("scene %s: no seed PLY on disk for ply_file_path_%s or ply_file_path", d.name, options.seed_ply)
    extra: Dict[str, object] = {"transforms": str(tf)}
    if "inv_pose" in meta:
        inv_pose = _pose(tf, "inv_pose", meta["inv_pose"])
        extra["inv_pose"] = inv_pose
        extra["original_world_from_data"] = rigid_inverse(inv_pose)
    kinds = {r.sky_mask_path.parent.name for r in raws if r.sky_mask_path is not None}
    if len(kinds) > 1:
        raise DataValidationError(d, "sky masks", "one kind of sky mask per scene (sky_masks/ or semantic/instance/)",
                                  sorted(kinds))
    convention = SKY_LABEL_10_IS_SKY if kinds == {"instance"} else SKY_255_IS_SKY
    return build_scene(d, scene_id, raws, names, front_camera_id=0, layout=NAME, seed_ply_path=ply, metadata=extra,
                       source_file=tf, sky_mask_convention=convention)
