"""EVolSplat's sparse U-Net on ``spconv`` 2.x (``spconv.pytorch``), to compare against :class:`SparseUNet`.

:class:`SpconvUNet` is the network of ``unet.py`` (module table there) built from spconv modules:
``SubMConv3d`` (submanifold), ``SparseConv3d(kernel 3, stride 2, padding 0)`` (strided) and
``SparseInverseConv3d`` (transposed, sharing the ``indice_key`` of its strided convolution), each followed by
``BatchNorm1d`` and ``ReLU`` on the features. spconv is imported when a model is built, not when this module is
imported. Its prebuilt CUDA wheels run the *implicit GEMM* algorithm (``ConvAlgo.MaskImplicitGemm``, the default for
kernels of at most 32 taps); its CPU build only the native gather-GEMM-scatter one.

What is the same as :class:`SparseUNet`
---------------------------------------
* **Parameters and state dict.** Every convolution keeps *our* parameter ``conv{i}.net.0.kernel``
  ``[27, C_in, C_out]`` (torchsparse 2.1 layout and offset order) and ``conv{i}.net.1`` is a ``BatchNorm1d``, so
  ``named_parameters()`` / ``state_dict()`` have exactly :class:`SparseUNet`'s names, shapes and layouts and
  checkpoints (and optimiser states) interchange both ways. The spconv convolution modules hold no parameter: their
  ``weight`` is removed and each forward passes our kernel re-laid out by :func:`to_spconv_weight` (a
  differentiable permute + copy, 27 C_in C_out floats; the one place where the layouts meet, :func:`from_spconv_weight`
  is its inverse, e.g. to load a native spconv checkpoint). Gradients flow through it into ``kernel``.
* **Weight mapping** (spconv 2.x keeps every weight as ``KRSC`` = ``[C_out, k0, k1, k2, C_in]``,
  ``spconv.constants.ALL_WEIGHT_IS_KRSC = True``; ``k0..k2`` follow the index columns 1..3). Our coordinates
  ``(b, x, y, z)`` are handed to spconv unchanged (spatial axes in that order), and then::

      spconv_weight[o, a, b, c, i] = kernel[a + 3 b + 9 c, i, o]

  for all three kinds of convolution: no flip. spconv's submanifold output ``o`` reads input ``o + (a,b,c) - 1``,
  its strided conv (padding 0) reads ``2 o + (a,b,c)``, and its inverse conv uses the pairs of the strided conv the
  other way round with the same kernel tap - the conventions of ``kernel_map``. (Checked by
  ``tests/test_spconv_backend.py``: one convolution of each kind with a random kernel against ``sparse_conv3d``,
  values and kernel gradients; the whole network against :class:`SparseUNet` in float64 to 1e-9 - outputs, input
  and parameter gradients, running statistics - on clouds with odd / even / gapped borders, two batch items and a
  ``spatial_range``. A flip or a transposed tap order fails them.)
* **Output coordinates.** spconv's strided output set is ``{o : 0 <= o <= (S - 3) // 2, some input in
  [2o, 2o + 2]}`` for a spatial shape ``S``; ours is the same with ``S = M + 1`` (``M`` the largest coordinate of the
  level) or ``S = spatial_range``. So before every strided convolution the spatial shape is set to ``spatial_range``
  propagated spconv's way (``(S - 3) // 2 + 1``, identical to ours) when ``x`` carries one, otherwise to the level's
  largest coordinate + 1 (one host read per level, as our kernel-map build does): spconv's own propagation would
  keep a larger shape at a coarse level whose largest coordinate falls short of the box, and then produce one extra
  border row at the next level. Before each inverse convolution the shape spconv recorded for the pair is put back
  (it checks it). The output of :meth:`SpconvUNet.forward` is at ``x``'s coordinates in ``x``'s row order (the last
  inverse conv returns the input indices of the first strided conv, which are ``x``'s; checked, and rows are put
  back into ``x``'s order explicitly should spconv ever return them otherwise).
* **BatchNorm** on the features, including :class:`SparseBatchNorm`'s rule for a level of at most one voxel in
  training (running statistics used and left unchanged).

What differs
------------
* Kernel maps are spconv's (built by spconv, inside every forward: spconv has no cache spanning forwards);
  ``cache`` is accepted for interface compatibility and ignored. Intermediate levels are in spconv's row order
  (different from our sorted order; invisible in the output, batch statistics do not depend on it).
* Arithmetic: spconv's CUDA implicit GEMM sums the taps in its own order (results equal to ours to float rounding);
  it uses TF32 only if ``spconv.constants.SPCONV_ALLOW_TF32`` is set (default ``False``; a module attribute read at
  every call, no environment variable in 2.3.8). Half precision, int8 and fused activations of spconv are not used.
* spconv needs non-negative coordinates inside the spatial shape (checked: coordinates outside ``spatial_range`` are
  refused with ``ValueError``, where ours ignores them in the strided rule) and ``int32`` indices; every level
  must be non-empty: an input whose extent at some level is below 3 voxels on an axis (so that the next strided
  level is empty) is refused with ``ValueError`` - spconv 2.3.8 would otherwise emit a row for an empty output box
  and fail one layer later; ours handles such clouds.

spconv 2.3.8 on the CPU (its CPU build, used by the tests)
----------------------------------------------------------
* Its native convolution returns a wrong output row now and then when torch runs more than one intra-op thread
  (a race in its CPU gather / scatter path; spconv ships its own ``libgomp`` beside torch's): run it inside
  :func:`evolsplat_ns.threads.torch_threads` ``(1)`` - forward and backward.
* Its CPU backward calls ``torch.cuda.current_stream()`` unconditionally, which raises without a CUDA driver:
  building a :class:`SpconvConv3d` where CUDA is unavailable replaces ``spconv.pytorch.ops.get_current_stream`` by
  one returning 0 (:func:`_cpu_backward_fix`; nothing is changed where CUDA is available).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tensor import KernelMapCache, SparseTensor


def to_spconv_weight(kernel: Tensor) -> Tensor:
    """Our ``[27, C_in, C_out]`` kernel (tap ``w = a + 3 b + 9 c``) -> spconv's KRSC ``[C_out, 3, 3, 3, C_in]``
    with ``out[o, a, b, c, i] = kernel[a + 3 b + 9 c, i, o]`` (a contiguous tensor, differentiable)."""
    kv, cin, cout = kernel.shape
    k = round(kv ** (1.0 / 3.0))
    assert k**3 == kv, "kernel volume must be a cube"
    # index w = a + k b + k^2 c  ->  view [c, b, a, C_in, C_out] -> [C_out, a, b, c, C_in]
    return kernel.reshape(k, k, k, cin, cout).permute(4, 2, 1, 0, 3).contiguous()


def from_spconv_weight(weight: Tensor) -> Tensor:
    """Inverse of :func:`to_spconv_weight`: spconv KRSC ``[C_out, k, k, k, C_in]`` -> ours ``[k^3, C_in, C_out]``."""
    cout, k, cin = weight.shape[0], weight.shape[1], weight.shape[-1]
    return weight.permute(3, 2, 1, 4, 0).reshape(k**3, cin, cout).contiguous()


def _cpu_backward_fix() -> None:
    """spconv 2.3.8's CPU backward (``spconv.pytorch.ops.indice_conv_backward``, the Python path taken by the CPU
    build) calls ``torch.cuda.current_stream()`` unconditionally, which raises where no CUDA device can be
    initialised. Where CUDA is unavailable, ``spconv.pytorch.ops.get_current_stream`` is replaced by one returning 0
    (the stream is not used on the CPU path); with CUDA available nothing is changed."""
    if torch.cuda.is_available():
        return
    import spconv.pytorch.ops as spops

    if getattr(spops.get_current_stream, "_evolsplat_cpu_fix", False):
        return

    def get_current_stream() -> int:
        return 0

    get_current_stream._evolsplat_cpu_fix = True  # type: ignore[attr-defined]
    spops.get_current_stream = get_current_stream


class SpconvConv3d(nn.Module):
    """One spconv convolution (kernel 3, no bias) with our ``kernel [27, C_in, C_out]`` parameter.

    ``kind``: ``"subm"`` (``SubMConv3d``), ``"down"`` (``SparseConv3d`` stride 2, padding 0) or ``"inverse"``
    (``SparseInverseConv3d``); ``indice_key`` names the kernel map that a strided conv shares with its inverse.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str, indice_key: str, algo=None):
        super().__init__()
        import spconv.pytorch as spconv

        _cpu_backward_fix()
        self.in_channels, self.out_channels, self.kind = in_channels, out_channels, kind
        self.transposed = kind == "inverse"
        self.kernel_volume = 27
        self.kernel = nn.Parameter(torch.zeros(27, in_channels, out_channels))
        if kind == "subm":
            op = spconv.SubMConv3d(in_channels, out_channels, 3, stride=1, padding=1, bias=False,
                                   indice_key=indice_key, algo=algo)
        elif kind == "down":
            op = spconv.SparseConv3d(in_channels, out_channels, 3, stride=2, padding=0, bias=False,
                                     indice_key=indice_key, algo=algo)
        elif kind == "inverse":
            op = spconv.SparseInverseConv3d(in_channels, out_channels, 3, indice_key=indice_key, bias=False,
                                            algo=algo)
        else:
            raise ValueError(f"unknown convolution kind {kind!r}")
        del op.weight  # the weight is our ``kernel``, passed in spconv's layout at every call
        # spconv's load hook re-lays out ``<prefix>weight`` when SPCONV_SAVED_WEIGHT_LAYOUT is set (and asserts that
        # key exists); there is no such key here, the layout is handled by ``to_spconv_weight``
        op._load_state_dict_pre_hooks.clear()
        self.op = op
        # CUDA builds of spconv pick the implicit GEMM at construction, which runs on CUDA only: CPU tensors take
        # spconv's native algorithm instead (what its CPU-only build always uses)
        from spconv.core import ConvAlgo

        self._algo = {True: op.algo, False: ConvAlgo.Native}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same default init as :class:`~evolsplat_ns.model.sparse.ops.SparseConv3d`."""
        std = 1.0 / math.sqrt((self.out_channels if self.transposed else self.in_channels) * self.kernel_volume)
        nn.init.uniform_(self.kernel, -std, std)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kind={self.kind}, indice_key={self.op.indice_key!r}"

    def forward(self, x):
        op = self.op
        op.algo = self._algo[x.features.is_cuda]
        # spconv's own ``SparseConvolution.forward`` is this call with ``op.weight``.
        return op._conv_forward(self.training, x, to_spconv_weight(self.kernel), None, name=op.name,
                                sparse_unique_name=op._sparse_unique_name)


def _batch_norm(bn: nn.BatchNorm1d, feats: Tensor) -> Tensor:
    """``bn(feats)`` with :class:`SparseBatchNorm`'s rule for at most one row in training."""
    if bn.training and feats.shape[0] <= 1 and bn.running_mean is not None:
        return F.batch_norm(feats, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(feats)


class SpconvBlock(nn.Module):
    """spconv convolution -> BatchNorm1d -> ReLU on the features; ``net`` indexed like :class:`SparseConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, kind: str, indice_key: str, algo=None):
        super().__init__()
        self.net = nn.Sequential(SpconvConv3d(in_channels, out_channels, kind, indice_key, algo),
                                 nn.BatchNorm1d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        y = self.net[0](x)
        return y.replace_feature(self.net[2](_batch_norm(self.net[1], y.features)))


def _with_shape(t, shape: Sequence[int]):
    """``t`` with another spatial shape (a new tensor object; ``t`` is left as is)."""
    out = t.replace_feature(t.features)
    out.spatial_shape = [int(v) for v in shape]
    return out


class SpconvUNet(nn.Module):
    """EVolSplat's sparse U-Net on spconv 2.x; same state dict as :class:`SparseUNet` (module docstring).

    ``algo``: a ``spconv.core.ConvAlgo`` (or its name, e.g. ``"Native"``, ``"MaskImplicitGemm"``) for every
    convolution; ``None`` = spconv's default (implicit GEMM on CUDA builds, native on the CPU build).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 16, algo=None):
        super().__init__()
        if isinstance(algo, str):
            from spconv.core import ConvAlgo

            algo = ConvAlgo[algo]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv0 = SpconvBlock(in_channels, out_channels, "subm", "subm1", algo)
        self.conv1 = SpconvBlock(out_channels, 16, "down", "down1", algo)
        self.conv2 = SpconvBlock(16, 16, "subm", "subm2", algo)
        self.conv3 = SpconvBlock(16, 32, "down", "down2", algo)
        self.conv4 = SpconvBlock(32, 32, "subm", "subm4", algo)
        self.conv5 = SpconvBlock(32, 64, "down", "down3", algo)
        self.conv6 = SpconvBlock(64, 64, "subm", "subm8", algo)
        self.conv7 = SpconvBlock(64, 32, "inverse", "down3", algo)
        self.conv9 = SpconvBlock(32, 16, "inverse", "down2", algo)
        self.conv11 = SpconvBlock(16, out_channels, "inverse", "down1", algo)

    @staticmethod
    def _input_shape(coords: Tensor, spatial_range) -> List[int]:
        """Spatial shape that makes spconv's strided output set equal ours (module docstring)."""
        if coords.shape[0] == 0:
            raise ValueError("SpconvUNet: a level of the U-Net has no voxel (spconv cannot run on it)")
        lo_hi = torch.cat([coords[:, 1:].min(0).values, coords[:, 1:].max(0).values]).tolist()  # one host read
        lo, hi = lo_hi[:3], lo_hi[3:]
        if min(lo) < 0:
            raise ValueError("SpconvUNet: spconv needs non-negative coordinates")
        if spatial_range is None:
            shape = [v + 1 for v in hi]
        elif any(h >= r for h, r in zip(hi, spatial_range)):
            raise ValueError(f"SpconvUNet: coordinates up to {hi} outside spatial_range {tuple(spatial_range)}")
        else:
            shape = [int(r) for r in spatial_range]
        if min(shape) < 3:  # spconv would still emit rows for an empty (k=3, s=2) output box: refuse
            raise ValueError(f"SpconvUNet: a level of extent {shape} < 3 leaves the next (strided) level empty")
        return shape

    def _down(self, block: SpconvBlock, t, spatial_range):
        """A strided block, its input's spatial shape set first; returns (output, coarse range or None)."""
        t = _with_shape(t, self._input_shape(t.indices, spatial_range))
        y = block(t)
        return y, (tuple(y.spatial_shape) if spatial_range is not None else None)

    @staticmethod
    def _up(block: SpconvBlock, t):
        """An inverse block; its input gets back the spatial shape recorded with the strided conv's pairs."""
        datas = t.find_indice_pair(block.net[0].op.indice_key)
        return block(_with_shape(t, datas.out_spatial_shape))

    def forward(self, x: SparseTensor, cache: Optional[KernelMapCache] = None) -> SparseTensor:
        """``x`` at stride 1 -> features ``[N, out_channels]`` at ``x``'s coordinates, in ``x``'s row order
        (``cache`` is ignored: spconv rebuilds its kernel maps in every forward)."""
        import spconv.pytorch as spconv

        if not x.feats.is_cuda and torch.get_num_threads() > 1:
            raise RuntimeError("spconv 2.3.8's CPU convolution returns wrong rows now and then with more than one "
                               f"torch thread ({torch.get_num_threads()} now): on the CPU use sparse_backend='torch', "
                               "or run spconv inside evolsplat_ns.threads.torch_threads(1)")
        coords = x.coords
        idx = coords.to(torch.int32).contiguous()
        shape = self._input_shape(coords, x.spatial_range)
        batch_size = int(coords[:, 0].max()) + 1
        t = spconv.SparseConvTensor(x.feats.contiguous(), idx, shape, batch_size)
        x0 = self.conv0(t)
        x1, r1 = self._down(self.conv1, x0, x.spatial_range)
        x2 = self.conv2(x1)
        x3, r2 = self._down(self.conv3, x2, r1)
        x4 = self.conv4(x3)
        x5, _ = self._down(self.conv5, x4, r2)
        y = self.conv6(x5)
        y = self._up(self.conv7, y)
        y = y.replace_feature(x4.features + y.features)
        y = self._up(self.conv9, y)
        y = y.replace_feature(x2.features + y.features)
        y = self._up(self.conv11, y)
        feats = x0.features + y.features  # rows of y.indices (= x0.indices: the inverse conv returns them)
        if y.indices is not idx and not torch.equal(y.indices, idx):  # pragma: no cover - spconv 2.3.8 keeps them
            from .kernel_map import CoordIndex

            feats = feats[CoordIndex(y.indices.long()).lookup(coords)]
        return x.replace(feats)
