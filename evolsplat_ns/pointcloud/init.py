"""Hybrid Gaussian initialisation of a segment from its RGB point cloud (the design document's table).

=================  ===================================================================  ================
key                value                                                                shape
=================  ===================================================================  ================
``means``          the points                                                           [N, 3]
``colours``        RGB in [0, 1], kept as the anchor feature of the volume encoder      [N, 3]
``log_scales``     log(mean distance to the 3 nearest neighbours), same for x, y, z     [N, 3]
``features_dc``    RGB -> SH degree 0: ``(rgb - 0.5) / C0``                             [N, 3]
``features_rest``  zeros                                                                [N, (d+1)^2-1, 3]
``quats``          uniformly random unit quaternions (seeded)                           [N, 4]
``opacities``      logit(0.1)                                                           [N, 1]
``offset``         zeros (the per-point offset cache)                                   [N, 3]
=================  ===================================================================  ================

All float32. Neighbour distances exclude the point itself and are clamped below by ``min_distance`` so that
coincident points give a finite log-scale.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

#: Degree-0 spherical-harmonic constant, 1 / (2 sqrt(pi)) (nerfstudio's ``RGB2SH`` uses the same).
SH_C0 = 0.28209479177387814
INITIAL_OPACITY = 0.1
KNN_NEIGHBOURS = 3
MIN_DISTANCE = 1e-4
"""Metres; lower bound of the neighbour distance behind the initial log-scale."""
SINGLE_POINT_DISTANCE = 0.05
"""Metres; the neighbour distance used when a cloud has a single point."""

ArrayLike = Union[np.ndarray, torch.Tensor]


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> degree-0 SH coefficient (inverse of ``sh * C0 + 0.5``)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh: torch.Tensor) -> torch.Tensor:
    return sh * SH_C0 + 0.5


def random_unit_quaternions(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n, 4] float32 unit quaternions drawn uniformly on SO(3) (Shoemake's method), with ``generator``."""
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    a, b, c = u[:, 0], u[:, 1], u[:, 2]
    q = torch.stack(
        [
            torch.sqrt(1 - a) * torch.sin(2 * math.pi * b),
            torch.sqrt(1 - a) * torch.cos(2 * math.pi * b),
            torch.sqrt(a) * torch.sin(2 * math.pi * c),
            torch.sqrt(a) * torch.cos(2 * math.pi * c),
        ],
        dim=-1,
    )
    return (q / q.norm(dim=-1, keepdim=True)).float()


def knn_mean_distance(points: ArrayLike, k: int = KNN_NEIGHBOURS, min_distance: float = MIN_DISTANCE,
                      backend: str = "auto", device: Union[str, torch.device, None] = None) -> np.ndarray:
    """[N] float64: mean distance of each point to its ``k`` nearest other points, clamped to ``min_distance``.

    The point itself is excluded (for coincident points one zero-distance entry is dropped, which is the same).
    With fewer than ``k + 1`` points all other points are used; a single point gets ``SINGLE_POINT_DISTANCE``.

    ``backend``: ``"torch"`` (exact grid KNN, :mod:`evolsplat_ns.pointcloud.knn`, on ``device`` or the tensor's
    device), ``"sklearn"`` (KD-tree, CPU), or ``"auto"``: torch for CUDA (a CUDA ``device`` or CUDA tensor), else
    scikit-learn (``"open3d"`` means scikit-learn here). Both give the same distances (to the last bit).
    """
    on_cuda = (device is not None and torch.device(device).type == "cuda") or (
        device is None and isinstance(points, torch.Tensor) and points.device.type == "cuda")
    if backend == "auto":
        backend = "torch" if on_cuda else "sklearn"
    if backend not in ("torch", "sklearn", "open3d"):
        raise ValueError(f"unknown KNN backend {backend!r}; one of auto, torch, sklearn, open3d")
    n = int(points.shape[0]) if isinstance(points, torch.Tensor) else len(np.asarray(points).reshape(-1, 3))
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.full(1, max(SINGLE_POINT_DISTANCE, min_distance))
    kk = min(k, n - 1)
    if backend == "torch":
        from evolsplat_ns.pointcloud.knn import knn_mean_distances

        mean = knn_mean_distances(points, kk, skip_self=True, device=device).cpu().numpy()
        return np.maximum(mean, min_distance)
    pts = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    pts = pts.astype(np.float64).reshape(-1, 3)
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=kk + 1, algorithm="kd_tree").fit(pts).kneighbors(pts)
    # column 0 is the point itself (distance 0; with duplicates, a zero-distance twin: same value)
    mean = dist[:, 1:].mean(axis=1)
    return np.maximum(mean, min_distance)


def init_gaussians(
    points: ArrayLike,
    colours: ArrayLike,
    sh_degree: int = 1,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    min_distance: float = MIN_DISTANCE,
    knn_distance: Optional[np.ndarray] = None,
    knn_backend: str = "auto",
    keys: Optional[Sequence[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Initial Gaussians of a segment (see the module table). Deterministic for a given ``seed``.

    ``knn_distance`` ``[N]``: :func:`knn_mean_distance` of the points if already known (the point-cloud cache keeps
    it beside each cloud, see :meth:`evolsplat_ns.pointcloud.cache.SegmentPointCloud.knn_distance`); otherwise it
    is computed with ``knn_backend`` (``auto``: on ``device`` when that is CUDA). ``keys``: only these entries
    (default all); each has the same value as in the full dict.
    """
    pts = torch.as_tensor(np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points),
                          dtype=torch.float32).reshape(-1, 3)
    rgb = torch.as_tensor(np.asarray(colours.detach().cpu() if isinstance(colours, torch.Tensor) else colours),
                          dtype=torch.float32).reshape(-1, 3)
    if pts.shape[0] != rgb.shape[0]:
        raise ValueError(f"points ({pts.shape[0]}) and colours ({rgb.shape[0]}) differ in length")
    if sh_degree < 0:
        raise ValueError(f"sh_degree must be >= 0, got {sh_degree}")
    n = pts.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    if knn_distance is None:
        knn_distance = knn_mean_distance(pts, KNN_NEIGHBOURS, min_distance, backend=knn_backend,
                                         device=device if knn_backend in ("auto", "torch") else None)
    elif len(knn_distance) != n:
        raise ValueError(f"knn_distance has {len(knn_distance)} entries for {n} points")
    log_scale = torch.from_numpy(np.log(np.maximum(np.asarray(knn_distance, dtype=np.float64), min_distance))).float()
    make = {
        "means": lambda: pts.clone(),
        "colours": lambda: rgb.clone(),
        "log_scales": lambda: log_scale[:, None].repeat(1, 3),
        "features_dc": lambda: rgb_to_sh(rgb),
        "features_rest": lambda: torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3),
        "quats": lambda: random_unit_quaternions(n, gen),
        "opacities": lambda: torch.full((n, 1), math.log(INITIAL_OPACITY / (1.0 - INITIAL_OPACITY))),
        "offset": lambda: torch.zeros(n, 3),
    }
    unknown = set(keys or ()) - set(make)
    if unknown:
        raise ValueError(f"unknown Gaussian entries {sorted(unknown)}; known: {list(make)}")
    out = {k: make[k]() for k in (keys if keys is not None else make)}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
