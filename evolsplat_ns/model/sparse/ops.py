"""Sparse convolution (submanifold / strided / transposed), batch norm and ReLU as ``nn.Module`` s.

Execution of one convolution is fused: all (input, weight) pairs of the kernel map are gathered at once into a
``[G, P, C_in]`` tensor (pairs grouped by weight index, groups cut into equal chunks of ``P`` rows, the last chunk
of each weight padded), multiplied by the ``[G, C_in, C_out]`` weights of the groups in one ``torch.bmm`` and
added into the output with one ``scatter_add_``. The submanifold centre weight (pairs ``(i, i)`` for every
voxel) is one plain matmul. The backward pass is hand-written (:class:`SparseConvFunction`): it reuses the same
index tensors with the roles of input and output swapped, so nothing of size ``G x P`` is kept between forward
and backward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import igemm
from .kernel_map import KernelMap
from .tensor import SparseTensor


def _padded_rows(x: Tensor, extra: int) -> Tensor:
    """``x`` with ``extra`` zero rows appended (targets of the padding entries), laid out for row gathers.

    On CUDA the rows are given a stride of ``C + 1`` elements: PyTorch's vectorised gather path (taken for
    contiguous rows whose size is a multiple of 16 bytes) ran ~6x slower than the element-wise one for the
    7M-row gathers of an 800k-voxel U-Net on an H100 (torch 2.11), so it is avoided on purpose.
    """
    n, c = x.shape
    if x.is_cuda:
        buf = x.new_empty((n + extra, c + 1))
        buf[:n, :c] = x
        buf[n:, :c] = 0
        return buf[:, :c]
    return torch.cat([x, x.new_zeros((extra, c))], dim=0)


def _gather(rows: Tensor, idx: Tensor) -> Tensor:
    """``rows[idx]`` for a 2-D index ``[G, P]`` -> ``[G, P, C]``."""
    if rows.is_cuda:
        return rows[idx]
    return rows.index_select(0, idx.reshape(-1)).view(*idx.shape, rows.shape[1])


def _scatter_add(out: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """``out[idx[j]] += src[j]`` (rows)."""
    return out.scatter_add_(0, idx.reshape(-1, 1).expand(-1, out.shape[1]), src.reshape(-1, out.shape[1]))


class GatherRows(torch.autograd.Function):
    """``x[idx]`` (any index shape) whose backward is an atomic ``scatter_add_``.

    PyTorch's own backward of advanced indexing (a sort-based ``index_put_``) handles the repeated rows of
    trilinear sampling (the same voxel is a corner of many points) serially per row: seconds instead of
    milliseconds for 2M points on an H100.
    """

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor) -> Tensor:  # type: ignore
        ctx.save_for_backward(idx)
        ctx.n = x.shape[0]
        flat = idx.reshape(1, -1)
        return _gather(_padded_rows(x, 0), flat).reshape(*idx.shape, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore
        (idx,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.n, grad.shape[-1]))
        return _scatter_add(out, idx, grad.contiguous()), None


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x[idx]`` -> ``[*idx.shape, C]`` (fast gather, atomic backward)."""
    return GatherRows.apply(x, idx)


def _gather_mm_scatter(x: Tensor, w: Tensor, gather_idx: Tensor, scatter_idx: Tensor, n_out: int) -> Tensor:
    """``out[scatter[j, p]] += x[gather[j, p]] @ w[j]``.

    Padding entries of column ``p`` index row ``n + p`` (past the end) of ``x`` / ``out``: they read zeros and
    write to scratch rows, spread over ``P`` rows so that they do not all hit one address with atomics.
    """
    c_out = w.shape[-1]
    extra = gather_idx.shape[1] if gather_idx.dim() == 2 else 0
    out = x.new_zeros((n_out + extra, c_out))
    if gather_idx.numel() == 0:
        return out[:n_out]
    y = torch.bmm(_gather(_padded_rows(x, extra), gather_idx), w)  # [G, P, C_out]
    _scatter_add(out, scatter_idx, y)
    return out[:n_out]


def _grouped_weight_grad(a: Tensor, g: Tensor) -> Tensor:
    """``a[j]^T @ g[j]`` for ``a [G, P, C_in]``, ``g [G, P, C_out]``; long reductions are split into up to 8
    batched pieces (one bmm with a long inner dimension leaves most of a large GPU idle)."""
    G, P, cin = a.shape
    split = 1
    while split < 8 and P % (2 * split) == 0 and P // (2 * split) >= 512:
        split *= 2
    if split == 1:
        return torch.bmm(a.transpose(1, 2), g)
    q = P // split
    part = torch.bmm(a.reshape(G * split, q, cin).transpose(1, 2), g.reshape(G * split, q, g.shape[2]))
    return part.view(G, split, cin, g.shape[2]).sum(1)


class SparseConvFunction(torch.autograd.Function):
    """Sparse convolution with a hand-written backward. ``transposed`` reads the kernel map output -> input."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, kmap: KernelMap, transposed: bool) -> Tensor:  # type: ignore
        if transposed:
            gather, scatter, n_in, n_out = kmap.out_idx, kmap.in_idx, kmap.n_out, kmap.n_in
        else:
            gather, scatter, n_in, n_out = kmap.in_idx, kmap.out_idx, kmap.n_in, kmap.n_out
        w = weight.index_select(0, kmap.ks)
        out = _gather_mm_scatter(feats, w, gather, scatter, n_out)
        if kmap.identity_k is not None:
            out = out + feats @ weight[kmap.identity_k]
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        ctx.idx = (gather, scatter, n_in, n_out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        gather, scatter, n_in, n_out = ctx.idx
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        w = weight.index_select(0, kmap.ks)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        extra = gather.shape[1]
        # grad_out of every pair, gathered once for both gradients: [G, P, C_out]
        gy = _gather(_padded_rows(grad_out, extra), scatter) if gather.numel() else None
        if need_x:
            # the transposed convolution with the same pairs: out-rows -> in-rows, weights transposed
            gx = feats.new_zeros((n_in + extra, feats.shape[1]))
            if gy is not None:
                _scatter_add(gx, gather, torch.bmm(gy, w.transpose(1, 2)))
            grad_feats = gx[:n_in]
            if kmap.identity_k is not None:
                grad_feats = grad_feats + grad_out @ weight[kmap.identity_k].t()
        if need_w:
            grad_weight = torch.zeros_like(weight)
            if gy is not None:
                a = _gather(_padded_rows(feats, extra), gather)
                grad_weight.index_add_(0, kmap.ks, _grouped_weight_grad(a, gy))
            if kmap.identity_k is not None:
                grad_weight[kmap.identity_k] = feats.t() @ grad_out
        return grad_feats, grad_weight, None, None


CONV_IMPLS = ("auto", "gather", "igemm")
"""How a convolution runs: ``"gather"`` (this module's gather-scatter, pure PyTorch, any device and dtype),
``"igemm"`` (the Triton implicit GEMM of :mod:`.igemm`, float32; interpreted on the CPU, for tests), ``"auto"``
(``igemm`` for float32 CUDA tensors when Triton is importable, ``gather`` otherwise)."""


def check_impl(impl: str) -> str:
    """``impl`` itself if it is one of :data:`CONV_IMPLS`, else a ``ValueError``."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {impl!r} (expected one of {CONV_IMPLS})")
    return impl


def resolve_impl(impl: str, feats: Tensor) -> str:
    """``impl`` with ``"auto"`` decided for ``feats`` (see :data:`CONV_IMPLS`)."""
    if check_impl(impl) == "auto":
        return "igemm" if feats.is_cuda and feats.dtype == torch.float32 and igemm.available() else "gather"
    return impl


def sparse_conv(feats: Tensor, weight: Tensor, kmap: KernelMap, transposed: bool = False,
                impl: str = "gather") -> Tensor:
    """Features of a sparse convolution given its kernel map (weights ``[K, C_in, C_out]``)."""
    if weight.dtype != feats.dtype:
        raise TypeError(f"weight dtype {weight.dtype} != feature dtype {feats.dtype}")
    n_in = kmap.n_out if transposed else kmap.n_in
    if feats.shape[0] != n_in:
        raise ValueError(f"kernel map expects {n_in} input rows, got {feats.shape[0]}")
    if resolve_impl(impl, feats) == "igemm":
        if feats.dtype != torch.float32:
            raise TypeError(f"the implicit-GEMM convolution runs in float32, got {feats.dtype}")
        if transposed:  # coarse -> fine: read the map backwards
            return igemm.ImplicitGemmConv.apply(feats, weight, kmap.inverse(), kmap.table, False)
        if kmap.symmetric:  # submanifold: the inverse is the table with its columns reversed
            return igemm.ImplicitGemmConv.apply(feats, weight, kmap.table, kmap.table, True)
        return igemm.ImplicitGemmConv.apply(feats, weight, kmap.table, kmap.inverse(), False)
    return SparseConvFunction.apply(feats, weight, kmap, transposed)


def sparse_conv3d(x: SparseTensor, weight: Tensor, kernel_size: int = 3, stride: int = 1, transposed: bool = False,
                  bias: Optional[Tensor] = None, impl: str = "gather") -> SparseTensor:
    """Functional sparse convolution.

    * ``stride == 1``: submanifold (output coordinates = input coordinates; needs an odd kernel);
    * ``stride > 1``: strided, padding 0, torchsparse 2.1 output rule (``kernel_map`` docstring);
    * ``transposed``: inverse of the strided convolution that produced ``x`` (looked up in ``x.cache``); output
      coordinates are exactly the finer level's.

    ``impl``: :data:`CONV_IMPLS`.
    """
    cache = x.cache
    if transposed:
        if stride == 1:
            raise ValueError("a transposed convolution with stride 1 is a submanifold convolution")
        kmap, out_coords, out_range = cache.upsample(x.coords, x.stride, kernel_size, stride)
        out_stride = x.stride // stride
    elif stride == 1:
        kmap = cache.submanifold(x.coords, x.stride, kernel_size, x.spatial_range)
        out_coords, out_range, out_stride = cache.coords(x.stride), x.spatial_range, x.stride
    else:
        kmap, out_coords, out_range = cache.downsample(x.coords, x.stride, kernel_size, stride, x.spatial_range)
        out_stride = x.stride * stride
    if kmap.kernel_volume != weight.shape[0]:
        raise ValueError(f"weight has {weight.shape[0]} kernel entries, kernel map {kmap.kernel_volume}")
    out = sparse_conv(x.feats, weight, kmap, transposed, impl)
    if bias is not None:
        out = out + bias
    return SparseTensor(out, out_coords, out_stride, cache, out_range)


class SparseConv3d(nn.Module):
    """Sparse 3D convolution; parameter ``kernel [k^3, C_in, C_out]`` as torchsparse 2.1 ``spnn.Conv3d``
    (same name, layout, offset ordering and default init), so state dicts are interchangeable. ``impl``: how it
    runs (:data:`CONV_IMPLS`); the result does not depend on it beyond rounding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = False, transposed: bool = False, impl: str = "gather"):
        super().__init__()
        self.impl = check_impl(impl)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.transposed = transposed
        self.kernel_volume = self.kernel_size**3
        self.kernel = nn.Parameter(torch.zeros(self.kernel_volume, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt((self.out_channels if self.transposed else self.in_channels) * self.kernel_volume)
        nn.init.uniform_(self.kernel, -std, std)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -std, std)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.transposed:
            s += ", transposed=True"
        if self.bias is None:
            s += ", bias=False"
        return s

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_conv3d(x, self.kernel, self.kernel_size, self.stride, self.transposed, self.bias, self.impl)


class SparseBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the voxel features (statistics over the active voxels).

    Batch statistics need at least two voxels; with fewer (a segment whose points all fall in one voxel, or the
    coarsest level of a tiny cloud) training normalises with the running statistics and leaves them unchanged,
    where ``BatchNorm1d`` would raise (one voxel) or write NaN into its running statistics (none).
    """

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        if self.training and x.feats.shape[0] <= 1 and self.running_mean is not None:
            return x.replace(F.batch_norm(x.feats, self.running_mean, self.running_var, self.weight, self.bias,
                                          False, 0.0, self.eps))
        return x.replace(super().forward(x.feats))


class SparseReLU(nn.ReLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(F.relu(x.feats, inplace=self.inplace))
