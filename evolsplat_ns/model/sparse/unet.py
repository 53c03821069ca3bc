"""The sparse U-Net of EVolSplat's volume encoder.

Every convolution has kernel 3 and no bias and is followed by BatchNorm + ReLU:

==========  =================================  ==========  ====================================
block       op                                 stride out  channels
==========  =================================  ==========  ====================================
conv0       submanifold                        1           in -> out (16)
conv1/2     strided 2 / submanifold            2           out -> 16 -> 16
conv3/4     strided 2 / submanifold            4           16 -> 32 -> 32
conv5/6     strided 2 / submanifold            8           32 -> 64 -> 64
conv7       transposed 2, then ``+ conv4``     4           64 -> 32
conv9       transposed 2, then ``+ conv2``     2           32 -> 16
conv11      transposed 2, then ``+ conv0``     1           16 -> out (16)
==========  =================================  ==========  ====================================

The skip is added after the block's ReLU. The output is one ``out_channels`` feature per input voxel, at the
input coordinates. Module names and parameter layouts are those of the reference network (``conv{i}.net.0.kernel``
``[27, C_in, C_out]``, ``conv{i}.net.1`` a ``BatchNorm1d``), so its torchsparse 2.1 state dict loads unchanged.
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from .ops import SparseBatchNorm, SparseConv3d, SparseReLU
from .tensor import KernelMapCache, SparseTensor


class SparseConvBlock(nn.Module):
    """Sparse conv (kernel 3, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 transposed: bool = False, impl: str = "gather"):
        super().__init__()
        self.net = nn.Sequential(
            SparseConv3d(in_channels, out_channels, kernel_size, stride, bias=False, transposed=transposed,
                         impl=impl),
            SparseBatchNorm(out_channels),
            SparseReLU(inplace=True),
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class SparseUNet(nn.Module):
    """EVolSplat's sparse U-Net (table in the module docstring). ``impl``: how its convolutions run
    (:data:`.ops.CONV_IMPLS`: ``"auto"`` = the Triton implicit GEMM on CUDA, the gather-scatter path elsewhere)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 16, impl: str = "auto"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        b = functools.partial(SparseConvBlock, impl=impl)
        self.conv0 = b(in_channels, out_channels)
        self.conv1 = b(out_channels, 16, stride=2)
        self.conv2 = b(16, 16)
        self.conv3 = b(16, 32, stride=2)
        self.conv4 = b(32, 32)
        self.conv5 = b(32, 64, stride=2)
        self.conv6 = b(64, 64)
        self.conv7 = b(64, 32, stride=2, transposed=True)
        self.conv9 = b(32, 16, stride=2, transposed=True)
        self.conv11 = b(16, out_channels, stride=2, transposed=True)

    def forward(self, x: SparseTensor, cache: Optional[KernelMapCache] = None) -> SparseTensor:
        """``x`` at stride 1 -> features ``[N, out_channels]`` at ``x``'s coordinates.

        ``cache`` (kept by the caller across forwards of the same coordinates) replaces ``x.cache``.
        """
        if cache is not None and x.cache is not cache:
            x = SparseTensor(x.feats, x.coords, x.stride, cache, x.spatial_range)
        x0 = self.conv0(x)
        x2 = self.conv2(self.conv1(x0))
        x4 = self.conv4(self.conv3(x2))
        y = self.conv6(self.conv5(x4))
        y = self.conv7(y) + x4
        y = self.conv9(y) + x2
        y = self.conv11(y) + x0
        return y


class TorchsparseUNet(nn.Module):  # pragma: no cover - needs torchsparse 2.1 + CUDA
    """The same network on torchsparse 2.1 (``spnn``), same state-dict keys; input/output are our tensors."""

    def __init__(self, in_channels: int = 3, out_channels: int = 16):
        super().__init__()
        import torchsparse.nn as spnn

        def block(i, o, s=1, t=False):
            m = nn.Module()
            m.net = nn.Sequential(spnn.Conv3d(i, o, kernel_size=3, stride=s, transposed=t), spnn.BatchNorm(o),
                                  spnn.ReLU(True))
            return m

        self.conv0 = block(in_channels, out_channels)
        self.conv1, self.conv2 = block(out_channels, 16, 2), block(16, 16)
        self.conv3, self.conv4 = block(16, 32, 2), block(32, 32)
        self.conv5, self.conv6 = block(32, 64, 2), block(64, 64)
        self.conv7 = block(64, 32, 2, True)
        self.conv9 = block(32, 16, 2, True)
        self.conv11 = block(16, out_channels, 2, True)

    def forward(self, x: SparseTensor, cache: Optional[KernelMapCache] = None) -> SparseTensor:
        import torch
        from torchsparse import SparseTensor as TsTensor

        t = TsTensor(x.feats, x.coords.to(torch.int32))
        f = self.conv0.net
        x0 = f(t)
        x2 = self.conv2.net(self.conv1.net(x0))
        x4 = self.conv4.net(self.conv3.net(x2))
        y = self.conv6.net(self.conv5.net(x4))
        y = x4 + self.conv7.net(y)
        y = x2 + self.conv9.net(y)
        y = x0 + self.conv11.net(y)
        return x.replace(y.F)


def build_unet(backend: str = "torch", in_channels: int = 3, out_channels: int = 16, impl: str = "auto") -> nn.Module:
    """``"torch"``: :class:`SparseUNet` (this package; ``impl`` as there). ``"torchsparse"``: :class:`TorchsparseUNet`
    (needs torchsparse 2.1). ``"spconv"``: :class:`.spconv_unet.SpconvUNet` (needs spconv 2.3). All three take the
    same state dict and give the same features."""
    if backend == "torch":
        return SparseUNet(in_channels, out_channels, impl=impl)
    if backend in ("torchsparse", "spconv"):
        try:
            __import__("torchsparse" if backend == "torchsparse" else "spconv.pytorch")
        except ImportError as e:
            raise ImportError(f"sparse_backend={backend!r} needs {backend} installed (torchsparse 2.1 / spconv 2.3, "
                              "a CUDA build); the default sparse_backend='torch' needs nothing") from e
        if backend == "torchsparse":
            return TorchsparseUNet(in_channels, out_channels)
        from .spconv_unet import SpconvUNet

        return SpconvUNet(in_channels, out_channels)
    raise ValueError(f"unknown sparse backend {backend!r} (expected 'torch', 'torchsparse' or 'spconv')")
