"""Image-window features: projection, bilinear window samples, validity, visibility, projection mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evolsplat_ns.model.window_features import feature_dim, sample_window_features, window_offsets

H, W = 12, 16


def look_at(eye, target) -> torch.Tensor:
    """OpenCV c2w (x right, y down, z forward) at ``eye`` looking at ``target`` with world -y as up."""
    eye, target = np.asarray(eye, dtype=np.float64), np.asarray(target, dtype=np.float64)
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, eye
    return torch.from_numpy(T)


def cameras():
    c2w = torch.stack([
        look_at([0.0, 0.0, 0.0], [0.0, 0.0, 5.0]),
        look_at([1.0, -0.2, 0.0], [0.5, 0.0, 5.0]),
        look_at([-1.0, 0.3, 0.5], [0.0, 0.1, 6.0]),
    ])
    K = torch.tensor([[[12.0, 0.0, 8.0], [0.0, 11.0, 6.0], [0.0, 0.0, 1.0]],
                      [[14.0, 0.0, 7.5], [0.0, 14.0, 6.5], [0.0, 0.0, 1.0]],
                      [[10.0, 0.0, 8.2], [0.0, 10.0, 5.7], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    return c2w, K


def coordinate_images(V=3):
    """Pixel ``[i, j]`` of view ``k`` holds ``(j / 100, i / 100, k / 10)``: values encode their coordinates."""
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.stack([torch.stack([j / 100, i / 100, torch.full_like(i, k / 10)], -1) for k in range(V)])


def point_at(c2w, K, u, v, z):
    """World point that projects to continuous pixel ``(u, v)`` at depth ``z`` (hand-inverted pinhole)."""
    x = (u - K[0, 2]) / K[0, 0] * z
    y = (v - K[1, 2]) / K[1, 1] * z
    cam = torch.tensor([x, y, z], dtype=torch.float64)
    return c2w[:3, :3] @ cam + c2w[:3, 3]


def test_shapes_v3_r1_is_108():
    c2w, K = cameras()
    pts = torch.randn(50, 3, dtype=torch.float64) + torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64)
    f, valid, mask = sample_window_features(pts, coordinate_images(), c2w, K, torch.full((3, H, W), 5.0), radius=1)
    assert f.shape == (50, 108) and feature_dim(3, 1) == 108
    assert valid.shape == (50, 27) and valid.dtype == torch.bool
    assert mask.shape == (50,) and mask.dtype == torch.bool
    f2, valid2, _ = sample_window_features(pts, coordinate_images(), c2w, K, torch.full((3, H, W), 5.0), radius=2)
    assert f2.shape == (50, 3 * 25 * 4) and valid2.shape == (50, 75)
    assert window_offsets(1)[:4].tolist() == [[-1, -1], [0, -1], [1, -1], [-1, 0]]  # row-major: dv outer


def test_window_samples_equal_pixel_values():
    c2w, K = cameras()
    images = coordinate_images()
    depths = torch.full((3, H, W), 4.0, dtype=torch.float64)
    # one point per view, each at the centre of a known pixel of that view (row, col); 4x4 K is accepted too
    targets = [(5, 7, 4.0), (3, 10, 6.0), (8, 2, 5.0)]
    pts = torch.stack([point_at(c2w[k], K[k], col + 0.5, row + 0.5, z) for k, (row, col, z) in enumerate(targets)])
    K4 = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    K4[:, :3, :3] = K
    f, valid, _ = sample_window_features(pts, images, c2w, K4, depths, radius=1)
    f = f.reshape(3, 3, 3, 3, 4)  # [N, V, row, col, rgbv]
    valid = valid.reshape(3, 3, 3, 3)
    for k, (row, col, z) in enumerate(targets):
        assert valid[k, k].all()
        for dv in (-1, 0, 1):
            for du in (-1, 0, 1):
                expected = images[k, row + dv, col + du]
                torch.testing.assert_close(f[k, k, 1 + dv, 1 + du, :3], expected, atol=1e-6, rtol=0)
                assert f[k, k, 1 + dv, 1 + du, 3] == pytest.approx(z - 4.0, abs=1e-6)


def test_bilinear_between_pixel_centres():
    c2w, K = cameras()
    images = coordinate_images()
    u, v = 6.8, 4.25  # not a pixel centre; the image is linear in (u, v) in the interior
    pts = point_at(c2w[0], K[0], u, v, 3.0)[None]
    f, _, _ = sample_window_features(pts, images, c2w, K, torch.zeros(3, H, W, dtype=torch.float64))
    win = f.reshape(1, 3, 3, 3, 4)[0, 0]
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            expected = torch.tensor([(u + du - 0.5) / 100, (v + dv - 0.5) / 100, 0.0], dtype=torch.float64)
            torch.testing.assert_close(win[1 + dv, 1 + du, :3], expected, atol=1e-6, rtol=0)
    # unknown depth (0) is never read as 0: D comes from the points' own z-buffer (the point alone: D = z, vis = 0)
    assert win[1, 1, 3] == pytest.approx(0.0, abs=1e-6)


def test_validity_at_borders_and_behind_camera():
    c2w, K = cameras()
    images = coordinate_images()
    depths = torch.full((3, H, W), 5.0, dtype=torch.float64)
    corner = point_at(c2w[0], K[0], 0.5, 0.5, 5.0)  # top-left pixel centre of view 0
    right = point_at(c2w[0], K[0], W - 0.5, 6.5, 5.0)  # right-most column of view 0
    behind = point_at(c2w[0], K[0], 8.0, 6.0, -3.0)  # projects inside the image but behind the camera
    f, valid, _ = sample_window_features(torch.stack([corner, right, behind]), images, c2w, K, depths)
    v0 = valid.reshape(3, 3, 3, 3)[:, 0]
    expected_corner = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.bool)
    expected_right = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(v0[0], expected_corner)
    assert torch.equal(v0[1], expected_right)
    assert not v0[2].any()
    f0 = f.reshape(3, 3, 3, 3, 4)[:, 0]
    assert (f0[0][~expected_corner] == 0).all() and (f0[1][~expected_right] == 0).all()
    assert (f0[2] == 0).all()
    # the valid border samples are the border pixels (exact, at pixel centres)
    torch.testing.assert_close(f0[0, 1, 1, :3], images[0, 0, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(f0[1, 1, 0, :3], images[0, 6, W - 2], atol=1e-6, rtol=0)
    # a sample just outside (u < 0) is invalid, one just inside (u >= 0) valid
    edge = point_at(c2w[0], K[0], 1.01, 6.5, 5.0)  # du = -1 -> u = 0.01: inside
    out = point_at(c2w[0], K[0], 0.99, 6.5, 5.0)  # du = -1 -> u = -0.01: outside
    _, valid2, _ = sample_window_features(torch.stack([edge, out]), images, c2w, K, depths)
    w2 = valid2.reshape(2, 3, 3, 3)[:, 0]
    assert w2[0, :, 0].all() and not w2[1, :, 0].any()


def test_visibility_value():
    c2w, K = cameras()
    images = coordinate_images()
    # view 0 observes a fronto-parallel plane at z = 5; the other views have no depth
    depths = torch.zeros(3, H, W, dtype=torch.float64)
    depths[0] = 5.0
    on = point_at(c2w[0], K[0], 7.3, 5.6, 5.0)
    hidden = point_at(c2w[0], K[0], 7.3, 5.6, 7.5)
    front = point_at(c2w[0], K[0], 7.3, 5.6, 3.0)
    f, valid, _ = sample_window_features(torch.stack([on, hidden, front]), images, c2w, K, depths)
    vis = f.reshape(3, 3, 9, 4)[:, 0, :, 3]
    assert valid.reshape(3, 3, 9)[:, 0].all()
    assert torch.allclose(vis[0], torch.zeros(9, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(vis[1], torch.full((9,), 2.5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(vis[2], torch.full((9,), -2.0, dtype=torch.float64), atol=1e-6)


def test_visibility_on_slanted_depth_surface():
    """Depth maps rendered from a tilted plane: points on the plane have vis ~ 0 in every view that sees them."""
    from evolsplat_ns.cameras import unproject_depth

    c2w, K = cameras()
    # plane n . x = d in the world; per-pixel z-depth of the plane along each pixel-centre ray
    n = torch.tensor([0.1, -0.2, 1.0], dtype=torch.float64)
    n = n / n.norm()
    d = 5.0
    depths = []
    for k in range(3):
        ray = unproject_depth(torch.ones(H, W, dtype=torch.float64), c2w[k], K[k]) - c2w[k, :3, 3]  # z = 1
        depths.append((d - n @ c2w[k, :3, 3]) / (ray @ n))
    depths = torch.stack(depths)
    pts_cam0 = unproject_depth(depths[0], c2w[0], K[0])[3:9, 4:12].reshape(-1, 3)
    f, valid, mask = sample_window_features(pts_cam0, coordinate_images(), c2w, K, depths)
    vis = f.reshape(-1, 3, 9, 4)[..., 4, 3]  # window centre, every view
    centre_valid = valid.reshape(-1, 3, 9)[..., 4]
    assert centre_valid[:, 0].all() and mask.all()
    # bilinear depth of a plane is exact up to the curvature of 1/z: small
    assert vis[centre_valid].abs().max() < 2e-2


def test_projection_mask_count_threshold():
    # a 1-pixel-tall image: only the window row dv = 0 can be valid, so counts of 2 and 3 are easy to build
    c2w = torch.eye(4, dtype=torch.float64)[None]
    K = torch.tensor([[[10.0, 0.0, 4.0], [0.0, 10.0, 0.5], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    img = torch.rand(1, 1, 8, 3, dtype=torch.float64)
    depth = torch.full((1, 1, 8), 2.0, dtype=torch.float64)
    pts = torch.stack([
        point_at(c2w[0], K[0], 0.5, 0.5, 2.0),  # left border: du = 0, 1 valid -> 2 samples
        point_at(c2w[0], K[0], 3.5, 0.5, 2.0),  # interior: 3 samples
        point_at(c2w[0], K[0], 7.5, 0.5, 2.0),  # right border: 2 samples
        point_at(c2w[0], K[0], 3.5, 0.5, -2.0),  # behind: 0
    ])
    _, valid, mask = sample_window_features(pts, img, c2w, K, depth, radius=1)
    assert valid.sum(-1).tolist() == [2, 3, 2, 0]
    assert mask.tolist() == [False, True, False, False]  # more than R^2 + 1 = 2 valid samples needed
    # radius 2: threshold R^2 + 1 = 5, interior points have 5 valid samples (not enough), 4 at x = 1.5
    _, valid2, mask2 = sample_window_features(pts, img, c2w, K, depth, radius=2)
    assert valid2.sum(-1).tolist() == [3, 5, 3, 0]
    assert not mask2.any()
    # three views of the same camera: counts add up over views
    _, valid3, mask3 = sample_window_features(pts, img.expand(3, -1, -1, -1), c2w.expand(3, -1, -1),
                                              K.expand(3, -1, -1), depth.expand(3, -1, -1))
    assert valid3.sum(-1).tolist() == [6, 9, 6, 0]
    assert mask3.tolist() == [True, True, True, False]


def test_float32_inputs_and_gradients_to_images():
    c2w, K = cameras()
    images = coordinate_images().float().requires_grad_(True)
    pts = torch.randn(20, 3) * 0.5 + torch.tensor([0.0, 0.0, 5.0])
    f, _, _ = sample_window_features(pts, images, c2w.float(), K.float(), torch.full((3, H, W), 5.0))
    assert f.dtype == torch.float32
    f.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_features_with_and_without_autograd_are_equal():
    """The features are written in place when no gradient is recorded and built by concatenation when one is:
    the same values either way, zeros where a sample is invalid."""
    c2w, K = cameras()
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(200, 3, generator=g, dtype=torch.float64) * torch.tensor([6.0, 4.0, 9.0]) - torch.tensor(
        [3.0, 2.0, 1.0])  # some behind the cameras, some outside the images
    images = torch.rand(3, H, W, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f, valid, _ = sample_window_features(pts, images, c2w, K, None, radius=1)
    f_grad, valid_grad, _ = sample_window_features(pts, images.clone().requires_grad_(), c2w, K, None, radius=1)
    assert f_grad.requires_grad and not f.requires_grad
    torch.testing.assert_close(f, f_grad.detach(), rtol=0, atol=0)
    assert torch.equal(valid, valid_grad) and (~valid).any() and valid.any()
    assert (f.reshape(200, -1, 4)[~valid] == 0).all()
