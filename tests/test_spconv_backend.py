"""spconv 2.x as a third backend of the sparse U-Net (evolsplat_ns.model.sparse.spconv_unet).

:class:`SpconvUNet` loaded with :class:`SparseUNet`'s state dict must give the same features and the same
gradients (input features, every kernel in our ``[27, C_in, C_out]`` layout, BatchNorm affine parameters) and the
same BatchNorm running statistics, on inputs whose borders exercise the strided output rule. Skipped where spconv
is not importable. On the CPU spconv runs its native algorithm (single-threaded: see
``evolsplat_ns.threads.torch_threads``), on CUDA the implicit GEMM one.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

spconv = pytest.importorskip("spconv.pytorch")

from evolsplat_ns.model.sparse import SparseTensor, SparseUNet, sparse_conv3d  # noqa: E402
from evolsplat_ns.model.sparse.spconv_unet import (  # noqa: E402
    SpconvConv3d,
    SpconvUNet,
    from_spconv_weight,
    to_spconv_weight,
)
from evolsplat_ns.threads import torch_threads  # noqa: E402


# ---------------------------------------------------------------------------------------------------- inputs
def _cloud(case: str, seed: int = 0, device="cpu"):
    """``(coords [N, 4], spatial_range or None)``, rows shuffled (the output must follow the input's row order).

    * ``odd`` / ``even``: random occupancy of a box whose largest coordinate is odd / even on every axis (voxels on
      the far border: an odd border reaches no coarse output);
    * ``gap``: a block plus lone voxels far out (x = 27, y = 26) with nothing just below them - the coarse levels'
      largest coordinate then falls short of spconv's propagated spatial shape (the case the per-level spatial
      shape handles);
    * ``batch``: two batch items of different extents;
    * ``range``: a ``spatial_range`` larger than the coordinates (ours and spconv's shapes both follow the range).
    """
    g = torch.Generator().manual_seed(seed)

    def box(shape, p, b=0):
        xyz = (torch.rand(shape, generator=g) < p).nonzero()
        return torch.cat([torch.full((len(xyz), 1), b, dtype=torch.long), xyz], 1)

    rng = None
    if case == "odd":
        c = box((28, 26, 24), 0.1)  # largest coordinates 27, 25, 23
        c = torch.cat([c, torch.tensor([[0, 27, 25, 23], [0, 27, 0, 0], [0, 0, 25, 5]])])
    elif case == "even":
        c = box((29, 27, 25), 0.1)  # largest coordinates 28, 26, 24
        c = torch.cat([c, torch.tensor([[0, 28, 26, 24], [0, 28, 3, 0], [0, 2, 26, 24]])])
    elif case == "gap":
        c = box((21, 19, 24), 0.12)
        c = torch.cat([c, torch.tensor([[0, 27, 5, 4], [0, 3, 26, 4], [0, 20, 18, 23]])])
    elif case == "batch":
        c = torch.cat([box((26, 25, 24), 0.06, 0), box((24, 28, 23), 0.06, 1)])
    elif case == "range":
        c = box((25, 24, 23), 0.1)
        rng = (31, 30, 29)
    else:
        raise ValueError(case)
    c = torch.unique(c, dim=0)
    c = c[torch.randperm(len(c), generator=g)]
    return c.to(device), rng


def _ours() -> SparseUNet:
    """Ours on its gather-scatter path (``impl="auto"`` would take the Triton one on CUDA; float64 needs this one)."""
    return SparseUNet(3, 16, impl="gather")


def _models(seed: int = 0, device="cpu"):
    """Ours with random kernels *and* random BatchNorm statistics / affine parameters, and spconv loaded from it."""
    torch.manual_seed(seed)
    ours = _ours()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    sp = SpconvUNet(3, 16)
    sp.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), sp.to(device)


def _run(model, coords, feats, rng, head):
    """Forward + a fixed loss; returns (output, d loss / d input feats, {name: grad}, state dict after)."""
    f = feats.clone().requires_grad_(True)
    out = model(SparseTensor(f, coords, spatial_range=rng)).feats
    loss = (out * head).sum() + 0.5 * out.square().sum()
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [f] + [p for _, p in model.named_parameters()])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out.detach(), grads[0], dict(zip(names, grads[1:])), state


def _rel(a, b) -> float:
    """Max abs difference relative to ``b``'s max abs value (at least 1)."""
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1.0)


def _assert_close(a, b, what, rel=1e-4):
    err = _rel(a, b)
    assert err <= rel, f"{what}: max abs diff {err:.3g} x max(|ours|, 1)"


def _compare(coords, rng, train: bool, device="cpu", dtype=torch.float32, rel=1e-4):
    """Ours vs spconv from the same state: output, input-feature gradient, every parameter gradient (kernels in our
    layout: they are our parameters) and the state dict after the step (BatchNorm running statistics)."""
    ours, sp = _models(1, device)
    ours.to(dtype).train(train)
    sp.to(dtype).train(train)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(len(coords), 3, generator=g).to(device, dtype)
    head = torch.randn(len(coords), 16, generator=g).to(device, dtype)
    a = _run(ours, coords, feats, rng, head)
    with torch_threads(1) if device == "cpu" else contextlib.nullcontext():
        b = _run(sp, coords, feats, rng, head)
    _assert_close(b[0], a[0], "output features", rel)
    _assert_close(b[1], a[1], "input-feature gradient", rel)
    assert a[2].keys() == b[2].keys() and len(a[2]) == 30  # 10 kernels, 10 BatchNorm weights and biases
    for k in a[2]:
        assert a[2][k].shape == b[2][k].shape, k
        _assert_close(b[2][k], a[2][k], f"gradient of {k}", rel)
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        _assert_close(b[3][k], a[3][k], f"state {k}", rel)
    return a, b


# ---------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("case", ["odd", "even", "gap", "batch", "range"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spconv_unet_equals_ours(case, train, dtype):
    """float64: equal to rounding (1e-9), the proof that maps, taps and row orders agree; float32: within 1e-4."""
    coords, rng = _cloud(case)
    assert 300 <= len(coords) <= 3000
    _compare(coords, rng, train, dtype=dtype, rel=1e-9 if dtype == torch.float64 else 1e-4)


def test_gap_case_needs_per_level_spatial_shape(monkeypatch):
    """With spconv's own shape propagation (S -> (S - 3) // 2 + 1 from the input's shape) the ``gap`` cloud gets an
    extra row at stride 4 and different features: the per-level spatial shape is what makes the output sets equal."""
    coords, _ = _cloud("gap")
    ours, sp = _models(1)
    ours.eval()
    sp.eval()
    x = SparseTensor(torch.randn(len(coords), 3), coords)
    shapes = []

    def spconv_propagation(c, r):  # largest coordinate + 1 at the first level, then (S - 3) // 2 + 1 per level
        # calls: the forward's input, then the input of each strided conv (the first one is the input again)
        s = (c[:, 1:].max(0).values + 1).tolist() if len(shapes) < 2 else [(v - 3) // 2 + 1 for v in shapes[-1]]
        shapes.append(s)
        return s

    with torch.no_grad(), torch_threads(1):
        want = ours(x).feats
        assert float((sp(x).feats - want).abs().max()) < 1e-4
        monkeypatch.setattr(SpconvUNet, "_input_shape", staticmethod(spconv_propagation))
        got = sp(x).feats
    assert shapes[2] == [13, 13, 11]  # stride 2: the propagated shape; the largest coordinates there are (10, 12, 10)
    assert float((got - want).abs().max()) > 1e-3


def _row_key(c):
    return ((c[:, 0] * 64 + c[:, 1]) * 64 + c[:, 2]) * 64 + c[:, 3]


@pytest.mark.parametrize("kind", ["subm", "down", "inverse"])
def test_single_conv_weight_mapping(kind):
    """One convolution of each kind with a random kernel (float64): spconv, given ``to_spconv_weight(kernel)``,
    equals ``sparse_conv3d`` with ``kernel`` row for row, values and kernel gradients. A wrong tap order or a flip
    would not."""
    coords, _ = _cloud("odd", seed=3)
    torch.manual_seed(5)
    cin, cout = 4, 5
    f = torch.randn(len(coords), cin, dtype=torch.float64)
    shape = (coords[:, 1:].max(0).values + 1).tolist()
    conv = SpconvConv3d(cin, cout, kind, "k").double()
    with torch_threads(1):
        t = spconv.SparseConvTensor(f, coords.int(), shape, 1)
        x = SparseTensor(f, coords)
        if kind == "inverse":  # coarse input from a strided conv sharing the indice key, then back up
            down = SpconvConv3d(cin, cin, "down", "k").double()
            t = down(t)
            x = sparse_conv3d(x, down.kernel.detach(), stride=2)
            assert x.num_voxels == t.indices.shape[0]
            cf = torch.randn(t.features.shape[0], cin, dtype=torch.float64)
            t = t.replace_feature(cf)
            pos = {int(k): i for i, k in enumerate(_row_key(t.indices.long()))}  # our coarse rows -> spconv's
            x = x.replace(cf[torch.tensor([pos[int(k)] for k in _row_key(x.coords)])])
            want = sparse_conv3d(x, conv.kernel, stride=2, transposed=True)
        else:
            want = sparse_conv3d(x, conv.kernel, stride=1 if kind == "subm" else 2)
        y = conv(t)
        ks, ko = _row_key(y.indices.long()), _row_key(want.coords)
        so, sw = torch.argsort(ks), torch.argsort(ko)
        assert torch.equal(ks[so], ko[sw]), "different output coordinates"
        head = torch.randn(len(so), cout, dtype=torch.float64)
        gs = torch.autograd.grad((y.features[so] * head).sum(), conv.kernel)[0]
        gw = torch.autograd.grad((want.feats[sw] * head).sum(), conv.kernel)[0]
    _assert_close(y.features[so].detach(), want.feats[sw].detach(), "features", 1e-12)
    _assert_close(gs, gw, "kernel gradient", 1e-12)


def test_weight_layout_helpers():
    k = torch.randn(27, 4, 5)
    w = to_spconv_weight(k)
    assert w.shape == (5, 3, 3, 3, 4) and w.is_contiguous()
    for a, b, c in ((0, 0, 0), (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 2, 0), (2, 1, 1)):
        assert torch.equal(w[:, a, b, c, :], k[a + 3 * b + 9 * c].t())
    assert torch.equal(from_spconv_weight(w), k)


def test_state_dict_round_trip():
    ours, sp = _models(7)
    ref = ours.state_dict()
    got = sp.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape and torch.equal(got[k], ref[k]), k
    assert [(n, p.shape) for n, p in sp.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    back = SparseUNet(3, 16)
    back.load_state_dict(got, strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert not any("op." in k for k in got)  # the spconv modules hold no parameter of their own


def test_model_option_selects_the_backend():
    """``sparse_backend`` / ``sparse_conv_impl`` of the model config reach the U-Net; a checkpoint's encoder weights
    load into every backend."""
    from evolsplat_ns.model.sparse import build_unet

    ours = build_unet("torch", 3, 16, impl="gather")
    assert type(ours) is SparseUNet and ours.conv0.net[0].impl == "gather"
    assert build_unet("torch", 3, 16).conv11.net[0].impl == "auto"
    sp = build_unet("spconv", 3, 16)
    assert isinstance(sp, SpconvUNet)
    sp.load_state_dict(ours.state_dict(), strict=True)
    with pytest.raises(ValueError, match="unknown sparse backend"):
        build_unet("minkowski", 3, 16)


# ---------------------------------------------------------------------------------------------------- GPU
def _street_like(seed: int = 11, n: int = 120_000):
    """~100k voxels of thin surfaces (ground, two walls) and scattered voxels in a 400 x 120 x 60 box, shuffled."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.randint(0, 400, (n,), generator=g), torch.randint(0, 120, (n,), generator=g)
    zs, sel = torch.randint(0, 60, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    ground = torch.stack([xs, ys, zs % 2], 1)
    wall = torch.stack([xs, torch.where(ys % 2 == 0, 0, 119), zs], 1)
    blob = torch.stack([xs, ys, zs], 1)
    xyz = torch.where((sel == 0)[:, None], ground, torch.where((sel == 1)[:, None], wall, blob))
    c = torch.unique(torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1), dim=0)
    return c[torch.randperm(len(c), generator=g)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("train", [False, True])
def test_spconv_unet_equals_ours_cuda(train):
    """~100k voxels on the GPU: spconv's implicit GEMM (float32, TF32 off - its default) against ours in float32
    and, for the gradients, against ours in float64.

    Forward features and running statistics: within 2e-4 of ours (float32). Gradients: in eval mode within 1e-4;
    in training mode BatchNorm's backward through batch statistics of the small coarse levels amplifies float32
    rounding - ours float32 vs ours float64 alone differs by ~1e-2 (input features) to ~3e-2 (some parameters) of
    the scale on this cloud (measured on the CPU) - so there spconv must be as close to the float64 reference as
    ours is: error <= 4 x ours' error + 1e-3. A wrong tap, flip or row order gives O(1) differences either way.
    """
    import copy

    import spconv.constants

    assert not spconv.constants.SPCONV_ALLOW_TF32
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        c = _street_like().cuda()
        assert 80_000 <= len(c) <= 130_000
        ours, sp = _models(1, "cuda")
        ours64 = copy.deepcopy(ours).double()
        g = torch.Generator().manual_seed(2)
        feats = torch.randn(len(c), 3, generator=g).cuda()
        head = torch.randn(len(c), 16, generator=g).cuda()
        runs = {}
        for name, model, dt in (("o32", ours, torch.float32), ("o64", ours64, torch.float64),
                                ("s32", sp, torch.float32)):
            runs[name] = _run(model.train(train), c, feats.to(dt), None, head.to(dt))
        o32, o64, s32 = runs["o32"], runs["o64"], runs["s32"]
        _assert_close(s32[0], o32[0], "output features", 2e-4)
        for k in o32[3]:
            _assert_close(s32[3][k], o32[3][k], f"state {k}", 2e-4)
        assert s32[2].keys() == o32[2].keys()
        pairs = [("input-feature gradient", s32[1], o32[1], o64[1])]
        pairs += [(f"gradient of {k}", s32[2][k], o32[2][k], o64[2][k]) for k in o32[2]]
        for what, s, o, ref in pairs:
            if train:
                es, eo = _rel(s, ref), _rel(o, ref)
                assert es <= 4 * eo + 1e-3, f"{what}: spconv {es:.3g}, ours (float32) {eo:.3g} from float64"
            else:
                _assert_close(s, o, what, 1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
