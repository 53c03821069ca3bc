"""Kernel-map building in one Triton kernel per map, for a segment seen for the first time (issue 16, item 3).

:meth:`.kernel_map.CoordIndex.lookup_offsets` in PyTorch takes ~40 small operations per submanifold map (per-axis
bounds, keys, the table gather), each a kernel launch with its host overhead, and writes several ``[N, K]`` int64
intermediates. :func:`lookup_offsets_dense` does the same in one launch: each program takes ``BLOCK`` rows, loads
their coordinates once and, for each of the ``K`` offsets, checks the box, ravels the key and reads the dense
table, writing the ``[N, K]`` int32 neighbour table directly. Same answers as the PyTorch path (tested; that path is
the twin, and stays the one for sorted-key indexes and for the CPU).

On the CPU the kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``, as the test suite sets it).
"""

from __future__ import annotations

from torch import Tensor

from . import igemm

triton, tl = igemm.triton, igemm.tl

if triton is not None:

    @triton.jit
    def _lookup_dense_kernel(coords_ptr, offs_ptr, lo_ptr, hi_ptr, strides_ptr, table_ptr, out_ptr, N,  # noqa: ANN001
                             K: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        r64 = rows.to(tl.int64)
        c0 = tl.load(coords_ptr + r64 * 4 + 0, mask=ok, other=0)
        c1 = tl.load(coords_ptr + r64 * 4 + 1, mask=ok, other=0)
        c2 = tl.load(coords_ptr + r64 * 4 + 2, mask=ok, other=0)
        c3 = tl.load(coords_ptr + r64 * 4 + 3, mask=ok, other=0)
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


BLOCK = 256


def available(coords: Tensor) -> bool:
    """Whether :func:`lookup_offsets_dense` can run on ``coords``' device (CUDA, or the CPU interpreter)."""
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
