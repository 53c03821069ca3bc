"""Trilinear sampling of a sparse feature volume at continuous points.

Index <-> world mapping
-----------------------
A world point ``p`` has the continuous grid index ``u = (p - aabb_min) / voxel_size`` (per axis) and voxel ``i``'s
feature sits at ``u = i`` (world ``aabb_min + i * voxel_size``, the voxel's min corner; the voxeliser puts
``p`` in voxel ``floor(u)``). The value at ``u`` is the trilinear blend of the 8 voxels
``floor(u) + {0, 1}^3``; voxels that are not occupied (or lie outside the box) count as zero.

* ``mode="sparse"``: the 8 corner voxels are looked up in the coordinate hash; memory is ``O(points x 8 x C)``
  whatever the box size.
* ``mode="dense"``: the reference's way - scatter the voxels into a dense ``[1, C, X, Y, Z]`` volume and call
  ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)`` at the normalised coordinates
  ``2 u / (S - 1) - 1`` given in the order ``(z, y, x)`` (grid_sample's last grid component indexes the last
  volume axis). With ``align_corners=True`` grid index ``i`` is at normalised ``2 i / (S - 1) - 1``, i.e. at
  ``u = i``: both modes compute the same function (tests check it to rounding).

``convention="reference"`` reproduces EVolSplat's own normalisation, ``u / S * 2 - 1`` (it divides by the grid
size ``S`` instead of ``S - 1``), i.e. it samples the grid at index ``u * (S - 1) / S`` - up to one voxel off
towards the far end of the box. The sparse mode applies the same rescaling, so the modes agree under either
convention; ``"exact"`` (the default) is the mapping above.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernel_map import CoordIndex
from .ops import gather_rows
from .tensor import SparseTensor, VoxelGrid

_BITS = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.long)


def continuous_index(points: Tensor, voxel_size: float, aabb_min, grid_shape: Optional[Sequence[int]] = None,
                     convention: str = "exact") -> Tensor:
    """Continuous grid index ``[M, 3]`` of world points under ``convention`` (module docstring)."""
    lo = torch.as_tensor(aabb_min, dtype=points.dtype, device=points.device).reshape(3)
    u = (points - lo) / voxel_size
    if convention == "reference":
        if grid_shape is None:
            raise ValueError("convention='reference' needs grid_shape")
        s = torch.tensor([float(v) for v in grid_shape], dtype=points.dtype, device=points.device)
        u = u * ((s - 1) / s)
    elif convention != "exact":
        raise ValueError(f"unknown convention {convention!r} (expected 'exact' or 'reference')")
    return u


def densify(feats: Tensor, coords: Tensor, grid_shape: Sequence[int]) -> Tensor:
    """Dense ``[1, C, X, Y, Z]`` volume of the voxels (the reference's densification; allocates the box)."""
    xyz = coords[:, -3:].long()
    shp = torch.tensor([int(v) for v in grid_shape], device=coords.device)
    if xyz.numel() and (bool((xyz < 0).any()) or bool((xyz >= shp).any())):
        raise ValueError("voxel coordinates outside the grid")
    vol = feats.new_zeros((1, feats.shape[1], *[int(v) for v in grid_shape]))
    vol[0, :, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = feats.t()
    return vol


def sample_sparse_volume(feats: Tensor, coords: Tensor, points: Tensor, voxel_size: float, aabb_min,
                         grid_shape: Optional[Sequence[int]] = None, mode: str = "sparse",
                         index: Optional[CoordIndex] = None, convention: str = "exact", batch: int = 0,
                         fused_lookup: bool = False) -> Tensor:
    """Trilinear features ``[M, C]`` at world ``points [M, 3]`` of the voxels ``feats [N, C]`` at ``coords``.

    ``coords`` is ``[N, 3]`` (x, y, z) or ``[N, 4]`` (b, x, y, z; then voxels of batch item ``batch`` are used).
    ``index`` is an optional prebuilt :class:`CoordIndex` of ``coords`` (reuse it across calls: the coordinates
    of a segment never change). ``grid_shape`` (voxels per axis) is needed by ``mode="dense"`` and by
    ``convention="reference"``. Voxels are expected inside ``[0, grid_shape)`` (the voxeliser guarantees it; the
    dense mode rejects others, the sparse mode uses them as they are). Non-finite points get zeros (sparse mode).
    ``fused_lookup``: the 8 corners are looked up in one Triton kernel where it applies
    (:meth:`CoordIndex.lookup_offsets`; same rows).
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [M, 3], got {tuple(points.shape)}")
    u = continuous_index(points, voxel_size, aabb_min, grid_shape, convention)
    if mode == "dense":
        return _sample_dense(feats, coords, points, voxel_size, aabb_min, grid_shape, convention, batch)
    if mode != "sparse":
        raise ValueError(f"unknown mode {mode!r} (expected 'sparse' or 'dense')")
    if index is None:
        index = CoordIndex(coords)
    finite = torch.isfinite(u).all(1)
    u = torch.where(finite[:, None], u, torch.zeros_like(u)).clamp(-(2.0**40), 2.0**40)
    base = torch.floor(u)
    t = (u - base).to(feats.dtype)  # [M, 3]
    bits = _BITS  # [8, 3], on the CPU: lookup_offsets copies it without waiting for the device
    base = base.long()
    if coords.shape[1] == 4:
        base = torch.cat([torch.full_like(base[:, :1], batch), base], dim=1)
        bits = torch.cat([torch.zeros_like(bits[:, :1]), bits], dim=1)
    idx = index.lookup_offsets(base, bits, fused=fused_lookup).long()  # [M, 8]
    present = (idx >= 0) & finite[:, None]
    if feats.shape[0] == 0:
        return feats.new_zeros((points.shape[0], feats.shape[1]))
    # absent corners read some row (spread over the rows, so that the atomic backward does not pile up on one
    # address) and are masked to zero
    spread = torch.arange(idx.numel(), device=idx.device).view(idx.shape) % feats.shape[0]
    f = gather_rows(feats, torch.where(present, idx, spread)) * present[..., None].to(feats.dtype)  # [M, 8, C]
    fb = _BITS.to(device=points.device, dtype=feats.dtype)  # [8, 3]
    a = fb[None] * t[:, None, :] + (1 - fb[None]) * (1 - t[:, None, :])  # [M, 8, 3]
    w = a[..., 0] * a[..., 1] * a[..., 2]  # [M, 8] (not .prod(-1): its backward is a slow scan on CUDA)
    return (w[..., None] * f).sum(1)


def _sample_dense(feats, coords, points, voxel_size, aabb_min, grid_shape, convention, batch) -> Tensor:
    if grid_shape is None:
        raise ValueError("mode='dense' needs grid_shape")
    if any(int(v) < 2 for v in grid_shape):
        raise ValueError("mode='dense' needs at least 2 voxels per axis")
    if coords.shape[1] == 4:
        sel = coords[:, 0] == batch
        feats, coords = feats[sel], coords[sel]
    vol = densify(feats, coords, grid_shape)
    lo = torch.as_tensor(aabb_min, dtype=points.dtype, device=points.device).reshape(3)
    u = (points - lo) / voxel_size
    s = torch.tensor([float(v) for v in grid_shape], dtype=points.dtype, device=points.device)
    if convention == "reference":
        n = u / s * 2 - 1  # the reference's normalisation
    else:
        n = u / (s - 1) * 2 - 1
    grid = n[:, [2, 1, 0]].to(feats.dtype).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # [1, C, 1, 1, M]
    return out.reshape(feats.shape[1], -1).t()


def sample_volume(volume: Union[SparseTensor, Tensor], vox: VoxelGrid, points: Tensor, mode: str = "sparse",
                  convention: str = "exact") -> Tensor:
    """Features ``[M, C]`` at world ``points`` of an encoder output over the voxel grid ``vox`` (its kernel-map
    cache's ``fused_lookup`` also selects the fused corner look-up)."""
    feats = volume.feats if isinstance(volume, SparseTensor) else volume
    index = vox.index() if mode == "sparse" else None
    return sample_sparse_volume(feats, vox.coords, points, vox.voxel_size, vox.aabb_min, vox.grid_shape, mode=mode,
                                index=index, convention=convention, fused_lookup=vox.kernel_maps.fused_lookup)
