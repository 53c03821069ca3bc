"""Point and pixel filters of the segment clouds.

- sky masks, per pinned convention (:func:`sky_from_mask`);
- depth consistency between two frames of one camera (:func:`depth_consistency_mask`);
- box crop and inner/outer split, statistical outlier removal, uniform down-sampling (:func:`postprocess`);
- seeded random subsampling (:func:`random_subsample`).

Statistical outlier removal is open3d's ``remove_statistical_outlier`` when open3d is importable; otherwise the
same definition computed with scikit-learn (a point is kept when the mean distance to its ``nb_neighbors``
nearest neighbours, itself included, is positive and below ``mean + std_ratio * std`` of those means over the
cloud; std with ``n - 1``). Uniform down-sampling keeps the points whose index is a multiple of ``k`` (open3d's
``uniform_down_sample``), done directly on the index arrays.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from evolsplat_ns.cameras import project_points
from evolsplat_ns.data.records import SKY_0_IS_SKY, SKY_255_IS_SKY, SKY_LABEL_10_IS_SKY
from evolsplat_ns.pointcloud.options import PointCloudOptions, inside_box
from evolsplat_ns.pointcloud.plyio import open3d_module

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# sky
# ----------------------------------------------------------------------------------------------------------------


def read_mask(path: Path) -> np.ndarray:
    """[H, W] uint8 (single channel; colour masks are converted to luminance)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def sky_from_mask(mask: np.ndarray, convention: str) -> np.ndarray:
    """[H, W] bool, True = sky. ``"255_is_sky"``: values >= 128 are sky; ``"0_is_sky"``: values < 128 are sky;
    ``"label_10_is_sky"``: a Cityscapes train-id label map, value 10 is sky (the reference's semantic masks)."""
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.astype(np.uint8) * 255
    if convention == SKY_255_IS_SKY:
        return m >= 128
    if convention == SKY_0_IS_SKY:
        return m < 128
    if convention == SKY_LABEL_10_IS_SKY:  # a label map, not a binary mask: exactly the sky label
        return m == 10
    raise ValueError(f"unknown sky mask convention {convention!r}; expected '{SKY_255_IS_SKY}' or '{SKY_0_IS_SKY}'")


# ----------------------------------------------------------------------------------------------------------------
# depth consistency
# ----------------------------------------------------------------------------------------------------------------


def depth_consistency_mask(
    points: np.ndarray, ref_depth: np.ndarray, ref_c2w: np.ndarray, ref_K: np.ndarray
) -> np.ndarray:
    """Which world points of one frame agree with the depth map of another frame of the same camera.

    Each point is projected into the reference camera; where it lands inside the image, in front of the camera
    and on a pixel with valid depth (> 0), the difference ``|z_projected - ref_depth[pixel]|`` is measured
    (pixel = the one containing the projection). Points are kept when their difference is at most the mean
    difference over those measurable points; points that cannot be measured are kept.

    Args:
        points: [N, 3] world points (project frame).
        ref_depth: [H, W] metric z-depth of the reference frame (0 = none).
        ref_c2w: [4, 4] OpenCV camera-to-world of the reference frame.
        ref_K: [3, 3] intrinsics of the reference frame.

    Returns:
        [N] bool, True = keep.
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=bool)
    H, W = ref_depth.shape
    uv, z = project_points(
        torch.as_tensor(points, dtype=torch.float64),
        torch.as_tensor(ref_c2w, dtype=torch.float64)[None],
        torch.as_tensor(ref_K, dtype=torch.float64)[None],
    )
    uv, z = uv[0].numpy(), z[0].numpy()
    col = np.floor(uv[:, 0])
    row = np.floor(uv[:, 1])
    inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H) & np.isfinite(col) & np.isfinite(row)
    measurable = inside.copy()
    d_ref = np.zeros(n, dtype=np.float64)
    d_ref[inside] = ref_depth[row[inside].astype(np.int64), col[inside].astype(np.int64)]
    measurable &= (d_ref > 0) & np.isfinite(d_ref)
    keep = np.ones(n, dtype=bool)
    if not measurable.any():
        return keep
    diff = np.abs(z[measurable] - d_ref[measurable])
    keep[measurable] = diff <= diff.mean()
    return keep


# ----------------------------------------------------------------------------------------------------------------
# outlier removal, down-sampling
# ----------------------------------------------------------------------------------------------------------------


def statistical_outlier_mask(points: np.ndarray, nb_neighbors: int, std_ratio: float, backend: str = "auto") -> np.ndarray:
    """[N] bool, True = inlier (open3d's ``remove_statistical_outlier``; see the module docstring).

    ``backend``: ``"auto"`` (open3d if importable, else scikit-learn), ``"open3d"`` or ``"sklearn"``.
    Clouds of at most ``nb_neighbors`` points are returned whole (too few points for the statistic).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    n = len(pts)
    if n <= nb_neighbors or n < 2:
        return np.ones(n, dtype=bool)
    o3d = open3d_module() if backend in ("auto", "open3d") else None
    if backend == "open3d" and o3d is None:
        raise ImportError("open3d is not importable")
    if o3d is not None:
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        _, ind = pc.remove_statistical_outlier(nb_neighbors=int(nb_neighbors), std_ratio=float(std_ratio))
        keep = np.zeros(n, dtype=bool)
        keep[np.asarray(ind, dtype=np.int64)] = True
        return keep
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=int(nb_neighbors)).fit(pts)
    dist, _ = nn.kneighbors(pts)  # the point itself is among them, at distance 0
    avg = dist.mean(axis=1)
    valid = avg > 0
    if valid.sum() < 2:
        return valid
    mean = avg[valid].mean()
    std = np.sqrt(((avg[valid] - mean) ** 2).sum() / (valid.sum() - 1))
    return valid & (avg < mean + std_ratio * std)


def uniform_every_k(n: int, k: int) -> np.ndarray:
    """[N] bool: index is a multiple of ``k`` (open3d's ``uniform_down_sample``)."""
    return (np.arange(n) % max(1, int(k))) == 0


def _reduce(points, colours, nb, std, every_k, outlier_removal: bool):
    if outlier_removal and len(points):
        keep = statistical_outlier_mask(points, nb, std)
        points, colours = points[keep], colours[keep]
    keep = uniform_every_k(len(points), every_k)
    return points[keep], colours[keep]


def postprocess(
    points: np.ndarray,
    colours: np.ndarray,
    opts: PointCloudOptions,
    crop_box: Optional[np.ndarray],
    inner_box: Optional[np.ndarray],
) -> Tuple[np.ndarray, np.ndarray]:
    """Crop, split, outlier removal and down-sampling, per the options.

    ``use_bbx``: drop points outside ``crop_box``; points inside ``inner_box`` get outlier removal with
    (``nb_neighbors_inside``, ``std_ratio_inside``) and keep every ``every_k_inside``-th point; the others with the
    ``_outside`` values. Output: the inside points, then the outside points. Without ``use_bbx`` the whole cloud
    gets the inside treatment.
    """
    if not opts.use_bbx or crop_box is None:
        return _reduce(points, colours, opts.nb_neighbors_inside, opts.std_ratio_inside, opts.every_k_inside,
                       opts.outlier_removal)
    keep = inside_box(points, crop_box)
    points, colours = points[keep], colours[keep]
    inner = inside_box(points, inner_box) if inner_box is not None else np.ones(len(points), dtype=bool)
    pi, ci = _reduce(points[inner], colours[inner], opts.nb_neighbors_inside, opts.std_ratio_inside,
                     opts.every_k_inside, opts.outlier_removal)
    po, co = _reduce(points[~inner], colours[~inner], opts.nb_neighbors_outside, opts.std_ratio_outside,
                     opts.every_k_outside, opts.outlier_removal)
    return np.concatenate([pi, po]), np.concatenate([ci, co])


def random_subsample(
    points: np.ndarray, colours: np.ndarray, max_points: Optional[int], seed: int
) -> Tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points, chosen uniformly at random (seeded), in their original order."""
    if max_points is None or len(points) <= max_points:
        return points, colours
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(points), size=int(max_points), replace=False))
    return points[idx], colours[idx]
