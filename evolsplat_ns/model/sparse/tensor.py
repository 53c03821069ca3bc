"""Sparse voxel tensor, the kernel-map cache it carries, and the point voxeliser.

Voxel <-> world mapping (pinned for the whole project)
------------------------------------------------------
A point ``p`` falls in voxel ``i = floor((p - aabb_min) / voxel_size)`` (per axis); the box holds
``grid_shape = floor((aabb_max - aabb_min) / voxel_size + 1e-6)`` voxels per axis and points whose voxel is
outside ``[0, grid_shape)`` are dropped (``point2voxel = -1``). For interpolation voxel ``i``'s feature sits at
the world position ``aabb_min + i * voxel_size`` - its *min corner*, which is exactly where the reference's
``grid_sample(align_corners=True)`` puts grid index ``i`` (see ``sampling.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .kernel_map import CoordIndex, KernelMap, build_downsample_map, build_submanifold_map

ArrayLike3 = Union[Tensor, Sequence[float]]


class KernelMapCache:
    """Kernel maps, coordinate hashes and down-sampled coordinates of one set of input coordinates.

    The seed points of a segment never move, so one cache built on the first forward serves every later forward
    of the segment: keep the object and pass it again (``SparseTensor(..., cache=cache)`` or
    ``SparseUNet.forward(x, cache=cache)``). Entries are keyed by tensor stride / (kind, stride, kernel, conv
    stride). If coordinates different from the cached ones (values or device) arrive at a stride, the whole cache
    is cleared and rebuilt (counted in ``invalidations``). ``builds`` counts what was built, ``hits`` what was
    reused.
    """

    def __init__(self, fused_lookup: bool = False) -> None:
        self.fused_lookup = fused_lookup
        """Kernel maps are built by the Triton kernels of :mod:`.fused_maps` where they apply (submanifold: one
        look-up kernel; strided: three kernels), and :func:`.sampling.sample_volume` looks the volume's corners up
        with the same look-up kernel."""
        self._coords: Dict[int, Tensor] = {}
        self._ranges: Dict[int, Optional[Tuple[int, int, int]]] = {}
        self._index: Dict[int, CoordIndex] = {}
        self._maps: Dict[tuple, KernelMap] = {}
        self.builds: Counter = Counter()
        self.hits = 0
        self.invalidations = 0

    # ------------------------------------------------------------------------------------------------ bookkeeping
    @property
    def num_builds(self) -> int:
        """Kernel maps and coordinate hashes built so far (a forward that reuses everything adds 0)."""
        return sum(self.builds.values())

    def clear(self) -> None:
        self._coords.clear()
        self._ranges.clear()
        self._index.clear()
        self._maps.clear()

    def strides(self):
        return sorted(self._coords)

    def coords(self, stride: int) -> Tensor:
        return self._coords[stride]

    def __repr__(self) -> str:
        return (f"KernelMapCache(strides={self.strides()}, maps={sorted(self._maps)}, builds={dict(self.builds)}, "
                f"hits={self.hits}, invalidations={self.invalidations})")

    def bind(self, coords: Tensor, stride: int = 1, spatial_range=None) -> Tensor:
        """Register ``coords`` at ``stride`` (or check them against the cached ones); returns the cached tensor."""
        cached = self._coords.get(stride)
        if cached is not None:
            if cached is coords:
                return cached
            if (cached.shape == coords.shape and cached.device == coords.device
                    and self._ranges.get(stride) == _norm_range(spatial_range) and torch.equal(cached, coords)):
                return cached
            self.invalidations += 1
            self.clear()
        self._coords[stride] = coords
        self._ranges[stride] = _norm_range(spatial_range)
        return coords

    # ------------------------------------------------------------------------------------------------ look-ups
    def coord_index(self, stride: int = 1) -> CoordIndex:
        """Hash of the coordinates at ``stride`` (also usable by :func:`sample_sparse_volume`)."""
        idx = self._index.get(stride)
        if idx is None:
            idx = CoordIndex(self._coords[stride])
            self._index[stride] = idx
            self.builds["index"] += 1
        return idx

    def submanifold(self, coords: Tensor, stride: int, kernel_size: int = 3, spatial_range=None) -> KernelMap:
        coords = self.bind(coords, stride, spatial_range)
        key = ("subm", stride, kernel_size)
        km = self._maps.get(key)
        if km is not None:
            self.hits += 1
            return km
        km = build_submanifold_map(coords, self.coord_index(stride), kernel_size, fused=self.fused_lookup)
        self._maps[key] = km
        self.builds["subm"] += 1
        return km

    def downsample(self, coords: Tensor, stride: int, kernel_size: int = 3, conv_stride: int = 2,
                   spatial_range=None) -> Tuple[KernelMap, Tensor, Optional[Tuple[int, int, int]]]:
        coords = self.bind(coords, stride, spatial_range)
        key = ("down", stride, kernel_size, conv_stride)
        out_stride = stride * conv_stride
        km = self._maps.get(key)
        if km is not None:
            self.hits += 1
            return km, self._coords[out_stride], self._ranges[out_stride]
        km, out, out_range = build_downsample_map(coords, kernel_size, conv_stride, spatial_range,
                                                  fused=self.fused_lookup)
        prev = self._coords.get(out_stride)
        if prev is not None and not (prev.shape == out.shape and torch.equal(prev, out)):
            raise ValueError(f"two strided convolutions produce different coordinates at stride {out_stride}; "
                             "use separate KernelMapCache objects")
        if prev is None:
            self._coords[out_stride] = out
            self._ranges[out_stride] = out_range
            if km.output_index is not None and out_stride not in self._index:  # built with the map (fused path)
                self._index[out_stride] = km.output_index
                self.builds["index"] += 1
        self._maps[key] = km
        self.builds["down"] += 1
        return km, self._coords[out_stride], self._ranges[out_stride]

    def upsample(self, coarse_coords: Tensor, coarse_stride: int, kernel_size: int = 3, conv_stride: int = 2
                 ) -> Tuple[KernelMap, Tensor, Optional[Tuple[int, int, int]]]:
        """Map of the strided conv ``coarse_stride // conv_stride -> coarse_stride`` (to be used transposed) and the
        finer level's coordinates, which the transposed convolution reproduces exactly."""
        fine_stride = coarse_stride // conv_stride
        key = ("down", fine_stride, kernel_size, conv_stride)
        km = self._maps.get(key)
        cached = self._coords.get(coarse_stride)
        if km is None or cached is None:
            raise ValueError(f"transposed convolution at stride {coarse_stride} needs the map of the strided "
                             f"convolution {fine_stride} -> {coarse_stride} in the same cache (run the down path "
                             "first)")
        if not (cached is coarse_coords or (cached.shape == coarse_coords.shape
                                            and torch.equal(cached, coarse_coords))):
            raise ValueError("the input of the transposed convolution is not the cached coarse level")
        self.hits += 1
        return km, self._coords[fine_stride], self._ranges[fine_stride]


def _norm_range(r) -> Optional[Tuple[int, int, int]]:
    return None if r is None else tuple(int(v) for v in r)


class SparseTensor:
    """Voxel features ``feats [N, C]`` at integer coordinates ``coords [N, 4] = (b, x, y, z)`` (int64).

    ``stride`` is the tensor stride (1, 2, 4, 8: coordinates are in units of ``stride`` fine voxels),
    ``cache`` the :class:`KernelMapCache` shared by every tensor derived from this one, ``spatial_range`` the
    optional box size ``(X, Y, Z)`` at this stride (changes the strided-conv output rule, see ``kernel_map``;
    the reference does not set it).
    """

    def __init__(self, feats: Tensor, coords: Tensor, stride: int = 1, cache: Optional[KernelMapCache] = None,
                 spatial_range: Optional[Sequence[int]] = None):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (b, x, y, z), got {tuple(coords.shape)}")
        if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats must be [N, C] with N = {coords.shape[0]}, got {tuple(feats.shape)}")
        if coords.dtype != torch.long:
            coords = coords.long()
        self.feats = feats
        self.coords = coords
        self.stride = int(stride)
        self.cache = cache if cache is not None else KernelMapCache()
        self.spatial_range = _norm_range(spatial_range)

    # torchsparse-style aliases
    @property
    def F(self) -> Tensor:
        return self.feats

    @property
    def C(self) -> Tensor:
        return self.coords

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    def replace(self, feats: Tensor) -> "SparseTensor":
        """Same coordinates / stride / cache, new features."""
        return SparseTensor(feats, self.coords, self.stride, self.cache, self.spatial_range)

    def detach(self) -> "SparseTensor":
        return self.replace(self.feats.detach())

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        if not isinstance(other, SparseTensor):
            return self.replace(self.feats + other)
        if other.stride != self.stride or other.coords.shape != self.coords.shape:
            raise ValueError("adding sparse tensors with different coordinates")
        if other.coords is not self.coords and not torch.equal(other.coords, self.coords):
            raise ValueError("adding sparse tensors with different coordinates")
        return self.replace(self.feats + other.feats)

    def to(self, device) -> "SparseTensor":
        return SparseTensor(self.feats.to(device), self.coords.to(device), self.stride, self.cache,
                            self.spatial_range)

    def dense(self, shape: Optional[Sequence[int]] = None) -> Tensor:
        """Dense ``[B, C, X, Y, Z]`` volume (tests / debugging; allocates the whole box)."""
        if shape is None:
            shape = (self.coords[:, 1:].max(0).values + 1).tolist()
        b = int(self.coords[:, 0].max()) + 1 if self.num_voxels else 1
        out = self.feats.new_zeros((b, self.feats.shape[1], *[int(s) for s in shape]))
        c = self.coords
        out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return out

    @classmethod
    def from_points(cls, points: Tensor, voxel_size: float, aabb_min: ArrayLike3, aabb_max: ArrayLike3,
                    feats: Optional[Tensor] = None, cache: Optional[KernelMapCache] = None,
                    batch_index: Optional[Tensor] = None) -> Tuple["SparseTensor", Tensor]:
        """Voxelise points (mean of the features of the points of a voxel). Returns the tensor and ``point2voxel``
        ``[N]`` (row of each point's voxel, -1 for points outside the box). ``feats`` defaults to ones ``[N, 1]``."""
        coords, vfeats, p2v, _ = voxelize_points(points, voxel_size, aabb_min, aabb_max, feats, batch_index)
        return cls(vfeats, coords, 1, cache), p2v


def grid_shape_for(aabb_min: ArrayLike3, aabb_max: ArrayLike3, voxel_size: float) -> Tuple[int, int, int]:
    """Voxels per axis of the box: ``floor((aabb_max - aabb_min) / voxel_size + 1e-6)`` (at least 1)."""
    lo = torch.as_tensor(aabb_min, dtype=torch.float64).cpu()
    hi = torch.as_tensor(aabb_max, dtype=torch.float64).cpu()
    n = torch.floor((hi - lo) / float(voxel_size) + 1e-6).long().clamp(min=1)
    return tuple(int(v) for v in n.tolist())  # type: ignore[return-value]


def voxelize_points(points: Tensor, voxel_size: float, aabb_min: ArrayLike3, aabb_max: ArrayLike3,
                    feats: Optional[Tensor] = None, batch_index: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, Tuple[int, int, int]]:
    """``(coords [V, 4] sorted by (b, x, y, z), mean feats [V, C], point2voxel [N], grid_shape)``."""
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    device = points.device
    n = int(points.shape[0])
    if feats is None:
        feats = points.new_ones((n, 1))
    shape = grid_shape_for(aabb_min, aabb_max, voxel_size)
    lo = torch.as_tensor(aabb_min, dtype=points.dtype, device=device).reshape(3)
    ijk = torch.floor((points - lo) / voxel_size).long()
    shp = torch.tensor(shape, dtype=torch.long, device=device)
    inside = ((ijk >= 0) & (ijk < shp)).all(1)
    b = batch_index.long().to(device) if batch_index is not None else torch.zeros(n, dtype=torch.long, device=device)
    sel = inside.nonzero().squeeze(1)
    bs = b[sel]
    bmax = int(bs.max()) + 1 if sel.numel() else 1
    st = [shape[0] * shape[1] * shape[2], shape[1] * shape[2], shape[2]]
    if bmax * st[0] >= (1 << 62):
        raise ValueError("box too large to ravel into int64 keys")
    key = bs * st[0] + ijk[sel, 0] * st[1] + ijk[sel, 1] * st[2] + ijk[sel, 2]
    ukeys, inv = torch.unique(key, sorted=True, return_inverse=True)
    v = int(ukeys.shape[0])
    coords = torch.empty((v, 4), dtype=torch.long, device=device)
    rem = ukeys
    for i, s in enumerate(st + [1]):
        coords[:, i] = torch.div(rem, s, rounding_mode="floor")
        rem = rem - coords[:, i] * s
    f = feats[sel]
    sums = f.new_zeros((v, f.shape[1])).index_add(0, inv, f)
    cnt = torch.zeros(v, dtype=f.dtype, device=device).index_add_(0, inv, torch.ones_like(inv, dtype=f.dtype))
    vfeats = sums / cnt[:, None]
    p2v = torch.full((n,), -1, dtype=torch.long, device=device)
    p2v[sel] = inv
    return coords, vfeats, p2v, shape


@dataclass
class VoxelGrid:
    """A voxelised point set with its geometry and kernel-map cache (what a segment keeps between batches)."""

    coords: Tensor  # [V, 4] (b, x, y, z)
    feats: Tensor  # [V, C] mean feature of the points of each voxel
    point2voxel: Tensor  # [N] row of each point's voxel, -1 if dropped
    voxel_size: float
    aabb_min: Tensor  # [3]
    grid_shape: Tuple[int, int, int]
    kernel_maps: KernelMapCache = field(default_factory=KernelMapCache)

    def tensor(self, feats: Optional[Tensor] = None) -> SparseTensor:
        """The input sparse tensor (sharing this grid's kernel-map cache)."""
        return SparseTensor(self.feats if feats is None else feats, self.coords, 1, self.kernel_maps)

    def index(self) -> CoordIndex:
        """Coordinate hash at stride 1 (shared with the submanifold convolutions)."""
        self.kernel_maps.bind(self.coords, 1)
        return self.kernel_maps.coord_index(1)

    @property
    def aabb_max(self) -> Tensor:
        return self.aabb_min + torch.tensor(self.grid_shape, dtype=self.aabb_min.dtype,
                                            device=self.aabb_min.device) * self.voxel_size


def voxelize(points: Tensor, feats: Optional[Tensor], voxel_size: float, aabb_min: Optional[ArrayLike3] = None,
             aabb_max: Optional[ArrayLike3] = None, fused_lookup: bool = False) -> VoxelGrid:
    """Voxelise ``points [N, 3]`` with features ``feats [N, C]`` (mean per voxel) at ``voxel_size``.

    Without a box, ``aabb_min = points.min(0)`` and ``aabb_max = points.max(0) + voxel_size`` (every point kept).
    ``fused_lookup``: the grid's kernel-map cache builds its maps, and the volume is sampled, with the fused
    kernels (:class:`KernelMapCache`).
    """
    if aabb_min is None:
        aabb_min = points.detach().min(0).values
    if aabb_max is None:
        aabb_max = points.detach().max(0).values + voxel_size
    coords, vfeats, p2v, shape = voxelize_points(points.detach(), voxel_size, aabb_min, aabb_max, feats)
    lo = torch.as_tensor(aabb_min, dtype=points.dtype, device=points.device).reshape(3).clone()
    return VoxelGrid(coords, vfeats, p2v, float(voxel_size), lo, shape, KernelMapCache(fused_lookup=fused_lookup))
