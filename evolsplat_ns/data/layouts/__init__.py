"""Real-data layouts: each turns a recording's own folder layout into the project's :class:`SceneRecord` objects.

| layout | a scene folder holds | module |
|---|---|---|
| ``multiscene`` | ``transforms.json`` (ours; the default) | :mod:`evolsplat_ns.data.dataparser` |
| ``reference`` | ``transforms.json`` with ``inv_pose`` / ``ply_file_path_Drop50`` (EVolSplat's KITTI-360 / Waymo) | :mod:`.reference` |
| ``drivestudio`` | ``images/ intrinsics/ extrinsics/ [ego_pose/ lidar/ sky_masks/ depth/]`` | :mod:`.drivestudio` |
| ``pandaset`` | ``camera/<name>_camera/ lidar/`` (raw PandaSet) | :mod:`.pandaset` |
| ``kitti-raw`` | ``image_02/ image_03/ velodyne_points/ oxts/`` (+ the date folder's calib files) | :mod:`.kitti_raw` |

A data root is a scene folder of any layout, or a folder of such scene folders (sorted by name; scene ids are
positions in that list). ``layout="auto"`` recognises each scene by its files (:func:`detect_layout`).

Every layout yields metric OpenCV camera-to-world poses relative to the first front-camera image (conversions in
:mod:`evolsplat_ns.cameras` only); layouts with LiDAR install ``metadata["lidar_loader"]`` (the LiDAR point-cloud
generator) and, for images without a depth file, ``metadata["depth_provider"]`` (sparse LiDAR depth;
:mod:`.lidar`). Camera selection, down-scaling on load and the Drop-N hold-out apply to every layout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.data import plausibility
from evolsplat_ns.data.layouts import drivestudio, kitti_raw, pandaset, reference
from evolsplat_ns.data.layouts.common import (
    HOLDOUT_MODES,
    LAYOUT_NAMES,
    LayoutOptions,
    downscale_scene,
    protocol_input_frames,
    restrict_cameras,
)
from evolsplat_ns.data.records import SceneRecord

logger = logging.getLogger(__name__)

__all__ = ["LAYOUT_NAMES", "HOLDOUT_MODES", "LayoutOptions", "detect_layout", "find_layout_scenes",
           "load_layout_scenes", "protocol_input_frames"]


def _is_multiscene(d: Path) -> bool:
    return (d / "transforms.json").exists() and not reference.is_scene(d)


#: Detection order matters: the reference's transforms.json is recognised before ours.
DETECTORS: Dict[str, Callable[[Path], bool]] = {
    "reference": reference.is_scene,
    "multiscene": _is_multiscene,
    "kitti-raw": kitti_raw.is_scene,
    "pandaset": pandaset.is_scene,
    "drivestudio": drivestudio.is_scene,
}

PARSERS = {
    "reference": reference.parse,
    "drivestudio": drivestudio.parse,
    "pandaset": pandaset.parse,
    "kitti-raw": kitti_raw.parse,
}


def detect_layout(path: Path) -> Optional[str]:
    """The layout of a scene folder, or ``None`` if it is not a scene of any layout."""
    path = Path(path)
    if not path.is_dir():
        return None
    for name, test in DETECTORS.items():
        if test(path):
            return name
    return None


def find_layout_scenes(root: Path, layout: str = "auto") -> List[Tuple[Path, str]]:
    """``(scene folder, layout)`` of a data root: the root itself if it is a scene, else its sub-folders that are.

    ``layout`` other than ``auto`` accepts only scenes of that layout. Raises :class:`DataValidationError` for a
    missing root, or one without scenes (naming what each layout expects).
    """
    root = Path(root)
    if layout == "multiscene":
        from evolsplat_ns.data.dataparser import find_scene_dirs

        return [(d, "multiscene") for d in find_scene_dirs(root)]
    if layout != "auto" and layout not in PARSERS:
        raise DataValidationError(root, "layout", f"'auto' or one of {LAYOUT_NAMES}", layout)
    if not root.exists():
        raise DataValidationError(root, None, "an existing data folder (a scene folder or a folder of scenes)")
    if not root.is_dir():
        from evolsplat_ns.data.dataparser import not_a_folder

        raise not_a_folder(root)

    def kind(d: Path) -> Optional[str]:
        if layout == "auto":
            return detect_layout(d)
        return layout if DETECTORS[layout](d) else None

    from evolsplat_ns.data.dataparser import check_transforms_links, list_folder, no_scenes

    check_transforms_links([root])
    k = kind(root)
    if k is not None:
        return [(root, k)]
    entries = list_folder(root)
    subdirs = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    check_transforms_links(subdirs)
    scenes = [(p, kind(p)) for p in subdirs]
    found = [(p, k) for p, k in scenes if k is not None]
    if not found:
        what = ("scene sub-folders each holding transforms.json (multiscene / reference), images/ + intrinsics/ + "
                "extrinsics/ (drivestudio), camera/<name>_camera/ (pandaset) or image_02/data + oxts/data (kitti-raw)")
        if layout != "auto":
            what = f"scene sub-folders of the '{layout}' layout"
        # what the folder holds instead: scene folders one level down, or files (a scene's images/)
        raise no_scenes(root, entries, subdirs, what, lambda d: kind(d) is not None)
    skipped = [p.name for p, k in scenes if k is None]
    if skipped:
        logger.warning("Ignoring %d folders of %s that are no scene: %s", len(skipped), root, ", ".join(skipped))
    kinds = sorted({k for _, k in found})
    if len(kinds) > 1:
        logger.warning("Data root %s mixes layouts: %s", root, ", ".join(kinds))
    return found


def load_layout_scenes(
    root: Path,
    options: Optional[LayoutOptions] = None,
    scene_ids: Optional[Sequence[int]] = None,
    **multiscene_kwargs,
) -> List[SceneRecord]:
    """Parse (and validate) the scenes of a data root in any layout. ``multiscene_kwargs`` go to the multi-scene
    parser (``check_depth_values``, ``non_finite_depth``)."""
    from evolsplat_ns.data.dataparser import parse_scene

    opts = (options or LayoutOptions()).validate()
    if opts.data_root is None:
        from dataclasses import replace

        opts = replace(opts, data_root=Path(root))
    found = find_layout_scenes(root, opts.layout)
    ids = list(range(len(found))) if scene_ids is None else list(scene_ids)
    out = []
    for i in ids:
        if not 0 <= i < len(found):
            raise DataValidationError(root, "scene ids", f"scene ids in [0, {len(found) - 1}] ({len(found)} scenes)", i)
        d, kind = found[i]
        if kind == "multiscene":
            scene = parse_scene(d, i, check_files=opts.check_files, **multiscene_kwargs)
            scene.metadata.setdefault("layout", "multiscene")
            scene = restrict_cameras(scene, opts.cameras)
            if opts.depth_source in ("none", "lidar"):  # multiscene has no LiDAR: 'lidar' means no depth files
                from dataclasses import replace

                scene = _replace_images(scene, [replace(r, depth_path=None) for r in scene.images])
        else:
            scene = PARSERS[kind](d, i, opts)
        out.append(downscale_scene(scene, float(opts.downscale)))
        # image size, timestamps vs poses, the first sky mask of each camera (issue 18)
        plausibility.check_scene(out[-1], float(opts.downscale), check_files=opts.check_files)
    return out


def _replace_images(scene: SceneRecord, images) -> SceneRecord:
    from evolsplat_ns.data.layouts.common import _with_images

    return _with_images(scene, images)
