"""Source depth for the visibility channel of the window features, from the segment's own seed cloud.

EVolSplat's window features carry, per point and source view, ``vis = z - D(u, v)``: the point's depth in that view
minus the source depth at its projection. The reference reads ``D`` from dense monocular depth maps. Real driving
data rarely has those: LiDAR gives depth at 2-4 % of the pixels of a 960x540 image, and a missing value read as 0
turns ``vis`` into the point's depth (tens of metres) instead of a visibility — the network then learns colour from
distance and renders grey (issue 14, docs/REAL_DATA.md).

:func:`cloud_depth` makes ``D`` from the points themselves, so it exists wherever a point projects: the seed points
are z-buffered into each source view on a pyramid of square cells (1, 2, 4, ... pixels), and each point reads the
nearest depth of the cell that contains it **at its own footprint**: the level whose cell is at least the point's
spacing on screen (``footprint_scale * f * spacing / z`` pixels, ``spacing`` = the mean distance to its nearest
neighbours, i.e. its base Gaussian scale). A surface is closed at that level, so a point behind it is found hidden
(``vis > 0``), while a point on the nearest surface reads (nearly) its own depth (``vis ~ 0``). The point itself is
in its cell, so ``0 <= D <= z``: the value is never unknown and ``vis`` is never negative.

:func:`fill_unknown_depth` keeps the data's depth where it has one and takes the cloud's elsewhere (the ``data``
visibility mode).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LEVEL = 4
"""Coarsest pyramid level: cells of 2^4 = 16 pixels."""
FOOTPRINT_SCALE = 2.0
"""A point's footprint on screen, in units of its neighbour spacing projected (``f * spacing / z`` pixels)."""


def footprint_level(spacing: Tensor, z: Tensor, focal: Tensor, footprint_scale: float = FOOTPRINT_SCALE,
                    max_level: int = MAX_LEVEL) -> Tensor:
    """Pyramid level ``[V, N]`` (int64, 0..max_level) whose cells (``2^level`` px) cover a point's footprint.

    Args:
        spacing: ``[N]`` metres, the point's neighbour spacing.
        z: ``[V, N]`` depth of the point in each view (``> 0`` where it is in front).
        focal: ``[V]`` focal length in pixels.
    """
    px = footprint_scale * focal[:, None] * spacing[None, :] / z.clamp_min(1e-6)
    level = torch.ceil(torch.log2(px.clamp_min(1.0)))
    return level.clamp(0, max_level).long()


def cloud_depth(uv: Tensor, z: Tensor, valid: Tensor, height: int, width: int, level: Tensor,
                max_level: int = MAX_LEVEL) -> Tensor:
    """Nearest depth of the cloud in the cell of each point at its level.

    The pyramid is built as a z-buffer of the pixels (one ``scatter_reduce`` "amin"), then 2x2 min-pooling per level
    (a cell of level ``l`` is the union of its four children of level ``l - 1``; the border cells of an image whose
    size is not a multiple of ``2^l`` are partial, as ``ceil_mode`` pools them); every point then reads its own
    level's cell in one gather from the concatenated levels. Minima are exact, so this equals z-buffering each level
    separately (tested against a brute-force reference).

    Args:
        uv: ``[V, N, 2]`` projected pixel positions (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``).
        z: ``[V, N]`` depths.
        valid: ``[V, N]`` bool, points that take part (in front of the camera, inside the image).
        level: ``[V, N]`` pyramid level of each point (:func:`footprint_level`, 0..``max_level``).

    Returns:
        ``[V, N]`` depth ``D``; ``D <= z`` where ``valid`` (the point is in its own cell), 0 elsewhere.
    """
    V, N = z.shape
    dev = z.device
    col = torch.floor(uv[..., 0]).clamp(0, width - 1).long()
    row = torch.floor(uv[..., 1]).clamp(0, height - 1).long()
    big = torch.finfo(z.dtype).max
    zin = torch.where(valid, z, torch.full_like(z, big))
    view = torch.arange(V, device=dev)[:, None]
    zbuf = torch.full((V * height * width,), big, device=dev, dtype=z.dtype)
    zbuf.scatter_reduce_(0, ((view * height + row) * width + col).reshape(-1), zin.reshape(-1), reduce="amin",
                         include_self=True)
    levels = [zbuf]
    grid = zbuf.view(V, 1, height, width)
    for _ in range(max_level):  # min over 2x2 children = -max(-x); partial border cells with ceil_mode
        grid = -F.max_pool2d(-grid, kernel_size=2, stride=2, ceil_mode=True)
        levels.append(grid.reshape(-1))
    # level l is ceil(H / 2^l) x ceil(W / 2^l) cells per view (ceil_mode's sizes), computed on the device: no
    # host-to-device copy (a pageable one would synchronise the stream)
    lv = level.clamp(0, max_level)
    gh, gw = ((height - 1) >> lv) + 1, ((width - 1) >> lv) + 1
    all_lv = torch.arange(max_level + 1, device=dev)
    cells = V * (((height - 1) >> all_lv) + 1) * (((width - 1) >> all_lv) + 1)
    offsets = cells.cumsum(0) - cells  # where each level starts in the concatenation
    idx = offsets[lv] + (view * gh + (row >> lv)) * gw + (col >> lv)
    return torch.where(valid, torch.cat(levels)[idx], torch.zeros_like(z))


def fill_unknown_depth(data_depth: Tensor, cloud: Tensor) -> Tensor:
    """The data's depth ``[V, N]`` at the points where known (``> 0``), the cloud's depth elsewhere."""
    return torch.where(data_depth > 0, data_depth, cloud)


def visibility_depth(uv: Tensor, z: Tensor, valid: Tensor, height: int, width: int, K: Tensor,
                     spacing: Optional[Tensor]) -> Tensor:
    """:func:`cloud_depth` with each point's level from its ``spacing`` ``[N]`` (``None``: level 0, per pixel)."""
    if spacing is None:
        level = torch.zeros_like(z, dtype=torch.long)
    else:
        level = footprint_level(spacing.to(z.dtype), z, K[:, 0, 0].to(z.dtype))
    return cloud_depth(uv, z, valid, height, width, level)
