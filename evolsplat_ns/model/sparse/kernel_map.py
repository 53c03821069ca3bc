"""Coordinate hashing and kernel maps, in pure PyTorch (CPU and CUDA, no Python loop over points).

Conventions (shared by the whole package)
-----------------------------------------
* Coordinates are integer rows ``(b, x, y, z)`` (int64 inside the package), non-negative spatial indices, *in
  units of the tensor's own resolution*: a voxel at tensor stride ``s`` with coordinate ``x`` covers fine voxels
  ``[s*x, s*x + s)`` (torchsparse 2.1 stores coordinates the same way, batch first).
* **Kernel-offset ordering** (torchsparse 2.1, ``get_kernel_offsets`` and the hashmap kernels of its CUDA
  backend): for a kernel of size ``k`` the offset index is ``w = a + k*b + k*k*c`` where ``(a, b, c)`` is the
  position inside the kernel along ``(x, y, z)`` - *x varies fastest*. Weights are ``[k^3, C_in, C_out]``.
  - submanifold conv (stride 1): output ``o`` reads input ``o + (a, b, c) - (k-1)/2``, i.e. offsets
    ``(dx, dy, dz) in {-1,0,1}^3`` with ``w = (dx+1) + 3 (dy+1) + 9 (dz+1)``;
  - strided conv (stride ``s``, padding 0): output ``o`` reads input ``s*o + (a, b, c)``;
  - transposed conv: the same pairs as the strided conv read the other way (coarse ``o`` -> fine ``s*o + (a,b,c)``)
    with the *same* weight index (torchsparse transposes the map, not the kernel).
  In all three cases the dense equivalent uses ``dense_kernel[..., a, b, c] = weight[w]`` on a volume laid out
  ``[B, C, X, Y, Z]`` (see :func:`sparse_weight_to_dense`), so checkpoints of torchsparse 2.1 ``spnn.Conv3d``
  (``kernel`` parameter) load unchanged.
* **Strided output rule** (torchsparse 2.1, ``spconv`` down-sampling mode used by default for kernel 3 / stride 2;
  ``spnn.Conv3d`` passes padding 0 when the stride is not 1): the output coordinates are exactly the non-empty
  outputs of a dense ``conv3d(kernel=k, stride=s, padding=0)`` over the box ``[0, M]`` per axis, i.e.

      O = { o : 0 <= o_a <= (M_a - (k - 1)) // s  and  exists input p with s*o_a <= p_a <= s*o_a + k - 1 }

  where ``M_a`` is the largest input coordinate along axis ``a`` (over all batch items) or ``spatial_range_a - 1``
  when the tensor carries a ``spatial_range``. For k=3, s=2 an even coordinate ``p`` feeds outputs ``p/2`` and
  ``p/2 - 1``, an odd one feeds ``(p-1)/2``; inputs on the far border (``p_a = M_a`` with ``M_a`` odd) reach no
  output. Output rows are sorted lexicographically by ``(b, x, y, z)`` (torchsparse sorts the raveled keys too).
  This is *not* the floor rule ``{floor(p/2)}``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import fused_maps

_MAX_KEY = 1 << 62
DENSE_TABLE_CELLS = 1 << 26
"""Boxes of at most this many cells are indexed by a dense ``int32`` table (<= 256 MiB): a lookup is one gather
instead of a binary search. Larger boxes (kilometre-scale scenes) use the sorted keys."""


def host_to_device(values, device) -> Tensor:
    """A small int64 tensor of ``values`` (a list, or a CPU tensor) on ``device``, copied without making the host wait
    for the device: a plain host-to-device copy of pageable memory synchronises the stream, pinned + non-blocking does
    not (the caching host allocator keeps the pinned block until the copy is done)."""
    t = torch.as_tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def kernel_offsets(kernel_size: int = 3, device=None) -> Tensor:
    """Kernel positions ``(a, b, c)`` in ``[0, k)^3`` as a ``[k^3, 3]`` int64 tensor, index ``a + k b + k^2 c``."""
    r = torch.arange(kernel_size, device=device)
    c, b, a = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([a.reshape(-1), b.reshape(-1), c.reshape(-1)], dim=1)


def sparse_weight_to_dense(weight: Tensor, transposed: bool = False) -> Tensor:
    """``[k^3, C_in, C_out]`` -> ``conv3d`` weight ``[C_out, C_in, k, k, k]`` (``conv_transpose3d``:
    ``[C_in, C_out, k, k, k]``) for a dense volume laid out ``[B, C, X, Y, Z]``."""
    kv, cin, cout = weight.shape
    k = round(kv ** (1.0 / 3.0))
    assert k**3 == kv, "kernel volume must be a cube"
    # index w = a + k b + k^2 c  ->  view [c, b, a]
    w = weight.reshape(k, k, k, cin, cout).permute(3, 4, 2, 1, 0)  # [C_in, C_out, a, b, c]
    if transposed:
        return w.contiguous()
    return w.transpose(0, 1).contiguous()


def dense_weight_to_sparse(dense: Tensor, transposed: bool = False) -> Tensor:
    """Inverse of :func:`sparse_weight_to_dense`."""
    if not transposed:
        dense = dense.transpose(0, 1)  # -> [C_in, C_out, a, b, c]
    cin, cout, k = dense.shape[0], dense.shape[1], dense.shape[2]
    return dense.permute(4, 3, 2, 0, 1).reshape(k**3, cin, cout).contiguous()


class CoordIndex:
    """Hash of a set of integer coordinate rows ``[N, D]``.

    Rows are raveled over their bounding box, which is exact (no collisions) whenever the box has fewer than 2^62
    cells; queries outside the box are answered "absent" without being raveled. A box of at most
    ``dense_cells`` (default :data:`DENSE_TABLE_CELLS`) cells is indexed by a dense table (key -> row, one gather per query, the common case: a
    driving segment at 0.1 m has ~10^7 cells); a larger one by sorted keys and ``torch.searchsorted``. Both give
    the same answers (tested).
    """

    def __init__(self, coords: Tensor, dense_cells: Optional[int] = None):
        if coords.dim() != 2:
            raise ValueError(f"coords must be [N, D], got {tuple(coords.shape)}")
        coords = coords.long()
        self.n = int(coords.shape[0])
        self.dim = int(coords.shape[1])
        self.device = coords.device
        if self.n == 0:
            self.lo = torch.zeros(self.dim, dtype=torch.long, device=self.device)
            self.hi = self.lo - 1
            sizes = [0] * self.dim
        else:
            self.lo = coords.min(0).values
            self.hi = coords.max(0).values
            sizes = (self.hi - self.lo + 1).tolist()
        strides = [1] * self.dim
        for i in range(self.dim - 2, -1, -1):
            strides[i] = strides[i + 1] * max(sizes[i + 1], 1)
        if self.n and strides[0] * sizes[0] >= _MAX_KEY:
            raise ValueError(f"coordinate box {sizes} too large to ravel into int64 keys")
        self.sizes = sizes
        self.strides = torch.tensor(strides, dtype=torch.long, device=self.device)
        keys = self.ravel(coords)
        dense_cells = DENSE_TABLE_CELLS if dense_cells is None else dense_cells
        self.table: Optional[Tensor] = None
        self.num_cells = strides[0] * sizes[0] if self.n else 0
        if self.n and self.num_cells <= dense_cells:
            # Duplicate rows: the last write wins, as the sorted search may return any of them.
            self.table = torch.full((self.num_cells,), -1, dtype=torch.int32, device=self.device)
            self.table[keys] = torch.arange(self.n, dtype=torch.int32, device=self.device)
        else:
            self.sorted_keys, self.perm = torch.sort(keys)

    @classmethod
    def from_dense_table(cls, n: int, lo: Sequence[int], hi: Sequence[int], strides: Sequence[int],
                         table: Tensor) -> "CoordIndex":
        """An index whose box (``lo``..``hi`` inclusive, raveled with ``strides``) and dense table (key -> row, -1
        where empty) are known already: a fused strided map's output rows (:func:`build_downsample_map`), whose
        coarse box and cell numbering it has at hand. Its box need not be tight; the answers are those of
        ``CoordIndex(rows)``, without reading the rows' extent on the host."""
        self = cls.__new__(cls)
        self.n, self.dim, self.device = int(n), len(lo), table.device
        self.lo, self.hi = host_to_device(list(lo), self.device), host_to_device(list(hi), self.device)
        self.sizes = [int(b) - int(a) + 1 for a, b in zip(lo, hi)]
        self.strides = host_to_device(list(strides), self.device)
        self.num_cells = int(table.shape[0])
        self.table = table
        return self

    def ravel(self, coords: Tensor) -> Tensor:
        """Keys of rows known to lie inside the box (no check)."""
        return ((coords - self.lo) * self.strides).sum(-1)

    def _find(self, keys: Tensor, valid: Tensor) -> Tensor:
        if self.n == 0:
            return torch.full_like(keys, -1)
        if self.table is not None:
            rows = self.table[keys.clamp(0, self.num_cells - 1)].long()
            return torch.where(valid, rows, torch.full_like(rows, -1))
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_(max=self.n - 1)
        found = valid & (self.sorted_keys[pos] == keys)
        return torch.where(found, self.perm[pos], torch.full_like(pos, -1))

    def lookup(self, query: Tensor) -> Tensor:
        """Row index of each query row ``[..., D]`` or -1."""
        query = query.long()
        valid = ((query >= self.lo) & (query <= self.hi)).all(-1)
        keys = self.ravel(torch.minimum(torch.maximum(query, self.lo), self.hi))
        return self._find(keys, valid)

    def lookup_offsets(self, coords: Tensor, offsets: Tensor, fused: bool = False) -> Tensor:
        """``[N, K]`` indices of ``coords[n] + offsets[k]`` (offsets ``[K, D]``), -1 where absent.

        Uses the linearity of the raveling, key(c + d) = key(c) + key'(d), which holds whenever ``c + d`` lies in
        the box (``c`` itself need not); queries outside the box are masked per axis.

        ``fused``: one Triton kernel instead of ~40 PyTorch operations (:mod:`.fused_maps`; int32 indices, same
        values), where it applies: a dense-table index of ``(b, x, y, z)`` rows, on CUDA or under Triton's CPU
        interpreter; elsewhere the PyTorch path runs. Off by default until it is measured on the GPU.
        """
        coords = coords.long()
        offs = offsets.detach().long().cpu().tolist()  # give CPU offsets: reading device ones waits for the device
        offsets = host_to_device(offs, coords.device)
        if fused and self.table is not None and self.dim == 4 and self.n > 0 and fused_maps.available(coords):
            return fused_maps.lookup_offsets_dense(coords, offsets, self.lo, self.hi, self.strides, self.table)
        base = ((coords - self.lo) * self.strides).sum(-1)  # [N]
        valid = torch.ones((coords.shape[0], 1), dtype=torch.bool, device=coords.device)
        for d in range(self.dim):  # loop over the (<= 4) axes only
            if all(o[d] == 0 for o in offs):
                q = coords[:, d : d + 1]
            else:
                q = coords[:, d : d + 1] + offsets[None, :, d]
            valid = valid & (q >= self.lo[d]) & (q <= self.hi[d])
        keys = base[:, None] + (offsets * self.strides).sum(-1)[None, :]
        return self._find(keys, valid.expand(keys.shape))


class KernelMap:
    """The pairs of one sparse convolution, kept as a neighbour table ``table [n_out, K]`` (int32: the input row
    that output row ``o`` reads with weight ``k``, -1 for none), with two derived layouts built on first use:

    * for the gather-scatter path (:mod:`.ops`): the pairs grouped by weight index and padded to a rectangle.
      ``in_idx[j, p]`` / ``out_idx[j, p]`` is the ``p``-th pair of group ``j``, which uses weight ``ks[j]``.
      Padding entries of column ``p`` hold ``n_in + p`` / ``n_out + p`` (past the last row: zero rows are appended
      when gathering, and padded products land in scratch rows that are dropped, spread so that atomics do not
      pile up on one address). ``identity_k`` (submanifold maps) is the centre weight, whose pairs are ``(i, i)``
      for every row and are handled by one dense matmul instead;
    * for the implicit-GEMM path (:mod:`.igemm`): :meth:`inverse`, the output row each input row feeds per weight
      (``[n_in, K]``; a submanifold map is its own inverse with the columns reversed, so none is stored).
    """

    def __init__(self, table: Tensor, n_in: int, identity_k: Optional[int] = None, min_chunk: int = 256,
                 inverse: Optional[Tensor] = None):
        self.table = table.to(torch.int32).contiguous()
        self.n_in = int(n_in)
        self.identity_k = identity_k
        self.min_chunk = min_chunk
        self._groups: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._inverse: Optional[Tensor] = inverse  # given when the builder had it at hand (fused strided maps)
        self.output_index: Optional[CoordIndex] = None
        """The index of the output rows, when the builder had it at hand (fused strided maps; else None)."""

    @property
    def n_out(self) -> int:
        return int(self.table.shape[0])

    @property
    def kernel_volume(self) -> int:
        return int(self.table.shape[1])

    @property
    def symmetric(self) -> bool:
        """A submanifold map: input and output rows are the same set and offset ``k`` is the opposite of
        ``K - 1 - k``."""
        return self.identity_k is not None

    @property
    def in_idx(self) -> Tensor:
        return self._grouped()[0]

    @property
    def out_idx(self) -> Tensor:
        return self._grouped()[1]

    @property
    def ks(self) -> Tensor:
        return self._grouped()[2]

    def inverse(self) -> Tensor:
        """``[n_in, K]`` int32: the output row that input row ``i`` feeds with weight ``k`` (-1 for none). Each
        (input, weight) feeds at most one output for every map built here. Built once, without host reads."""
        if self._inverse is None:
            n_out, kv = self.table.shape
            dev = self.table.device
            flat = torch.full((self.n_in * kv + 1,), -1, dtype=torch.int32, device=dev)
            k = torch.arange(kv, device=dev)[None, :]
            dest = torch.where(self.table >= 0, self.table.long() * kv + k, self.n_in * kv)  # the rest: a scratch slot
            flat[dest] = torch.arange(n_out, dtype=torch.int32, device=dev)[:, None].expand(n_out, kv)
            self._inverse = flat[:-1].view(self.n_in, kv)
        return self._inverse

    @property
    def num_pairs(self) -> int:
        return int((self.table >= 0).sum())

    def pairs(self) -> Tuple[Tensor, Tensor, Tensor]:
        """All ``(in, out, weight index)`` pairs, mainly for tests and debugging."""
        o, k = (self.table >= 0).nonzero(as_tuple=True)
        return self.table[o, k].long(), o, k

    def to(self, device) -> "KernelMap":
        return KernelMap(self.table.to(device), self.n_in, self.identity_k, self.min_chunk)

    def _grouped(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The grouped pairs of the gather-scatter path (class docstring).

        Groups are cut into chunks of equal length ``c`` (about a quarter of the mean group size, at least
        ``min_chunk``) so that padding stays small when the offsets have very different pair counts (surfaces:
        in-plane offsets have ~N pairs, the others few); several chunks may share one weight index.

        One host read: the ``K`` pair counts (every size below follows from them); the pairs are then listed with
        a fixed-size ``nonzero_static``, so on CUDA nothing else waits for the device.
        """
        if self._groups is not None:
            return self._groups
        table, n_in, identity_k, min_chunk = self.table, self.n_in, self.identity_k, self.min_chunk
        n_out, kv = table.shape
        device = table.device
        ks_list = [k for k in range(kv) if k != identity_k]
        t = table.t()
        if identity_k is not None:
            t = t.index_select(0, host_to_device(ks_list, device))
        mask = t >= 0  # [G, n_out], G = groups kept (empty ones yield no chunk)
        counts = mask.sum(1).tolist()  # the one host read
        total, n_groups = sum(counts), sum(1 for c in counts if c > 0)
        if n_groups == 0:
            empty = torch.zeros((0, 0), dtype=torch.long, device=device)
            self._groups = (empty, empty.clone(), torch.zeros(0, dtype=torch.long, device=device))
            return self._groups
        chunk = min(max(counts), max(min_chunk, -(-total // (4 * n_groups))))
        if chunk >= 1024:
            chunk = -(-chunk // 8) * 8  # lets the weight-gradient reduction split evenly (ops._grouped_weight_grad)
        n_chunks = [-(-c // chunk) for c in counts]
        first_chunk, start, r0, s0 = [], [], 0, 0
        for c, nc in zip(counts, n_chunks):
            first_chunk.append(r0)
            start.append(s0)
            r0, s0 = r0 + nc, s0 + c
        ks = host_to_device([k for k, nc in zip(ks_list, n_chunks) for _ in range(nc)], device)
        r, c = torch.nonzero_static(mask, size=total).unbind(1)  # row-major: by group, then output row
        pos = torch.arange(total, device=device) - host_to_device(start, device)[r]
        row = host_to_device(first_chunk, device)[r] + torch.div(pos, chunk, rounding_mode="floor")
        col = pos - torch.div(pos, chunk, rounding_mode="floor") * chunk
        in_idx = torch.full((r0, chunk), n_in, dtype=torch.long, device=device)
        out_idx = torch.full((r0, chunk), n_out, dtype=torch.long, device=device)
        in_idx[row, col] = t[r, c].long()
        out_idx[row, col] = c
        self._groups = (in_idx, out_idx, ks)
        return self._groups


def build_submanifold_map(coords: Tensor, index: CoordIndex, kernel_size: int = 3, min_chunk: int = 256,
                          fused: bool = False) -> KernelMap:
    """Submanifold map (stride 1, output coordinates = input coordinates) of an odd kernel (``fused``: the
    neighbour look-up in one Triton kernel where it applies, :meth:`CoordIndex.lookup_offsets`)."""
    if kernel_size % 2 != 1:
        raise ValueError("submanifold convolution needs an odd kernel size")
    n = int(coords.shape[0])
    offs = kernel_offsets(kernel_size) - (kernel_size - 1) // 2  # on the CPU: lookup_offsets reads them there
    offs4 = torch.cat([torch.zeros_like(offs[:, :1]), offs], dim=1)
    table = index.lookup_offsets(coords, offs4, fused=fused)  # [N, K]: input row of output n at offset k
    return KernelMap(table, n, identity_k=(kernel_size**3) // 2, min_chunk=min_chunk)


def build_downsample_map(
    coords: Tensor,
    kernel_size: int = 3,
    stride: int = 2,
    spatial_range: Optional[Sequence[int]] = None,
    min_chunk: int = 256,
    fused: bool = False,
) -> Tuple[KernelMap, Tensor, Optional[Tuple[int, int, int]]]:
    """Strided map (padding 0) under torchsparse 2.1's output rule (module docstring).

    Returns the map (input rows = ``coords`` rows, output rows = the returned coarse coordinates), the coarse
    coordinates ``[N_out, 4]`` sorted by ``(b, x, y, z)``, and the coarse ``spatial_range`` (None if none given).
    ``fused``: the flag-table case in three Triton kernels (:func:`.fused_maps.downsample_dense`; same map), where
    it applies (CUDA, or the CPU interpreter); the PyTorch path below is its twin.
    """
    coords = coords.long()
    device = coords.device
    n = int(coords.shape[0])
    k, s = int(kernel_size), int(stride)
    if n == 0:
        empty = torch.zeros((0, 4), dtype=torch.long, device=device)
        kmap = KernelMap(torch.zeros((0, k**3), dtype=torch.long, device=device), 0, min_chunk=min_chunk)
        return kmap, empty, None
    p = coords[:, 1:]
    b = coords[:, 0]
    if spatial_range is not None:
        m = [int(v) - 1 for v in spatial_range]
        out_range = tuple((int(v) - (k - 1) - 1) // s + 1 for v in spatial_range)
        bmin, bmax = torch.stack([b.min(), b.max()]).tolist()  # host read 1 of 3 (the box)
    else:
        bmin, bmax, *m = torch.cat([torch.stack([b.min(), b.max()]), p.max(0).values]).tolist()
        out_range = None
    omax = [(v - (k - 1)) // s for v in m]  # may be negative
    # coarse keys: ravel (b, ox, oy, oz) inside [bmin..bmax] x [0..omax]
    sizes = [bmax - bmin + 1] + [max(v + 1, 1) for v in omax]
    st = [sizes[1] * sizes[2] * sizes[3], sizes[2] * sizes[3], sizes[3], 1]
    if st[0] * sizes[0] >= _MAX_KEY:
        raise ValueError(f"coordinate box {sizes} too large to ravel into int64 keys")
    cells = st[0] * sizes[0]
    if fused and cells <= DENSE_TABLE_CELLS and fused_maps.available(coords):
        table, inverse, out, cell_rows = fused_maps.downsample_dense(coords, k, s, bmin, omax, st, cells)
        km = KernelMap(table, n, min_chunk=min_chunk, inverse=inverse)
        if out.shape[0]:  # then every omax >= 0: the coarse box is [bmin..bmax] x [0..omax]
            km.output_index = CoordIndex.from_dense_table(out.shape[0], [bmin, 0, 0, 0], [bmax, *omax], st, cell_rows)
        return km, out, out_range
    d = torch.arange(k, device=device)
    num = p[:, :, None] - d[None, None, :]  # [N, 3, k]: s*o = p - d
    o = torch.div(num, s, rounding_mode="floor")
    ok = (num - o * s == 0) & (o >= 0) & (o <= host_to_device(omax, device)[None, :, None])  # [N, 3, k]
    ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]  # [N, k]
    key = ((b - bmin) * st[0])[:, None, None, None] + (oz * st[3])[:, :, None, None] \
        + (oy * st[2])[:, None, :, None] + (ox * st[1])[:, None, None, :]  # [N, c, b, a] -> w = a + k b + k^2 c
    valid = ok[:, 2][:, :, None, None] & ok[:, 1][:, None, :, None] & ok[:, 0][:, None, None, :]
    key = key.reshape(n, k**3)
    valid = valid.reshape(n, k**3)
    if cells <= DENSE_TABLE_CELLS:  # the common case: a flag per coarse cell, no sort
        # outputs = the flagged cells in key order (= sorted by (b, x, y, z)); invalid pairs go to a scratch cell
        flags = torch.zeros(cells + 1, dtype=torch.int32, device=device)
        flags[torch.where(valid, key, cells)] = 1
        flags[cells] = 0
        rank = torch.cumsum(flags, 0, dtype=torch.int32)  # 1-based output row of each flagged cell
        n_out = int(rank[-1])  # host read 2 of 3 (the number of outputs)
        ukeys = torch.nonzero_static(flags[:cells], size=n_out).squeeze(1)
        out_row = torch.where(valid, rank[key.clamp(0, cells - 1)].long() - 1, n_out)  # scratch row for the rest
        table = torch.full((n_out + 1, k**3), -1, dtype=torch.long, device=device)
        table[out_row, torch.arange(k**3, device=device)[None, :]] = torch.arange(n, device=device)[:, None]
        table = table[:n_out]
    else:  # kilometre boxes: sort the keys of the valid pairs
        rows, ws = valid.nonzero(as_tuple=True)
        ukeys, inv = torch.unique(key[rows, ws], sorted=True, return_inverse=True)
        n_out = int(ukeys.shape[0])
        table = torch.full((n_out, k**3), -1, dtype=torch.long, device=device)
        table[inv, ws] = rows
    out = torch.empty((n_out, 4), dtype=torch.long, device=device)
    rem = ukeys
    for i in range(4):  # unravel
        out[:, i] = torch.div(rem, st[i], rounding_mode="floor")
        rem = rem - out[:, i] * st[i]
    out[:, 0] += bmin
    return KernelMap(table, n, min_chunk=min_chunk), out, out_range  # host read 3 of 3

