"""The project's own sparse 3D convolution backend (PyTorch, plus Triton kernels on CUDA) and sparse volume sampling.

* ``tensor``: :class:`SparseTensor`, :class:`KernelMapCache`, the voxeliser (:func:`voxelize`,
  :meth:`SparseTensor.from_points`) and the pinned voxel <-> world mapping;
* ``kernel_map``: coordinate hashing, kernel maps, the kernel-offset ordering and the strided output rule
  (both those of torchsparse 2.1, so its checkpoints load unchanged);
* ``ops``: sparse convolution (the pure-PyTorch gather / one bmm / one scatter-add path with a hand-written
  backward, or the implicit GEMM of ``igemm``), batch norm, ReLU;
* ``igemm``: the implicit-GEMM convolution in Triton (the CUDA default; tested against the gather path);
* ``unet``: EVolSplat's sparse U-Net (and the same network on torchsparse); ``spconv_unet``: on spconv 2.x;
* ``sampling``: trilinear sampling straight from the sparse voxels (and the reference's dense way, to compare).
"""

from .kernel_map import (
    CoordIndex,
    KernelMap,
    build_downsample_map,
    build_submanifold_map,
    dense_weight_to_sparse,
    kernel_offsets,
    sparse_weight_to_dense,
)
from .ops import SparseBatchNorm, SparseConv3d, SparseConvFunction, SparseReLU, sparse_conv, sparse_conv3d
from .sampling import continuous_index, densify, sample_sparse_volume, sample_volume
from .tensor import (
    KernelMapCache,
    SparseTensor,
    VoxelGrid,
    grid_shape_for,
    voxelize,
    voxelize_points,
)
from .unet import SparseConvBlock, SparseUNet, TorchsparseUNet, build_unet

__all__ = [
    "CoordIndex",
    "KernelMap",
    "KernelMapCache",
    "SparseBatchNorm",
    "SparseConv3d",
    "SparseConvBlock",
    "SparseConvFunction",
    "SparseReLU",
    "SparseTensor",
    "SparseUNet",
    "TorchsparseUNet",
    "VoxelGrid",
    "build_downsample_map",
    "build_submanifold_map",
    "build_unet",
    "continuous_index",
    "dense_weight_to_sparse",
    "densify",
    "grid_shape_for",
    "kernel_offsets",
    "sample_sparse_volume",
    "sample_volume",
    "sparse_conv",
    "sparse_conv3d",
    "sparse_weight_to_dense",
    "voxelize",
    "voxelize_points",
]
