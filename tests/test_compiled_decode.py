"""The per-view decode (:meth:`GaussianHeads.decode`), its compiled twin (``compile_decode``) and the render options.

CPU: the one-function decode equals the heads it combines; the colour head applied by parts is the same network; the
dome's shapes and the tile size keep the image. GPU machine: a render through the compiled decode (fused kernels, and
CUDA graphs) equals the eager render of the same reconstruction; TF32 renders are scoped and close to float32.
"""

import pytest
import torch

from evolsplat_ns.model.heads import GaussianHeads, view_inputs
from model_fixtures import model_and_batch as _model_and_batch


def test_decode_equals_the_heads_it_combines():
    torch.manual_seed(0)
    heads = GaussianHeads(16, 3 * 9 * 4, sh_degree=1, colour_residual=True)
    torch.nn.init.normal_(heads.colour[-1].weight, std=0.1)  # a trained-looking colour head, not the zero start
    n = 50
    f3, fw, base = torch.randn(n, 16), torch.randn(n, 108), torch.rand(n, 3)
    means, base_log = torch.randn(n, 3) * 5, torch.randn(n, 3) - 3
    dist, direction = view_inputs(means, torch.zeros(3))
    scales, quats, opa, sh = heads.decode(f3, fw, torch.cat([dist, direction], -1), base, base_log)
    sh_ref, dlog, quats_ref, logit = heads.predict_view(f3, fw, dist, direction, base)
    torch.testing.assert_close(scales, torch.exp(dlog + base_log))
    torch.testing.assert_close(opa, torch.sigmoid(logit))
    torch.testing.assert_close(quats, quats_ref)
    torch.testing.assert_close(sh, sh_ref)


def test_colour_head_without_the_concatenated_input_is_the_same_network():
    """predict_colour applies the colour head's first layer to [fw, vd] by parts (no [N, D + 4] copy): the same
    function as the nn.Sequential on the concatenation, in values and in the weights' gradients."""
    torch.manual_seed(0)
    heads = GaussianHeads(16, 108, sh_degree=1).double()
    fw, vd = torch.randn(40, 108, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
    sh = heads.predict_colour(fw, vd)
    ref = heads.colour(torch.cat([fw, vd], -1)).reshape(-1, 4, 3)
    torch.testing.assert_close(sh, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(sh)
    g = torch.autograd.grad((sh * w).sum(), list(heads.colour.parameters()))
    g_ref = torch.autograd.grad((ref * w).sum(), list(heads.colour.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_render_options_keep_the_image_and_are_checked():
    """The dome's shapes (compact or fixed) give the same image through the model; the rasterizer tile size moves
    only the 3-sigma cut; an impossible tile size is refused when the model is built."""
    from evolsplat_ns.errors import ConfigError

    model, batch = _model_and_batch("cpu", points=3000, H=24, W=40)
    tgt = batch.target
    with torch.no_grad():
        shared = model.extract_shared(batch)
        out = {}
        for shapes in ("compact", "fixed"):
            model.config.bg_shapes = shapes
            out[shapes] = model.render_view(shared, tgt.extrinsics[0], tgt.intrinsics[0], 24, 40)
        model.config.raster_tile_size = 16
        out["tile16"] = model.render_view(shared, tgt.extrinsics[0], tgt.intrinsics[0], 24, 40)
    assert out["compact"]["accumulation"].mean() > 0.2
    torch.testing.assert_close(out["fixed"]["rgb"], out["compact"]["rgb"], atol=1e-6, rtol=0)
    assert (out["tile16"]["rgb"] - out["fixed"]["rgb"]).abs().max() < 0.011
    with pytest.raises(ConfigError, match="raster-tile-size"):
        _model_and_batch("cpu", points=100, H=8, W=8, raster_tile_size=64)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fuse", "graphs"])
def test_compiled_decode_renders_the_eager_image(mode):
    model, batch = _model_and_batch(view_cull=False, render_tf32=False)
    H, W = batch.target.height, batch.target.width
    with torch.no_grad():
        shared = model.extract_shared(batch)
        assert shared.num_gaussians > 1000
        tgt = batch.target
        ref = [model.render_view(shared, tgt.extrinsics[v], tgt.intrinsics[v], H, W) for v in range(2)]
        model.config.compile_decode = mode
        assert model.compiled_decode() is not None  # this render path applies
        for _ in range(3):  # compile, record, replay
            outs = [model.render_view(shared, tgt.extrinsics[v], tgt.intrinsics[v], H, W) for v in range(2)]
    for o, r in zip(outs, ref):
        assert r["accumulation"].mean() > 0.2  # a real picture
        torch.testing.assert_close(o["rgb"], r["rgb"], atol=2e-3, rtol=0)
        torch.testing.assert_close(o["accumulation"], r["accumulation"], atol=2e-3, rtol=0)


@pytest.mark.gpu
def test_tf32_render_is_scoped_and_close_to_float32():
    """render_tf32: a render without gradient runs its matmuls on TF32 and restores torch's flag; the image stays
    within a few 1e-3 of the float32 render; a render with gradient (training) is float32."""
    model, batch = _model_and_batch()
    tgt = batch.target
    H, W = tgt.height, tgt.width
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        shared = model.extract_shared(batch)
        fast = model.render_view(shared, tgt.extrinsics[0], tgt.intrinsics[0], H, W)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
        model.config.render_tf32 = False
        exact = model.render_view(shared, tgt.extrinsics[0], tgt.intrinsics[0], H, W)
    assert exact["accumulation"].mean() > 0.2
    assert 0 < (fast["rgb"] - exact["rgb"]).abs().max() < 1e-2  # TF32 was used, and it is close
    model.config.render_tf32 = True
    leaves = {k: v.detach().requires_grad_(True) for k, v in shared.outputs().items()}
    train = model.render_view(shared.with_outputs(leaves), tgt.extrinsics[0], tgt.intrinsics[0], H, W)
    torch.testing.assert_close(train["rgb"].detach(), exact["rgb"], atol=1e-5, rtol=0)
