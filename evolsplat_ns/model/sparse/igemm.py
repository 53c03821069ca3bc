"""Implicit-GEMM sparse convolution: Triton kernels over a neighbour table, no scatter, no pair lists.

A convolution is given by a neighbour table ``nbr [M, K]`` (int32): output row ``m`` reads input row ``nbr[m, k]``
with weight ``k`` (-1: no input there). Then

    out[m] = sum_k x[nbr[m, k]] @ w[k]                                        (forward, :func:`igemm`)

is one kernel that keeps a ``[BLOCK_M, C_out]`` tile of outputs in registers while it walks the ``K`` offsets,
gathering ``[BLOCK_M, C_in]`` input rows per offset: every output row is written once (no atomics, deterministic),
and nothing of size "number of pairs" is materialised. The backward pass is the same kernel twice over:

* input gradient: ``gx[p] = sum_k g[inv[p, k]] @ w[k]^T`` with the inverse table ``inv [N_in, K]`` (for a
  submanifold convolution ``inv`` is ``nbr`` with its columns reversed: offset ``k`` and ``K-1-k`` are opposite,
  so no second table is stored; ``flip=True``);
* weight gradient (:func:`igemm_weight_grad`): ``dw[k] = sum_m x[nbr[m, k]]^T g[m]``, reduced per chunk of rows
  into fixed partial sums that are then added in a fixed order (deterministic, no float atomics).

Products run at float32 precision (``input_precision="ieee"``, no TF32), and results agree with the gather-scatter
path of :mod:`.ops` (the pure-PyTorch twin the tests compare with) to float32 rounding: each kernel alone is within
1e-6 of float64 on the H200. Through a whole U-Net the gradients of any two float32 paths that sum in another order
differ more (up to ~1e-2 of their largest value at 100 k voxels): the network is ill-conditioned there (a ReLU
input near zero flips under another rounding; training-mode batch norm spreads it), as the twin itself shows when
its input is changed by 1e-6 (``tests/test_igemm.py``, ``GRAD_L2``; BENCHMARKS, session 12).

On CUDA the kernels are compiled by Triton. On the CPU they run only under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported; the CPU test suite does so): correct but slow. The package's CPU default stays the
gather-scatter path.
"""

from typing import Optional

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; everything here is optional
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def available() -> bool:
    """Whether Triton is importable (the CUDA kernels additionally need a CUDA device)."""
    return triton is not None


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


if triton is not None:  # the kernels need tl.constexpr annotations at definition time

    @triton.jit
    def _fwd_kernel(x_ptr, nbr_ptr, w_ptr, out_ptr, M, sxm, swk, swi, swo,  # noqa: ANN001 - Triton kernel
                    K: tl.constexpr, CI: tl.constexpr, CO: tl.constexpr, CIP: tl.constexpr,
                    COP: tl.constexpr, BLOCK_M: tl.constexpr, FLIP: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ci = tl.arange(0, CIP)
        co = tl.arange(0, COP)
        ci_ok = ci < CI
        co_ok = co < CO
        acc = tl.zeros((BLOCK_M, COP), dtype=tl.float32)
        for k in range(K):
            col = (K - 1 - k) if FLIP else k
            src = tl.load(nbr_ptr + rows.to(tl.int64) * K + col, mask=row_ok, other=-1)
            has = src >= 0
            a = tl.load(x_ptr + src.to(tl.int64)[:, None] * sxm + ci[None, :], mask=has[:, None] & ci_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + k * swk + ci[:, None] * swi + co[None, :] * swo, mask=ci_ok[:, None] & co_ok[None, :],
                        other=0.0)
            acc += tl.dot(a, w, input_precision="ieee")
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * CO + co[None, :], acc, mask=row_ok[:, None] & co_ok[None, :])


    @triton.jit
    def _wgrad_kernel(x_ptr, g_ptr, nbr_ptr, part_ptr, M, ROWS_PER_PROG,  # noqa: ANN001 - Triton kernel
                      K: tl.constexpr, CI: tl.constexpr, CO: tl.constexpr, CIP: tl.constexpr,
                      COP: tl.constexpr, BLOCK_M: tl.constexpr):
        k = tl.program_id(0)
        chunk = tl.program_id(1)
        ci = tl.arange(0, CIP)
        co = tl.arange(0, COP)
        ci_ok = ci < CI
        co_ok = co < CO
        acc = tl.zeros((CIP, COP), dtype=tl.float32)
        start = chunk * ROWS_PER_PROG
        for r0 in range(0, ROWS_PER_PROG, BLOCK_M):
            rows = start + r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            src = tl.load(nbr_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=-1)
            has = src >= 0
            a = tl.load(x_ptr + src.to(tl.int64)[:, None] * CI + ci[None, :], mask=has[:, None] & ci_ok[None, :],
                        other=0.0)
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * CO + co[None, :], mask=has[:, None] & co_ok[None, :],
                        other=0.0)
            acc += tl.dot(tl.trans(a), g, input_precision="ieee")
        base = (chunk.to(tl.int64) * K + k) * CIP * COP
        tl.store(part_ptr + base + ci[:, None] * COP + co[None, :], acc)


def _check_device(x: Tensor) -> None:
    if triton is None:
        raise RuntimeError("the implicit-GEMM sparse convolution needs Triton (it ships with CUDA builds of torch)")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("the implicit-GEMM sparse convolution runs on CUDA; on the CPU only under Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before triton is imported), which the tests use")


def interpreting() -> bool:
    """Whether Triton was imported in interpreter mode (kernels run on CPU tensors)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _block_m(cop: int) -> int:
    return 128 if cop <= 32 else 64


def igemm(x: Tensor, w: Tensor, nbr: Tensor, flip: bool = False) -> Tensor:
    """``out[m] = sum_k x[nbr[m, k]] @ w[k]`` -> ``[M, C_out]`` (``nbr[m, K-1-k]`` when ``flip``).

    Args:
        x: ``[N, C_in]`` float32 rows (made contiguous).
        w: ``[K, C_in, C_out]`` float32, any strides (``w.transpose(1, 2)`` for a gradient).
        nbr: ``[M, K]`` int32, contiguous; -1 where no input.
    """
    m, kv = nbr.shape
    ci, co = int(w.shape[1]), int(w.shape[2])
    if x.shape[1] != ci or w.shape[0] != kv:
        raise ValueError(f"shapes: x {tuple(x.shape)}, w {tuple(w.shape)}, nbr {tuple(nbr.shape)}")
    out = x.new_empty((m, co))
    if m == 0:
        return out
    if x.shape[0] == 0:
        return out.zero_()
    x = x.contiguous()
    cop = _pow2(co)
    bm = _block_m(cop)
    _check_device(x)
    _fwd_kernel[(triton.cdiv(m, bm),)](x, nbr, w, out, m, x.stride(0), w.stride(0), w.stride(1), w.stride(2),
                               K=kv, CI=ci, CO=co, CIP=_pow2(ci), COP=cop, BLOCK_M=bm, FLIP=bool(flip))
    return out


def igemm_weight_grad(x: Tensor, g: Tensor, nbr: Tensor, rows_per_prog: Optional[int] = None) -> Tensor:
    """``dw[k] = sum_m x[nbr[m, k]]^T g[m]`` -> ``[K, C_in, C_out]`` (deterministic: partial sums per chunk of
    ``rows_per_prog`` rows, added in chunk order)."""
    m, kv = nbr.shape
    ci, co = int(x.shape[1]), int(g.shape[1])
    if m == 0 or x.shape[0] == 0:
        return x.new_zeros((kv, ci, co))
    x, g = x.contiguous(), g.contiguous()
    cip, cop = _pow2(ci), _pow2(co)
    bm = 64
    if rows_per_prog is None:  # enough programs to fill a large GPU (K x chunks), few partial sums to add
        rows_per_prog = max(bm, min(4096, triton.cdiv(triton.cdiv(m, 16), bm) * bm))
    rows_per_prog = triton.cdiv(rows_per_prog, bm) * bm
    chunks = triton.cdiv(m, rows_per_prog)
    part = x.new_empty((chunks, kv, cip, cop))
    _check_device(x)
    _wgrad_kernel[(kv, chunks)](x, g, nbr, part, m, rows_per_prog, K=kv, CI=ci, CO=co, CIP=cip, COP=cop, BLOCK_M=bm)
    return part.sum(0)[:, :ci, :co].contiguous()


class ImplicitGemmConv(torch.autograd.Function):
    """Sparse convolution through :func:`igemm` given the forward table and the input-gradient table.

    ``fwd [M_out, K]`` (input row per output and offset), ``inv [M_in, K]`` (output row per input and offset; or
    ``fwd`` itself with ``inv_flip=True`` for a submanifold convolution).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, fwd: Tensor, inv: Tensor, inv_flip: bool) -> Tensor:  # type: ignore
        ctx.save_for_backward(x, w, fwd, inv)
        ctx.inv_flip = inv_flip
        return igemm(x, w, fwd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore
        x, w, fwd, inv = ctx.saved_tensors
        g = g.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            # the transposed weights made contiguous (27 x C_in x C_out, a small copy): the kernel then reads them as
            # in the forward pass. Read through the strided view, the H200 gave input gradients 3.3e-5 and a weight
            # gradient upstream 7.8e-4 from float64; contiguous, tests/test_igemm.py passes there (BENCHMARKS)
            gx = igemm(g, w.transpose(1, 2).contiguous(), inv, flip=ctx.inv_flip)
        if ctx.needs_input_grad[1]:
            gw = igemm_weight_grad(x, g, fwd)
        return gx, gw, None, None, None
