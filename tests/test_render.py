"""Renderer: the pure-PyTorch reference rasterizer (CPU) and, on CUDA, gsplat against it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evolsplat_ns.cameras import project_points
from evolsplat_ns.model.rasterize_torch import rasterize_gaussians_torch, sh_basis
from evolsplat_ns.model.render import render_gaussians, resolve_backend

SH_C0 = 0.2820947917738781


def look_at(eye, target, up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """OpenCV c2w looking from ``eye`` at ``target`` (``up`` roughly the camera's -y)."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(-np.asarray(up), z)  # y_cam = down = -up
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, eye
    return torch.from_numpy(T)


def tiny_scene(dtype=torch.float64):
    """5 Gaussians in front of a slightly rotated camera, two of them nearly opaque and overlapping."""
    c2w = look_at([0.3, -0.2, -0.5], [0.0, 0.0, 4.0])
    K = torch.tensor([[20.0, 0.0, 12.3], [0.0, 22.0, 7.9], [0.0, 0.0, 1.0]], dtype=torch.float64)
    means = torch.tensor(
        [[0.0, 0.0, 4.0], [0.3, 0.1, 3.0], [0.25, 0.05, 3.5], [-0.6, -0.3, 5.0], [0.1, 0.4, 2.5]],
        dtype=torch.float64,
    )
    quats = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, -0.3, 0.2], [0.5, 0.5, 0.5, -0.5], [2.0, 0.3, 0.0, 0.1],
         [0.7, -0.2, 0.4, 0.0]],
        dtype=torch.float64,
    )
    scales = torch.tensor(
        [[0.5, 0.4, 0.3], [0.3, 0.1, 0.2], [0.2, 0.35, 0.1], [0.8, 0.3, 0.5], [0.05, 0.1, 0.08]],
        dtype=torch.float64,
    )
    opacities = torch.tensor([0.7, 0.999, 0.99, 0.5, 0.9], dtype=torch.float64)
    colors = torch.tensor(
        [[1.0, 0.2, 0.1], [0.1, 0.9, 0.2], [0.2, 0.3, 1.0], [0.8, 0.8, 0.1], [0.5, 0.1, 0.7]], dtype=torch.float64
    )
    cast = dict(dtype=dtype)
    return dict(means=means.to(**cast), quats=quats.to(**cast), scales=scales.to(**cast),
                opacities=opacities.to(**cast), colors=colors.to(**cast), c2w=c2w.to(**cast), K=K.to(**cast),
                width=24, height=16)


def brute_force(scene, background=(0.0, 0.0, 0.0), tile=16, near=0.01, far=1e10):
    """Per-pixel compositing with scalar loops in numpy float64 (independent of the vectorised rasterizer)."""
    mu = scene["means"].double().numpy()
    q = scene["quats"].double().numpy()
    s = scene["scales"].double().numpy()
    o = scene["opacities"].double().numpy()
    col = scene["colors"].double().numpy()
    c2w = scene["c2w"].double().numpy()
    K = scene["K"].double().numpy()
    W, H = scene["width"], scene["height"]
    w2c = np.linalg.inv(c2w)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    splats = []
    for i in range(mu.shape[0]):
        w, v = q[i, 0] / np.linalg.norm(q[i]), q[i, 1:] / np.linalg.norm(q[i])
        vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
        R = (w * w - v @ v) * np.eye(3) + 2 * np.outer(v, v) + 2 * w * vx
        cov = R @ np.diag(s[i] ** 2) @ R.T
        t = w2c[:3, :3] @ mu[i] + w2c[:3, 3]
        if not (near <= t[2] <= far):
            continue
        covc = w2c[:3, :3] @ cov @ w2c[:3, :3].T
        limx = (0.5 * W / fx) * 0.3
        limy = (0.5 * H / fy) * 0.3
        txz = min(max(t[0] / t[2], -(cx / fx + limx)), (W - cx) / fx + limx)
        tyz = min(max(t[1] / t[2], -(cy / fy + limy)), (H - cy) / fy + limy)
        J = np.array([[fx / t[2], 0, -fx * txz / t[2]], [0, fy / t[2], -fy * tyz / t[2]]])
        cov2 = J @ covc @ J.T + 0.3 * np.eye(2)
        det = np.linalg.det(cov2)
        if det <= 0:
            continue
        m2 = np.array([fx * t[0] / t[2] + cx, fy * t[1] / t[2] + cy])
        b = 0.5 * np.trace(cov2)
        r = math.ceil(3 * math.sqrt(b + math.sqrt(max(0.01, b * b - det))))
        if m2[0] + r <= 0 or m2[0] - r >= W or m2[1] + r <= 0 or m2[1] - r >= H:
            continue
        ntx, nty = math.ceil(W / tile), math.ceil(H / tile)
        tiles = (
            min(max(math.floor((m2[0] - r) / tile), 0), ntx), min(max(math.ceil((m2[0] + r) / tile), 0), ntx),
            min(max(math.floor((m2[1] - r) / tile), 0), nty), min(max(math.ceil((m2[1] + r) / tile), 0), nty),
        )
        splats.append((t[2], i, m2, np.linalg.inv(cov2), tiles))
    splats.sort(key=lambda x: (x[0], x[1]))
    img = np.zeros((H, W, 3))
    acc = np.zeros((H, W, 1))
    dep = np.zeros((H, W, 1))
    for row in range(H):
        for c in range(W):
            T, rgb, d = 1.0, np.zeros(3), 0.0
            for z, i, m2, P, (x0, x1, y0, y1) in splats:
                if not (x0 <= c // tile < x1 and y0 <= row // tile < y1):
                    continue
                delta = m2 - np.array([c + 0.5, row + 0.5])
                sigma = 0.5 * delta @ P @ delta
                alpha = min(0.999, o[i] * math.exp(-sigma))
                if sigma < 0 or alpha < 1.0 / 255.0:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    break
                rgb += alpha * T * col[i]
                d += alpha * T * z
                T *= 1 - alpha
            img[row, c] = rgb + T * np.asarray(background)
            acc[row, c, 0] = 1 - T
            dep[row, c, 0] = d / max(1 - T, 1e-10)
    return img, acc, dep, len(splats)


def _render(scene, **kw):
    return render_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"],
                            scene["c2w"], scene["K"], scene["width"], scene["height"], **kw)


# ------------------------------------------------------------------------------------------------ CPU tests
@pytest.mark.parametrize("tile", [16, 8, 4])
def test_matches_brute_force(tile):
    scene = tiny_scene()
    bg = (0.2, 0.4, 0.6)
    img, acc, dep, n_vis = brute_force(scene, background=bg, tile=tile)
    assert n_vis == 5
    assert acc.max() > 0.999  # the transmittance cut-off is exercised
    out = _render(scene, render_depth=True, background=torch.tensor(bg, dtype=torch.float64), backend="torch",
                  tile_size=tile)
    assert out["rgb"].shape == (16, 24, 3) and out["alpha"].shape == (16, 24, 1) and out["depth"].shape == (16, 24, 1)
    np.testing.assert_allclose(out["rgb"].numpy(), img, atol=1e-9)
    np.testing.assert_allclose(out["alpha"].numpy(), acc, atol=1e-9)
    np.testing.assert_allclose(out["depth"].numpy(), dep, atol=1e-7)


def test_tile_size_moves_only_the_three_sigma_cut():
    """A pixel composites the Gaussians whose 3-sigma box touches its tile: the tile size changes which pixels
    beyond a box are also evaluated, and there a Gaussian's alpha is below 0.011 of its opacity."""
    means, quats, scales, opac, colors, c2w, K = random_scene(n=60, device="cpu")
    scales, opac = scales * 4, opac.clamp_min(0.5)  # large, fairly opaque splats: the cut reaches alpha > 1/255
    ref = render_gaussians(means, quats, scales, opac, colors, c2w, K, 80, 64, backend="torch")
    for tile in (8, 4, 1):
        out = render_gaussians(means, quats, scales, opac, colors, c2w, K, 80, 64, backend="torch", tile_size=tile)
        for key in ("rgb", "alpha"):
            d = (out[key] - ref[key]).abs()
            assert d.max() < 0.011
            assert (d == 0).float().mean() > 0.99
    assert (out["alpha"] != ref["alpha"]).any()  # tile 1: the cut is exercised
    for bad in (0, 33):
        with pytest.raises(ValueError, match="tile_size"):
            render_gaussians(means, quats, scales, opac, colors, c2w, K, 80, 64, backend="torch", tile_size=bad)


def test_chunking_and_blocks_do_not_change_the_image():
    scene = tiny_scene()
    from evolsplat_ns.cameras import world_to_camera

    args = (scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"],
            world_to_camera(scene["c2w"])[None], scene["K"][None], 24, 16)
    ref_c, ref_a = rasterize_gaussians_torch(*args, render_mode="RGB+ED")
    for kw in (dict(max_pairs=1), dict(max_pairs=40, block_tiles=(1, 1)), dict(block_tiles=(3, 3))):
        c, a = rasterize_gaussians_torch(*args, render_mode="RGB+ED", **kw)
        torch.testing.assert_close(c, ref_c, atol=1e-12, rtol=0)
        torch.testing.assert_close(a, ref_a, atol=1e-12, rtol=0)


def test_gradients_exist_and_are_finite():
    scene = tiny_scene(torch.float32)
    params = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    scene.update(params)
    out = _render(scene, render_depth=True, backend="torch")
    w = torch.rand(out["rgb"].shape, generator=torch.Generator().manual_seed(0))
    ((out["rgb"] * w).sum() + out["alpha"].sum() + 0.1 * out["depth"].sum()).backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradcheck_small():
    scene = tiny_scene()
    scene["width"], scene["height"] = 10, 8
    scene["K"] = scene["K"].clone()
    scene["K"][0, 2], scene["K"][1, 2] = 5.1, 3.9
    means = scene["means"].clone().requires_grad_(True)
    opac = scene["opacities"].clone().requires_grad_(True)
    cols = scene["colors"].clone().requires_grad_(True)

    def f(m, o, c):
        out = render_gaussians(m, scene["quats"], scene["scales"], o, c, scene["c2w"], scene["K"], 10, 8,
                               backend="torch")
        return out["rgb"], out["alpha"]

    assert torch.autograd.gradcheck(f, (means, opac, cols), eps=1e-6, atol=1e-5)


def test_isotropic_peak_at_projected_pixel():
    c2w = look_at([0.0, 0.0, 0.0], [0.2, -0.1, 5.0])
    K = torch.tensor([[30.0, 0.0, 16.0], [0.0, 30.0, 12.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    # place the mean exactly behind the centre of pixel (row 7, col 21)
    u, v, depth = 21.5, 7.5, 4.0
    cam = torch.tensor([(u - 16.0) / 30.0 * depth, (v - 12.0) / 30.0 * depth, depth], dtype=torch.float64)
    mean = (c2w[:3, :3] @ cam + c2w[:3, 3])[None]
    uv, _ = project_points(mean, c2w[None], K[None])
    assert torch.allclose(uv[0, 0], torch.tensor([u, v], dtype=torch.float64))
    out = render_gaussians(mean, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                           torch.full((1, 3), 0.1, dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64),
                           torch.ones(1, 3, dtype=torch.float64), c2w, K, 32, 24, backend="torch")
    a = out["alpha"][..., 0]
    row, col = divmod(int(a.argmax()), 32)
    assert (row, col) == (7, 21)
    assert a[7, 21] == pytest.approx(0.8, abs=1e-9)  # peak value = opacity at the mean
    # symmetric around the peak (isotropic, centred on a pixel centre)
    assert a[7, 20] == pytest.approx(a[7, 22].item(), rel=1e-3)
    assert a[6, 21] == pytest.approx(a[8, 21].item(), rel=1e-3)


def test_depth_of_single_opaque_splat():
    c2w = look_at([1.0, 0.5, -2.0], [1.0, 0.5, 3.0])
    K = torch.tensor([[25.0, 0.0, 12.0], [0.0, 25.0, 8.0], [0.0, 0.0, 1.0]])
    z = 3.7
    mean = torch.tensor([[1.0, 0.5, -2.0 + z]])
    out = render_gaussians(mean, torch.tensor([[0.3, 0.1, 0.2, 0.9]]), torch.tensor([[0.6, 0.5, 0.4]]),
                           torch.tensor([0.99]), torch.tensor([[0.2, 0.5, 0.7]]), c2w.float(), K, 24, 16,
                           render_depth=True, backend="torch")
    mask = out["alpha"][..., 0] > 1e-3
    assert mask.sum() > 50
    assert torch.allclose(out["depth"][..., 0][mask], torch.full_like(out["depth"][..., 0][mask], z), atol=1e-4)
    assert 0.95 < out["alpha"].max() <= 0.99


def test_sh_degree0_equals_rgb():
    scene = tiny_scene()
    rgb_out = _render(scene, backend="torch")
    sh = ((scene["colors"] - 0.5) / SH_C0)[:, None, :]
    for degree, extra in ((0, 0), (1, 3)):  # degree 1 with zero higher bands gives the same colours
        coeffs = torch.cat([sh, torch.zeros(5, extra, 3, dtype=sh.dtype)], dim=1)
        out = render_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"], coeffs,
                               scene["c2w"], scene["K"], 24, 16, sh_degree=degree, backend="torch")
        torch.testing.assert_close(out["rgb"], rgb_out["rgb"], atol=1e-10, rtol=0)


def test_sh_view_dependence_and_clamp():
    # a degree-1 Gaussian whose colour depends on the viewing direction: Y_1^0 (index 2) = 0.4886 * z_dir
    c2w = torch.eye(4, dtype=torch.float64)
    K = torch.tensor([[20.0, 0.0, 8.0], [0.0, 20.0, 8.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mean = torch.tensor([[0.0, 0.0, 3.0]], dtype=torch.float64)  # direction from the camera: +z
    coeffs = torch.zeros(1, 4, 3, dtype=torch.float64)
    coeffs[0, 2] = torch.tensor([0.5, -0.5, -2.0])
    out = render_gaussians(mean, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                           torch.full((1, 3), 0.5, dtype=torch.float64), torch.tensor([0.999], dtype=torch.float64),
                           coeffs, c2w, K, 16, 16, sh_degree=1, backend="torch")
    c1 = 0.48860251190292
    expected = torch.clamp_min(torch.tensor([0.5 * c1, -0.5 * c1, -2.0 * c1], dtype=torch.float64) + 0.5, 0.0)
    torch.testing.assert_close(out["rgb"][8, 8] / out["alpha"][8, 8], expected, atol=1e-9, rtol=0)
    # gsplat's basis order / signs for degree 1: (-y, z, -x) * 0.4886
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(sh_basis(1, dirs)[:, 1:], -c1 * torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]]))


def test_batched_cameras_and_culling():
    scene = tiny_scene()
    c2w2 = torch.stack([scene["c2w"], look_at([0.5, 0.0, 0.0], [0.0, 0.0, 4.0])])
    out = render_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"],
                           c2w2, scene["K"], 24, 16, render_depth=True, backend="torch")
    assert out["rgb"].shape == (2, 16, 24, 3) and out["depth"].shape == (2, 16, 24, 1)
    single = _render(scene, render_depth=True, backend="torch")
    torch.testing.assert_close(out["rgb"][0], single["rgb"])
    # a camera looking away sees nothing; background fills the image
    away = look_at([0.0, 0.0, 0.0], [0.0, 0.0, -4.0])
    empty = render_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"],
                             away, scene["K"], 24, 16, background=torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                             backend="torch")
    assert empty["alpha"].abs().max() == 0
    torch.testing.assert_close(empty["rgb"], torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).expand(16, 24, 3))


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "gsplat"
    assert resolve_backend("torch", torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError):
        resolve_backend("cuda", torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ GPU tests
def random_scene(n=300, seed=0, device="cuda", sh_degree=None):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([1.5, 0.8, 1.0]) + torch.tensor([0.0, 0.0, 5.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    opac = torch.rand(n, generator=g) * 0.9 + 0.05
    if sh_degree is None:
        colors = torch.rand(n, 3, generator=g)
    else:
        colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    c2w = look_at([0.2, -0.1, 0.0], [0.0, 0.0, 5.0]).float()
    K = torch.tensor([[60.0, 0.0, 40.5], [0.0, 60.0, 31.0], [0.0, 0.0, 1.0]])
    return [t.to(device) for t in (means, quats, scales, opac, colors, c2w, K)]


@pytest.mark.gpu
@pytest.mark.parametrize("sh_degree,tile", [(None, 16), (2, 16), (2, 8)])
def test_gsplat_matches_torch_values(sh_degree, tile):
    means, quats, scales, opac, colors, c2w, K = random_scene(sh_degree=sh_degree)
    bg = torch.tensor([0.3, 0.2, 0.1], device="cuda")
    kw = dict(sh_degree=sh_degree, render_depth=True, background=bg, tile_size=tile)
    ref = render_gaussians(means, quats, scales, opac, colors, c2w, K, 80, 64, backend="torch", **kw)
    out = render_gaussians(means, quats, scales, opac, colors, c2w, K, 80, 64, backend="gsplat", **kw)
    for key in ("rgb", "alpha"):
        torch.testing.assert_close(out[key], ref[key], atol=2e-4, rtol=1e-4)
    m = ref["alpha"][..., 0] > 0.05
    torch.testing.assert_close(out["depth"][..., 0][m], ref["depth"][..., 0][m], atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
def test_gsplat_matches_torch_gradients():
    means, quats, scales, opac, colors, c2w, K = random_scene(seed=1)
    w = torch.rand(64, 80, 3, generator=torch.Generator().manual_seed(3)).cuda()
    grads = {}
    for backend in ("torch", "gsplat"):
        params = [t.clone().requires_grad_(True) for t in (means, opac, colors, scales, quats)]
        out = render_gaussians(params[0], params[4], params[3], params[1], params[2], c2w, K, 80, 64,
                               backend=backend)
        ((out["rgb"] * w).sum() + out["alpha"].sum()).backward()
        grads[backend] = [p.grad for p in params]
    for name, g_ref, g in zip(("means", "opacities", "colors", "scales", "quats"), grads["torch"], grads["gsplat"]):
        rel = (g - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
        assert rel < 1e-3, (name, rel.item())
