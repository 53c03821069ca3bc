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

from typing import Optional

from torch import nn

from .ops import SparseBatchNorm, SparseConv3d, SparseReLU
from .tensor import KernelMapCache, SparseTensor


class SparseConvBlock(nn.Module):
    """Sparse conv (kernel 3, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 transposed: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            SparseConv3d(in_channels, out_channels, kernel_size, stride, bias=False, transposed=transposed),
            SparseBatchNorm(out_channels),
            SparseReLU(inplace=True),
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class SparseUNet(nn.Module):
    """EVolSplat's sparse U-Net (table in the module docstring)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 16):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv0 = SparseConvBlock(in_channels, out_channels)
        self.conv1 = SparseConvBlock(out_channels, 16, stride=2)
        self.conv2 = SparseConvBlock(16, 16)
        self.conv3 = SparseConvBlock(16, 32, stride=2)
        self.conv4 = SparseConvBlock(32, 32)
        self.conv5 = SparseConvBlock(32, 64, stride=2)
        self.conv6 = SparseConvBlock(64, 64)
        self.conv7 = SparseConvBlock(64, 32, stride=2, transposed=True)
        self.conv9 = SparseConvBlock(32, 16, stride=2, transposed=True)
        self.conv11 = SparseConvBlock(16, out_channels, stride=2, transposed=True)

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


def build_unet(backend: str = "torch", in_channels: int = 3, out_channels: int = 16) -> nn.Module:
    """``"torch"``: :class:`SparseUNet` (this package). ``"torchsparse"``: :class:`TorchsparseUNet` (needs
    torchsparse 2.1 importable; same state-dict keys and layouts)."""
    if backend == "torch":
        return SparseUNet(in_channels, out_channels)
    if backend == "torchsparse":
        try:
            import torchsparse  # noqa: F401
        except ImportError as e:
            raise ImportError("sparse_backend='torchsparse' needs torchsparse 2.1 installed; the default "
                              "sparse_backend='torch' needs nothing") from e
        return TorchsparseUNet(in_channels, out_channels)
    raise ValueError(f"unknown sparse backend {backend!r} (expected 'torch' or 'torchsparse')")
