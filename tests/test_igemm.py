"""The Triton implicit-GEMM sparse convolution (evolsplat_ns.model.sparse.igemm) against its pure-PyTorch twin.

On the CPU the kernels run under Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` there), so the inputs
are small; the GPU tests compile them and compare at the size of a driving segment.
"""

from __future__ import annotations

import pytest
import torch

from evolsplat_ns.model.sparse import KernelMapCache, SparseTensor, SparseUNet, build_downsample_map
from evolsplat_ns.model.sparse import igemm as ig
from evolsplat_ns.model.sparse.ops import resolve_impl, sparse_conv
from sparse_fixtures import street_voxels

pytestmark = pytest.mark.skipif(not ig.available(), reason="Triton not installed")
cpu_interpreter = pytest.mark.skipif(not ig.interpreting(), reason="Triton not in interpreter mode (GPU run)")


def random_coords(n_side: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand((n_side,) * 3, generator=g) < p).nonzero()
    xyz = xyz[torch.randperm(len(xyz), generator=g)]
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)


def reference(x, w, nbr):
    """``sum_k x[nbr[:, k]] @ w[k]`` by a Python loop over offsets (independent of both implementations)."""
    out = x.new_zeros((nbr.shape[0], w.shape[2]))
    for k in range(nbr.shape[1]):
        ok = nbr[:, k] >= 0
        out[ok] += x[nbr[ok, k].long()] @ w[k]
    return out


@cpu_interpreter
@pytest.mark.parametrize("ci,co", [(3, 16), (16, 16), (32, 64), (64, 32)])
def test_kernels_equal_reference(ci, co):
    g = torch.Generator().manual_seed(ci * 100 + co)
    n_in, m, kv = 40, 70, 27
    x = torch.randn(n_in, ci, generator=g)
    w = torch.randn(kv, ci, co, generator=g)
    nbr = torch.randint(-1, n_in, (m, kv), generator=g, dtype=torch.int32)
    nbr[torch.rand(m, kv, generator=g) < 0.5] = -1  # half the offsets missing, some rows empty
    nbr[:5] = -1
    torch.testing.assert_close(ig.igemm(x, w, nbr), reference(x, w, nbr), rtol=1e-5, atol=1e-4)
    # reversed columns, transposed weights through strides (the input-gradient call)
    wt = torch.randn(kv, co, ci, generator=g).transpose(1, 2)
    torch.testing.assert_close(ig.igemm(x, wt, nbr, flip=True), reference(x, wt, nbr.flip(1)), rtol=1e-5, atol=1e-4)
    # weight gradient, reduced over several chunks of rows
    gout = torch.randn(m, co, generator=g)
    ref = torch.zeros(kv, ci, co)
    for k in range(kv):
        ok = nbr[:, k] >= 0
        ref[k] = x[nbr[ok, k].long()].t() @ gout[ok]
    torch.testing.assert_close(ig.igemm_weight_grad(x, gout, nbr, rows_per_prog=16), ref, rtol=1e-5, atol=1e-4)


def test_inverse_table_lists_every_pair_backwards():
    c = random_coords(9, 0.3, seed=3)
    kmap, _, _ = build_downsample_map(c)
    inv = kmap.inverse()
    assert inv.shape == (len(c), 27) and inv.dtype == torch.int32
    i_in, i_out, k = kmap.pairs()
    assert torch.equal(inv[i_in, k].long(), i_out)
    assert int((inv >= 0).sum()) == len(i_in)  # nothing else


@cpu_interpreter
def test_unet_igemm_equals_gather_values_and_gradients():
    """The whole U-Net (submanifold, strided and transposed convolutions, with batch norm in training mode): the
    implicit GEMM gives the gather-scatter path's features, input gradients and kernel gradients."""
    c = random_coords(10, 0.25, seed=5)
    f = torch.randn(len(c), 3, generator=torch.Generator().manual_seed(1))
    nets = {impl: SparseUNet(3, 16, impl=impl).train() for impl in ("gather", "igemm")}
    nets["igemm"].load_state_dict(nets["gather"].state_dict())
    res = {}
    for impl, net in nets.items():
        x = f.clone().requires_grad_()
        y = net(SparseTensor(x, c), cache=KernelMapCache()).feats
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        res[impl] = (y.detach(), x.grad, {n: p.grad for n, p in net.named_parameters() if n.endswith("kernel")})
    (ya, ga, ka), (yb, gb, kb) = res["gather"], res["igemm"]
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4)
    assert len(ka) == 10
    for n in ka:
        torch.testing.assert_close(kb[n], ka[n], rtol=1e-4, atol=1e-3 * ka[n].abs().max().item(), msg=n)


def test_impl_choice_and_errors():
    x = torch.randn(4, 3)
    assert resolve_impl("auto", x) == "gather"  # the CPU default is the pure-PyTorch path
    assert resolve_impl("auto", x.double()) == "gather"
    with pytest.raises(ValueError, match="unknown convolution implementation"):
        resolve_impl("fast", x)
    c = random_coords(5, 0.5, seed=0)
    kmap, _, _ = build_downsample_map(c)
    with pytest.raises(TypeError, match="float32"):
        sparse_conv(torch.randn(len(c), 3, dtype=torch.float64), torch.randn(27, 3, 4, dtype=torch.float64), kmap,
                    impl="igemm")
    with pytest.raises(ValueError, match="input rows"):
        sparse_conv(torch.randn(len(c) + 1, 3), torch.randn(27, 3, 4), kmap, impl="igemm")


def _unet_run(net, f, c, cache, dtype=torch.float32):
    x = f.to(dtype).clone().requires_grad_()
    y = net(SparseTensor(x, c), cache=cache).feats
    (y * torch.linspace(-1, 1, y.numel(), device=y.device, dtype=dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in net.parameters()]


def _err(u, ref):
    """Largest difference from the float64 reference, relative to the reference's largest value."""
    return ((u.double() - ref).abs().max() / ref.abs().max()).item()


def _l2(u, ref):
    """Norm of the difference from the float64 reference, relative to the reference's norm."""
    return ((u.double() - ref).norm() / ref.norm()).item()


GRAD_L2 = 2e-2
GRAD_MAX = 0.2
"""Gradient bounds at a segment's size. The U-Net's gradients are ill-conditioned in float32: a ReLU whose input is
near zero flips under another rounding, and training-mode batch norm spreads that over its channel. On the CPU, the
pure-PyTorch twin's own gradients moved this much when its input was changed by 1e-6 relative (93 k voxels, four
weight seeds; BENCHMARKS, session 12): input gradient up to 3.5e-2 of its largest value (norm 2.9e-3), weight
gradients up to 2.8e-2 (norm 5.0e-3); in training mode the twin itself is 1.4e-2 to 2.4e-2 from float64 there. So a
float32 path summing in another order cannot be held to float64 more tightly than that; the bounds are 4x the
measured norm and ~6x the measured maximum, while a wrong neighbour table moves whole rows (order 1)."""


@pytest.fixture(scope="module")
def segment_size_runs():
    """At ~140 k voxels on the GPU: the float64 gather path and the float32 paths (values, input gradient, weight
    gradients), in eval mode (batch norm with running statistics: both float32 paths) and in training mode (the
    implicit GEMM twice, for determinism)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    torch.manual_seed(0)  # the networks' initial weights: the rounding checked below depends on them
    g = torch.Generator().manual_seed(0)
    c = street_voxels(g, dev)
    f = torch.randn(len(c), 3, generator=g).to(dev)
    nets = {impl: SparseUNet(3, 16, impl=impl).to(dev) for impl in ("gather", "igemm")}
    cache = KernelMapCache()
    with torch.no_grad():  # non-trivial running statistics for eval mode
        nets["gather"].train()(SparseTensor(f, c), cache=cache)
    nets["igemm"].load_state_dict(nets["gather"].state_dict())
    ref_net = SparseUNet(3, 16, impl="gather").to(dev).double()
    ref_net.load_state_dict(nets["gather"].state_dict())
    out = {"eval64": _unet_run(ref_net.eval(), f, c, KernelMapCache(), torch.float64)}
    for impl, net in nets.items():
        net.eval().zero_grad()
        out[f"eval_{impl}"] = _unet_run(net, f, c, cache)
    out["train64"] = _unet_run(ref_net.train(), f, c, KernelMapCache(), torch.float64)
    for name, impl in (("train_igemm", "igemm"), ("train_igemm_again", "igemm")):
        net = nets[impl]
        net.load_state_dict(ref_net.state_dict())  # same running statistics before each training-mode pass
        net.train().zero_grad()
        out[name] = _unet_run(net, f, c, cache)
    return out


@pytest.mark.gpu
def test_cuda_igemm_equals_gather_at_segment_size(segment_size_runs):
    """The compiled kernels against the float64 gather path at a segment's size:

    * values (eval mode) within 1e-5 of their largest value, as the gather path's: TF32 products (~1e-3) or a wrong
      neighbour fail here;
    * the input gradient, in eval and in training mode, within :data:`GRAD_L2` in norm and :data:`GRAD_MAX` at
      most (why not tighter: :data:`GRAD_L2`). On the H200 the largest differences were 3.3e-5 (eval) and 1.4e-4,
      5.7e-4 and 3.8e-3 (training, three runs with other weights);
    * the implicit GEMM is deterministic: two backward passes give bitwise equal gradients.
    """
    r = segment_size_runs
    (y64, _, _), (ya, _, _), (yb, _, _) = r["eval64"], r["eval_gather"], r["eval_igemm"]
    assert _err(yb, y64) < 1e-5 and _err(ya, y64) < 1e-5, (_err(yb, y64), _err(ya, y64))
    for mode in ("eval", "train"):
        ref, got = r[f"{mode}64"][1], r[f"{mode}_igemm"][1]
        assert _l2(got, ref) <= GRAD_L2 and _err(got, ref) <= GRAD_MAX, (mode, _l2(got, ref), _err(got, ref))
    (_, g1, p1), (_, g2, p2) = r["train_igemm"], r["train_igemm_again"]
    assert torch.equal(g1, g2) and all(torch.equal(u, v) for u, v in zip(p1, p2))


@pytest.mark.gpu
def test_cuda_igemm_weight_gradients_at_segment_size(segment_size_runs):
    """Every kernel's weight gradient through the whole U-Net in eval mode, within :data:`GRAD_L2` of float64 in norm
    and :data:`GRAD_MAX` at most (the H200: 1.2e-4 at most).

    Not in training mode: there batch norm normalises with the batch's own statistics, and a pre-activation near zero
    that rounds to the other side of a ReLU moves its channel's statistics, so the whole network's parameter
    gradients depend chaotically on float32 rounding. On the H200 (session 13) the implicit GEMM's were 6.2e-2 from
    float64 in norm for the first layer's kernel and 0.31 for a 16-channel parameter deeper in; the CPU twin is
    1.4e-2 to 2.4e-2 from float64 there (session 12). No bound separates that from a bug, so training mode is covered
    by the kernel's own gradients layer by layer at this size (below), the whole U-Net in training mode against the
    gather path under the CPU interpreter (``test_unet_igemm_equals_gather_values_and_gradients``) and the input
    gradient and determinism above."""
    r = segment_size_runs
    for i, (got, ref) in enumerate(zip(r["eval_igemm"][2], r["eval64"][2])):
        assert _l2(got, ref) <= GRAD_L2 and _err(got, ref) <= GRAD_MAX, (i, _l2(got, ref), _err(got, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed"])
def test_cuda_igemm_layer_gradients_at_segment_size(kind):
    """One convolution at a segment's size (~140 k voxels, 16 -> 32 channels), each kind of map the U-Net uses: the
    implicit GEMM's output, input gradient and weight gradient against the float64 gather path, within 2e-5 of the
    largest value (float32 sums of up to ~10^5 products; TF32 products, ~1e-3, or a wrong row fail)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    c = street_voxels(g, dev)
    cache = KernelMapCache()
    if kind == "submanifold":
        kmap, transposed = cache.submanifold(c, 1), False
    else:
        kmap, transposed = cache.downsample(c, 1)[0], kind == "transposed"
    n_in = kmap.n_out if transposed else kmap.n_in
    x = torch.randn(n_in, 16, generator=g).to(dev)
    w = (torch.randn(27, 16, 32, generator=g) / 12).to(dev)
    res = {}
    for impl, dt in (("igemm", torch.float32), ("gather", torch.float64)):
        xi, wi = x.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        y = sparse_conv(xi, wi, kmap, transposed, impl=impl)
        gout = torch.linspace(-1, 1, y.numel(), device=dev, dtype=dt).view_as(y)
        y.backward(gout)
        res[impl] = (y.detach(), xi.grad, wi.grad)
    for name, got, ref in zip(("output", "input gradient", "weight gradient"), res["igemm"], res["gather"]):
        assert got.dtype == torch.float32 and _err(got, ref) < 2e-5, (kind, name, _err(got, ref))
