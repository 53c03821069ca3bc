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


@pytest.fixture(scope="module")
def segment_size_runs():
    """At ~100k voxels on the GPU: the float64 gather path and both float32 paths (values, input gradient, weight
    gradients), in eval mode (batch norm with running statistics: each convolution linear) and in training mode
    (the implicit GEMM twice, for determinism)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    torch.manual_seed(0)  # the networks' initial weights: the rounding checked below depends on them
    g = torch.Generator().manual_seed(0)
    xyz = torch.unique((torch.randn(150_000, 3, generator=g) * torch.tensor([60.0, 8.0, 60.0])).long() + 200, dim=0)
    c = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).to(dev)
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
    for name, impl in (("train_gather", "gather"), ("train_igemm", "igemm"), ("train_igemm_again", "igemm")):
        net = nets[impl]
        net.load_state_dict(ref_net.state_dict())  # same running statistics before each training-mode pass
        net.train().zero_grad()
        out[name] = _unet_run(net, f, c, cache)
    return out


@pytest.mark.gpu
def test_cuda_igemm_equals_gather_at_segment_size(segment_size_runs):
    """The compiled kernels against the gather-scatter twin, both in float32 against the float64 gather path:

    * eval mode: values within 1e-5 of their largest value, the input gradient within 1e-4 beyond the gather
      path's error (on the H200: 3.3e-5, gather 1.1e-7; TF32 products would be ~1e-3);
    * training mode: batch norm's backward over the small coarse levels amplifies float32 rounding, by an amount
      that depends on the initial weights. On the H200 the implicit GEMM's input gradient was 1.4e-4, 5.7e-4 and
      3.8e-3 from float64 in three runs with different weights, the gather path's 2e-7 to 3e-7 (each kernel alone
      is within 1e-6 of float64 there; under Triton's CPU interpreter both paths are 2e-7; the cause on the GPU is
      not known, BENCHMARKS session 12). So the bound is 1e-2 beyond the gather path's error: far below what a wrong
      neighbour gives (order 1); TF32 products are caught by the eval-mode bound above;
    * the implicit GEMM is deterministic: two backward passes give bitwise equal gradients.
    """
    r = segment_size_runs
    (y64, g64, _), (ya, ga, _), (yb, gb, _) = r["eval64"], r["eval_gather"], r["eval_igemm"]
    assert _err(yb, y64) < 1e-5 and _err(ya, y64) < 1e-5, (_err(yb, y64), _err(ya, y64))
    assert _err(gb, g64) <= 4 * _err(ga, g64) + 1e-4, (_err(gb, g64), _err(ga, g64))
    (_, t64, _), (_, t32, _), (_, ti, _) = r["train64"], r["train_gather"], r["train_igemm"]
    assert _err(ti, t64) <= 4 * _err(t32, t64) + 1e-2, (_err(ti, t64), _err(t32, t64))
    (_, g1, p1), (_, g2, p2) = r["train_igemm"], r["train_igemm_again"]
    assert torch.equal(g1, g2) and all(torch.equal(u, v) for u, v in zip(p1, p2))


@pytest.mark.gpu
def test_cuda_igemm_weight_gradients_at_segment_size(segment_size_runs):
    """Every kernel's weight gradient within 5e-4 (eval mode) or 2e-3 (training mode) of its largest value beyond
    the gather path's error. Measured on the H200 (the largest over the kernels): eval 1.2e-4 (gather 9e-7),
    training 4.0e-4 (gather 5e-5), with the input gradients above arriving from the later layers. TF32 products
    would be ~1e-3 in eval mode."""
    r = segment_size_runs
    for mode, bound in (("eval", 5e-4), ("train", 2e-3)):
        for u, v, ref in zip(r[f"{mode}_gather"][2], r[f"{mode}_igemm"][2], r[f"{mode}64"][2]):
            assert _err(v, ref) <= 4 * _err(u, ref) + bound, (mode, _err(v, ref), _err(u, ref))
