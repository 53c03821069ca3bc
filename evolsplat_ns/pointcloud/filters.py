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
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from evolsplat_ns.cameras import project_points, rigid_inverse
from evolsplat_ns.data.records import ImageRecord, SKY_0_IS_SKY, SKY_255_IS_SKY, SKY_LABEL_10_IS_SKY
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


def read_mask(path: Path, convention: Optional[str] = None) -> np.ndarray:
    """[H, W] uint8 (single channel); a colour image, or under a binary ``convention`` a mask without a value
    >= 128 that is not blank, is an error (:func:`evolsplat_ns.data.plausibility.read_sky_mask`)."""
    from evolsplat_ns.data.plausibility import read_sky_mask

    return read_sky_mask(path, convention)


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


def project_to_pixels(points: torch.Tensor, recs: Sequence[ImageRecord]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Pixel column, row (``floor`` of the projection: pixel ``(row, col)`` covers ``[col, col+1) x [row, row+1)``)
    and depth of world points in each camera, each ``[V, N]`` float64.

    Written out element by element in float64 (no matrix products), so that every device computes the same pixels
    (the clouds, and so the cache entries, do not depend on the backend). ``points``: ``[N, 3]`` float64.
    """
    dev = points.device
    w2c = torch.as_tensor(rigid_inverse(np.stack([np.asarray(r.c2w, dtype=np.float64) for r in recs])),
                          dtype=torch.float64, device=dev)  # [V, 4, 4]
    K = torch.as_tensor(np.stack([np.asarray(r.K, dtype=np.float64)[:3, :3] for r in recs]), dtype=torch.float64,
                        device=dev)
    x, y, z0 = points[:, 0][None], points[:, 1][None], points[:, 2][None]  # [1, N]

    def row(i: int) -> torch.Tensor:  # [V, N] camera coordinate i
        return w2c[:, i, 0, None] * x + w2c[:, i, 1, None] * y + w2c[:, i, 2, None] * z0 + w2c[:, i, 3, None]

    cx, cy, z = row(0), row(1), row(2)
    zs = torch.where(z.abs() < 1e-8, torch.full_like(z, 1e-8), z)
    xn, yn = cx / zs, cy / zs
    u = K[:, 0, 0, None] * xn + K[:, 0, 1, None] * yn + K[:, 0, 2, None]
    v = K[:, 1, 1, None] * yn + K[:, 1, 2, None]
    return torch.floor(u), torch.floor(v), z


TRANSIENT_CELLS = 240
"""Free-space test grid: about this many cells across each image (4 px at 960 px wide)."""
TRANSIENT_MAX_REFERENCES = 16
"""Reference frames of the free-space test (evenly spread over the segment's frames; all when fewer)."""


def transient_mask(
    frame_points: Sequence[torch.Tensor],
    frame_cameras: Sequence[Sequence[ImageRecord]],
    margin: float = 0.5,
    relative_margin: float = 0.05,
    min_fraction: float = 0.5,
    max_references: int = TRANSIENT_MAX_REFERENCES,
    cells: int = TRANSIENT_CELLS,
) -> List[torch.Tensor]:
    """Which points of a multi-frame scan (LiDAR sweeps) belong to the static scene: a free-space test.

    A point of frame ``t`` is *seen through* at another frame ``j`` when, in a camera of frame ``j``, the nearest
    point of frame ``j``'s own scan around its pixel lies farther than the point by more than ``margin +
    relative_margin * z``: at time ``j`` the camera looked through where the point was, so it was not there (a car
    that drove on, a pedestrian). The nearest depth per cell of a coarse grid (``cells`` across the image) is taken
    over the 3x3 neighbouring cells, so that depth edges and the gaps between scan lines do not count as free space.
    The point is *observed* at ``j`` when frame ``j`` has a depth there at all; its own frame always observes it.
    A point is dropped when it is seen through in at least ``min_fraction`` of the frames that observe it: what is
    there most of the segment's time stays (a car parked throughout), what passes is removed. Accumulating the
    sweeps of a whole segment (seconds of driving) otherwise leaves every passing car as a trail of points that
    hides the road in the frames where the car is gone (docs/REAL_DATA.md).

    Args:
        frame_points: per frame ``[N_t, 3]`` float64 world points (project frame), on the device of the work.
        frame_cameras: per frame its cameras (``c2w``, ``K``, ``width``, ``height``).
        max_references: frames tested against (evenly spread; every frame when there are at most this many).

    Returns:
        per frame ``[N_t]`` bool, True = keep.
    """
    n_frames = len(frame_points)
    if n_frames < 2:
        return [torch.ones(len(p), dtype=torch.bool, device=p.device) for p in frame_points]
    dev = frame_points[0].device
    pts = torch.cat(list(frame_points))
    owner = torch.cat([torch.full((len(p),), i, dtype=torch.int64, device=dev) for i, p in enumerate(frame_points)])
    refs = np.unique(np.round(np.linspace(0, n_frames - 1, min(n_frames, max_references))).astype(np.int64))
    observed = torch.zeros(len(pts), dtype=torch.int32, device=dev)
    through = torch.zeros(len(pts), dtype=torch.int32, device=dev)
    for j in refs.tolist():
        obs_j = torch.zeros(len(pts), dtype=torch.bool, device=dev)
        thr_j = torch.zeros(len(pts), dtype=torch.bool, device=dev)
        for rec in frame_cameras[j]:
            nearest = _cell_depth(frame_points[j], rec, cells)
            inside, cell, z = _grid_cells(pts, rec, cells)
            d = nearest.reshape(-1)[torch.where(inside, cell, torch.zeros_like(cell))]
            seen = inside & torch.isfinite(d)
            obs_j |= seen
            thr_j |= seen & (d > z + margin + relative_margin * z)
        own = owner == j
        observed += (obs_j & ~own).to(torch.int32)
        through += (thr_j & ~own).to(torch.int32)
    observed += 1  # its own frame, where the point is by definition
    drop = (through > 0) & (through.to(torch.float64) >= min_fraction * observed.to(torch.float64))
    keep = ~drop
    return list(torch.split(keep, [len(p) for p in frame_points]))


def _grid_shape(rec: ImageRecord, cells: int) -> Tuple[int, int, int]:
    """Cell size in pixels (about ``cells`` cells across the image) and the grid's rows and columns."""
    s = max(1, int(np.ceil(int(rec.width) / cells)))
    return s, -(-int(rec.height) // s), -(-int(rec.width) // s)


def _grid_cells(points: torch.Tensor, rec: ImageRecord, cells: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """Per point in camera ``rec``: in front and inside the image ``[N]`` bool, flat cell index ``[N]`` int64 (only
    meaningful where inside), depth ``[N]`` float64."""
    s, _, gw = _grid_shape(rec, cells)
    col, row, z = (a[0] for a in project_to_pixels(points, [rec]))
    inside = (z > 0) & (col >= 0) & (col < rec.width) & (row >= 0) & (row < rec.height)
    return inside, ((row // s) * gw + col // s).to(torch.int64), z


def _cell_depth(points: torch.Tensor, rec: ImageRecord, cells: int) -> torch.Tensor:
    """``[gh, gw]`` float64: the nearest depth of ``points`` in each cell of camera ``rec``'s grid, then the minimum
    over the 3x3 neighbouring cells (``inf`` where there is none)."""
    _, gh, gw = _grid_shape(rec, cells)
    inside, cell, z = _grid_cells(points, rec, cells)
    grid = torch.full((gh * gw,), torch.inf, dtype=torch.float64, device=points.device)
    grid.scatter_reduce_(0, cell[inside], z[inside], reduce="amin", include_self=True)
    grid = -torch.nn.functional.max_pool2d(-grid.reshape(1, 1, gh, gw), 3, stride=1, padding=1)
    return grid.reshape(gh, gw)


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
