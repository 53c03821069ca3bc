"""Point and pixel filters of the segment clouds.

- sky masks, per pinned convention (:func:`sky_from_mask`);
- depth consistency between two frames of one camera (:func:`depth_consistency_mask`);
- box crop and inner/outer split, statistical outlier removal, uniform down-sampling (:func:`postprocess`);
- seeded random subsampling (:func:`random_subsample`).

Statistical outlier removal follows open3d's ``remove_statistical_outlier`` exactly: a point's statistic is the
mean distance to its ``nb_neighbors`` nearest points, itself included (so ``nb_neighbors - 1`` others); the cloud's
mean and standard deviation of that statistic sum over the points where it is positive but divide by all ``N``
points (``N - 1`` for the deviation); a point is kept when its statistic is positive and below ``mean + std_ratio *
std``. Three backends compute it and give the same mask (tested against open3d): open3d itself, scikit-learn's
KD-tree, and the exact grid KNN of :mod:`evolsplat_ns.pointcloud.knn` in PyTorch (CPU or CUDA). Clouds of at most
``nb_neighbors`` points are kept whole (a project rule, the same for every backend). Uniform down-sampling keeps
the points whose index is a multiple of ``k`` (open3d's ``uniform_down_sample``), done directly on the index arrays.

Crop, split and down-sampling run as tensor operations on the device of the points (:func:`postprocess`).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from evolsplat_ns.cameras import project_points
from evolsplat_ns.data.records import SKY_0_IS_SKY, SKY_255_IS_SKY, SKY_LABEL_10_IS_SKY
from evolsplat_ns.pointcloud.options import PointCloudOptions, as_box
from evolsplat_ns.pointcloud.plyio import open3d_module

logger = logging.getLogger(__name__)


class StageTimes:
    """Seconds per stage of a cloud's construction (``GenerationReport.stages``). On CUDA each stage ends with a
    synchronisation, so that the time of asynchronous kernels lands in the stage that launched them."""

    def __init__(self, device: Union[str, torch.device, None] = None) -> None:
        self.seconds: Dict[str, float] = {}
        self._cuda = device is not None and torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


@contextmanager
def _untimed(stage: str) -> Iterator[None]:
    yield


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

ArrayLike = Union[np.ndarray, torch.Tensor]


def outlier_statistic_mask(avg: torch.Tensor, std_ratio: float) -> torch.Tensor:
    """open3d's ``remove_statistical_outlier`` test on the mean neighbour distances ``avg`` ``[N]`` (float64).

    Exactly open3d's arithmetic: the mean and the standard deviation sum over the points with ``avg > 0`` but divide
    by all ``N`` points (and ``N - 1``); a point is kept when ``0 < avg < mean + std_ratio * std``.
    """
    avg = avg.to(torch.float64)
    n = avg.numel()
    valid = avg > 0
    pos = avg[valid]
    mean = pos.sum() / n
    std = torch.sqrt(((pos - mean) ** 2).sum() / max(n - 1, 1))
    return valid & (avg < mean + std_ratio * std)


def _outlier_backend(backend: str, points: ArrayLike) -> str:
    if backend == "auto":
        if isinstance(points, torch.Tensor) and points.device.type == "cuda":
            return "torch"
        return "open3d" if open3d_module() is not None else "sklearn"
    if backend not in ("torch", "sklearn", "open3d"):
        raise ValueError(f"unknown outlier removal backend {backend!r}; one of auto, torch, sklearn, open3d")
    return backend


def statistical_outlier_mask(points: ArrayLike, nb_neighbors: int, std_ratio: float,
                             backend: str = "auto") -> ArrayLike:
    """[N] bool, True = inlier: open3d's ``remove_statistical_outlier`` (see the module docstring).

    ``points`` ``[N, 3]``, numpy (the mask is numpy) or torch (the mask is a tensor on the points' device).
    ``backend``: ``"torch"`` (:mod:`evolsplat_ns.pointcloud.knn`, on the points' device), ``"sklearn"``,
    ``"open3d"``, or ``"auto"`` (torch for CUDA tensors, else open3d if importable, else scikit-learn). All give
    the same mask. Clouds of at most ``nb_neighbors`` points are kept whole (too few points for the statistic).
    """
    as_tensor = isinstance(points, torch.Tensor)
    dev = points.device if as_tensor else torch.device("cpu")
    n = int(points.shape[0]) if as_tensor else len(np.asarray(points).reshape(-1, 3))
    backend = _outlier_backend(backend, points)

    def out(keep: torch.Tensor) -> ArrayLike:
        return keep.to(dev) if as_tensor else keep.cpu().numpy()

    if n <= nb_neighbors or n < 2:
        return out(torch.ones(n, dtype=torch.bool))
    if backend == "torch":
        from evolsplat_ns.pointcloud.knn import knn_mean_distances

        avg = knn_mean_distances(points, int(nb_neighbors), skip_self=False)
        return out(outlier_statistic_mask(avg, std_ratio))
    pts = (points.detach().cpu().numpy() if as_tensor else np.asarray(points)).astype(np.float64).reshape(-1, 3)
    if backend == "open3d":
        o3d = open3d_module()
        if o3d is None:
            raise ImportError("open3d is not importable (point cloud backend 'open3d')")
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        _, ind = pc.remove_statistical_outlier(nb_neighbors=int(nb_neighbors), std_ratio=float(std_ratio))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.as_tensor(np.asarray(ind, dtype=np.int64))] = True
        return out(keep)
    from sklearn.neighbors import NearestNeighbors

    # the point itself is among its nb_neighbors nearest (at distance 0), as in open3d
    dist, _ = NearestNeighbors(n_neighbors=int(nb_neighbors), algorithm="kd_tree").fit(pts).kneighbors(pts)
    return out(outlier_statistic_mask(torch.from_numpy(dist.mean(axis=1)), std_ratio))


def uniform_every_k(n: int, k: int, device: Union[str, torch.device, None] = None) -> ArrayLike:
    """[N] bool: index is a multiple of ``k`` (open3d's ``uniform_down_sample``); a tensor when ``device`` is given."""
    if device is not None:
        return (torch.arange(n, device=device) % max(1, int(k))) == 0
    return (np.arange(n) % max(1, int(k))) == 0


def _inside(points: torch.Tensor, box) -> torch.Tensor:
    b = torch.as_tensor(as_box(box), dtype=torch.float64, device=points.device)
    p = points.to(torch.float64)  # compared in float64, as numpy compares float32 points with a float64 box
    return ((p >= b[0]) & (p <= b[1])).all(1)


def _reduce(points, colours, nb, std, every_k, outlier_removal: bool, backend: str, timer):
    if outlier_removal and len(points):
        with timer("outlier removal"):
            keep = statistical_outlier_mask(points, nb, std, backend=backend)
            points, colours = points[keep], colours[keep]
    with timer("down-sampling"):
        keep = uniform_every_k(len(points), every_k, points.device)
        return points[keep], colours[keep]


def postprocess(
    points: ArrayLike,
    colours: ArrayLike,
    opts: PointCloudOptions,
    crop_box: Optional[np.ndarray],
    inner_box: Optional[np.ndarray],
    backend: Optional[str] = None,
    timer: Optional[StageTimes] = None,
) -> Tuple[ArrayLike, ArrayLike]:
    """Crop, split, outlier removal and down-sampling, per the options.

    ``use_bbx``: drop points outside ``crop_box``; points inside ``inner_box`` get outlier removal with
    (``nb_neighbors_inside``, ``std_ratio_inside``) and keep every ``every_k_inside``-th point; the others with the
    ``_outside`` values. Output: the inside points, then the outside points. Without ``use_bbx`` the whole cloud
    gets the inside treatment.

    numpy in, numpy out (the work runs on the CPU); tensors in, tensors out, on their device. ``backend`` of the
    outlier removal (see :func:`statistical_outlier_mask`; default ``opts.backend``). ``timer`` collects the
    seconds of ``crop``, ``outlier removal`` and ``down-sampling``.
    """
    timer = timer or _untimed
    as_numpy = not isinstance(points, torch.Tensor)
    p = torch.from_numpy(np.ascontiguousarray(points)) if as_numpy else points
    c = torch.from_numpy(np.ascontiguousarray(colours)) if as_numpy else colours.to(p.device)
    backend = backend or opts.backend
    if not opts.use_bbx or crop_box is None:
        p, c = _reduce(p, c, opts.nb_neighbors_inside, opts.std_ratio_inside, opts.every_k_inside,
                       opts.outlier_removal, backend, timer)
    else:
        with timer("crop"):
            keep = _inside(p, crop_box)
            p, c = p[keep], c[keep]
            inner = _inside(p, inner_box) if inner_box is not None else torch.ones(len(p), dtype=torch.bool,
                                                                                  device=p.device)
            pi, ci, po, co = p[inner], c[inner], p[~inner], c[~inner]
        pi, ci = _reduce(pi, ci, opts.nb_neighbors_inside, opts.std_ratio_inside, opts.every_k_inside,
                         opts.outlier_removal, backend, timer)
        po, co = _reduce(po, co, opts.nb_neighbors_outside, opts.std_ratio_outside, opts.every_k_outside,
                         opts.outlier_removal, backend, timer)
        p, c = torch.cat([pi, po]), torch.cat([ci, co])
    return (p.numpy(), c.numpy()) if as_numpy else (p, c)


def random_subsample(
    points: ArrayLike, colours: ArrayLike, max_points: Optional[int], seed: int
) -> Tuple[ArrayLike, ArrayLike]:
    """At most ``max_points`` points, chosen uniformly at random (seeded), in their original order (numpy's
    generator, so the choice is the same for numpy arrays and tensors on any device)."""
    if max_points is None or len(points) <= max_points:
        return points, colours
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(points), size=int(max_points), replace=False))
    if isinstance(points, torch.Tensor):
        t = torch.from_numpy(idx).to(points.device)
        return points[t], colours[t]
    return points[idx], colours[idx]
