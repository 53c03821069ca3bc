"""Kernel maps built by a few Triton kernels, for a segment seen for the first time (issue 16, item 3).

In PyTorch (:mod:`.kernel_map`, the twin these are tested against) a submanifold map takes ~40 small operations
(per-axis bounds, keys, the table gather) and a strided map ~60, each a kernel launch with its host overhead, and
they write several ``[N, K]`` int64 intermediates. Here:

* :func:`lookup_offsets_dense` (submanifold maps): one launch; each program takes ``BLOCK`` rows, loads their
  coordinates once and, for each of the ``K`` offsets, checks the box, ravels the key and reads the index's dense
  table, writing the ``[N, K]`` int32 neighbour table directly;
* :func:`downsample_dense` (strided maps, torchsparse's output rule): a kernel flags the coarse cells, a ``cumsum``
  numbers them (the one host read: how many), a second kernel fills the neighbour table and its inverse, a third
  unravels the output coordinates. The numbering is also the coarse level's dense hash
  (:meth:`.kernel_map.CoordIndex.from_dense_table`), so that level's index costs no host read of its extent.

Both apply to the dense-table case (boxes of at most :data:`.kernel_map.DENSE_TABLE_CELLS` cells, the common one);
the sorted-key case stays in PyTorch. Selected by ``KernelMapCache(fused_lookup=True)`` (the model option
``fused_kernel_maps``). On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, as the
test suite sets it).
"""

from __future__ import annotations

from torch import Tensor

from . import igemm

triton, tl = igemm.triton, igemm.tl

if triton is not None:

    @triton.jit
    def _load_rows(coords_ptr, r64, ok):
        """The ``(b, x, y, z)`` columns of rows ``r64`` of an ``[N, 4]`` int64 tensor (0 where not ``ok``)."""
        row = coords_ptr + r64 * 4
        return (tl.load(row + 0, mask=ok, other=0), tl.load(row + 1, mask=ok, other=0),
                tl.load(row + 2, mask=ok, other=0), tl.load(row + 3, mask=ok, other=0))

    @triton.jit
    def _lookup_dense_kernel(coords_ptr, offs_ptr, lo_ptr, hi_ptr, strides_ptr, table_ptr, out_ptr, N,  # noqa: ANN001
                             K: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        r64 = rows.to(tl.int64)
        c0, c1, c2, c3 = _load_rows(coords_ptr, r64, ok)
        lo0, lo1, lo2, lo3 = tl.load(lo_ptr + 0), tl.load(lo_ptr + 1), tl.load(lo_ptr + 2), tl.load(lo_ptr + 3)
        hi0, hi1, hi2, hi3 = tl.load(hi_ptr + 0), tl.load(hi_ptr + 1), tl.load(hi_ptr + 2), tl.load(hi_ptr + 3)
        s0, s1, s2, s3 = (tl.load(strides_ptr + 0), tl.load(strides_ptr + 1), tl.load(strides_ptr + 2),
                          tl.load(strides_ptr + 3))
        for k in range(K):
            q0 = c0 + tl.load(offs_ptr + k * 4 + 0)
            q1 = c1 + tl.load(offs_ptr + k * 4 + 1)
            q2 = c2 + tl.load(offs_ptr + k * 4 + 2)
            q3 = c3 + tl.load(offs_ptr + k * 4 + 3)
            inside = ((q0 >= lo0) & (q0 <= hi0) & (q1 >= lo1) & (q1 <= hi1) & (q2 >= lo2) & (q2 <= hi2)
                      & (q3 >= lo3) & (q3 <= hi3))
            key = (q0 - lo0) * s0 + (q1 - lo1) * s1 + (q2 - lo2) * s2 + (q3 - lo3) * s3
            row = tl.load(table_ptr + tl.where(inside, key, 0), mask=ok & inside, other=-1)
            tl.store(out_ptr + r64 * K + k, row, mask=ok)


    @triton.jit
    def _coarse_key(c1, c2, c3, a: tl.constexpr, bb: tl.constexpr, cc: tl.constexpr, S: tl.constexpr,
                    om0, om1, om2, st1, st2):
        """The coarse cell that fine voxel ``(c1, c2, c3)`` feeds at kernel position ``(a, bb, cc)`` (it reads
        ``S * o + (a, bb, cc)``), raveled without its batch term, and whether it exists (inside ``[0, omax]``)."""
        n0 = c1 - a
        n1 = c2 - bb
        n2 = c3 - cc
        o0 = tl.where(n0 >= 0, n0, 0) // S
        o1 = tl.where(n1 >= 0, n1, 0) // S
        o2 = tl.where(n2 >= 0, n2, 0) // S
        ok = ((n0 >= 0) & (n0 - o0 * S == 0) & (o0 <= om0) & (n1 >= 0) & (n1 - o1 * S == 0) & (o1 <= om1)
              & (n2 >= 0) & (n2 - o2 * S == 0) & (o2 <= om2))
        return o0 * st1 + o1 * st2 + o2, ok

    @triton.jit
    def _down_kernel(coords_ptr, cells_ptr, table_ptr, inv_ptr, N, bmin, st0, st1, st2, om0, om1,  # noqa: ANN001
                     om2, KS: tl.constexpr, S: tl.constexpr, FILL: tl.constexpr, BLOCK: tl.constexpr):
        """Each fine voxel's coarse cells: FILL False sets their flags (``cells_ptr``: int32 per cell); FILL True
        reads their 1-based numbers (``cells_ptr``: the flags' cumsum) and writes the neighbour table and its
        inverse."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        r64 = rows.to(tl.int64)
        c0, c1, c2, c3 = _load_rows(coords_ptr, r64, ok)
        base = (c0 - bmin) * st0
        for cc in tl.static_range(KS):
            for bb in tl.static_range(KS):
                for a in tl.static_range(KS):
                    key, valid = _coarse_key(c1, c2, c3, a, bb, cc, S, om0, om1, om2, st1, st2)
                    m = ok & valid
                    if FILL:
                        out_row = tl.load(cells_ptr + tl.where(m, base + key, 0), mask=m, other=0) - 1
                        w = a + KS * bb + KS * KS * cc
                        tl.store(table_ptr + out_row.to(tl.int64) * (KS * KS * KS) + w, rows, mask=m)
                        tl.store(inv_ptr + r64 * (KS * KS * KS) + w, out_row, mask=ok)  # -1 where none
                    else:
                        tl.store(cells_ptr + base + key, tl.full((BLOCK,), 1, tl.int32), mask=m)

    @triton.jit
    def _unravel_kernel(keys_ptr, out_ptr, M, bmin, st0, st1, st2, BLOCK: tl.constexpr):  # noqa: ANN001
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < M
        r64 = rows.to(tl.int64)
        key = tl.load(keys_ptr + r64, mask=ok, other=0)
        b = key // st0
        rem = key - b * st0
        x = rem // st1
        rem = rem - x * st1
        y = rem // st2
        z = rem - y * st2
        tl.store(out_ptr + r64 * 4 + 0, b + bmin, mask=ok)
        tl.store(out_ptr + r64 * 4 + 1, x, mask=ok)
        tl.store(out_ptr + r64 * 4 + 2, y, mask=ok)
        tl.store(out_ptr + r64 * 4 + 3, z, mask=ok)


BLOCK = 256


def available(coords: Tensor) -> bool:
    """Whether the kernels here can run on ``coords``' device (CUDA, or the CPU interpreter)."""
    return triton is not None and (coords.is_cuda or igemm.interpreting())


def lookup_offsets_dense(coords: Tensor, offsets: Tensor, lo: Tensor, hi: Tensor, strides: Tensor,
                         table: Tensor) -> Tensor:
    """``[N, K]`` int32: the row of ``coords[n] + offsets[k]`` in a dense-table index, -1 where absent.

    Args:
        coords: ``[N, 4]`` int64 rows ``(b, x, y, z)``.
        offsets: ``[K, 4]`` int64, on ``coords``' device.
        lo, hi: ``[4]`` int64, the index's box (inclusive); strides ``[4]`` int64, its raveling.
        table: ``[cells]`` int32, the index's key -> row table (-1: empty).
    """
    n, kv = int(coords.shape[0]), int(offsets.shape[0])
    if coords.shape[1] != 4 or offsets.shape[1] != 4:
        raise ValueError(f"fused lookup needs [N, 4] coordinates and [K, 4] offsets, got {tuple(coords.shape)}, "
                         f"{tuple(offsets.shape)}")
    out = table.new_empty((n, kv))
    if n == 0:
        return out
    coords = coords.long().contiguous()
    _lookup_dense_kernel[(triton.cdiv(n, BLOCK),)](coords, offsets.long().contiguous(), lo, hi, strides, table, out, n,
                                                   K=kv, BLOCK=BLOCK)
    return out


def downsample_dense(coords: Tensor, kernel_size: int, stride: int, bmin: int, omax, st, cells: int):
    """The flag-table path of :func:`.kernel_map.build_downsample_map` in three Triton kernels (flag the coarse
    cells, fill the neighbour table and its inverse, unravel the output coordinates) around a ``cumsum`` and a
    ``nonzero_static``.

    ``coords [N, 4]`` int64; ``bmin``, ``omax`` (the largest coarse index per axis; negative: no output), the
    strides ``st`` of the coarse box's raveling (``(b, x, y, z)``, ``z`` fastest) and its cell count ``cells``, as
    that function computes them. Returns the
    ``[N_out, K]`` int32 table (input row per output and kernel position, -1 for none), its inverse ``[N, K]``
    int32 (output row per input and kernel position: :meth:`.kernel_map.KernelMap.inverse`, which the implicit-GEMM
    path needs, written in the same pass), the output coordinates ``[N_out, 4]`` sorted by ``(b, x, y, z)``, and
    ``[cells]`` int32: the output row of each coarse cell, -1 where none (a dense index of the output rows, so the
    next level's hash costs no host read). One host read: the number of outputs.
    """
    import torch

    n, k = int(coords.shape[0]), int(kernel_size)
    st0, st1, st2 = (int(v) for v in st[:3])
    coords = coords.long().contiguous()
    grid = (triton.cdiv(n, BLOCK),)
    args = (n, int(bmin), st0, st1, st2, *[int(v) for v in omax])
    flags = torch.zeros(cells, dtype=torch.int32, device=coords.device)
    _down_kernel[grid](coords, flags, flags, flags, *args, KS=k, S=int(stride), FILL=False, BLOCK=BLOCK)
    rank = torch.cumsum(flags, 0, dtype=torch.int32)  # 1-based output row of each flagged cell
    n_out = int(rank[-1]) if cells else 0  # the host read
    table = torch.full((n_out, k ** 3), -1, dtype=torch.int32, device=coords.device)
    inverse = torch.empty((n, k ** 3), dtype=torch.int32, device=coords.device)
    _down_kernel[grid](coords, rank, table, inverse, *args, KS=k, S=int(stride), FILL=True, BLOCK=BLOCK)
    keys = torch.nonzero_static(flags, size=n_out).squeeze(1)
    out = torch.empty((n_out, 4), dtype=torch.long, device=coords.device)
    if n_out:
        _unravel_kernel[(triton.cdiv(n_out, BLOCK),)](keys, out, n_out, int(bmin), st0, st1, st2, BLOCK=BLOCK)
    cell_rows = torch.where(flags > 0, rank - 1, -1)  # the output rows' dense index (CoordIndex.from_dense_table)
    return table, inverse, out, cell_rows
