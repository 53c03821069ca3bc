"""The visibility channel's source depth from the seed cloud itself, and the sources' colour of each point.

Unknown depth must never be read as 0 (it turned the channel into the point's distance on sparse LiDAR depth: grey
renders on real data); a surface must hide the points behind it even where its points are sparser than pixels.
"""

from __future__ import annotations

import math

import pytest
import torch

from evolsplat_ns.cameras import project_points
from evolsplat_ns.model.visibility import cloud_depth, footprint_level
from evolsplat_ns.model.window_features import sample_window_features, source_colour

H, W = 48, 64
K = torch.tensor([[[40.0, 0.0, 32.0], [0.0, 40.0, 24.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
EYE = torch.eye(4, dtype=torch.float64)[None]


def plane(z: float, spacing: float, half: float = 2.0) -> torch.Tensor:
    """Points of the fronto-parallel square [-half, half]^2 at depth z, on a grid of ``spacing`` metres."""
    r = torch.arange(-half, half + 1e-9, spacing, dtype=torch.float64)
    x, y = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), torch.full_like(x.reshape(-1), z)], -1)


def brute_force_depth(uv, z, valid, level):
    """Reference: for each point, the minimum depth over the valid points sharing its cell at its level."""
    out = torch.zeros_like(z)
    for v in range(z.shape[0]):
        for i in range(z.shape[1]):
            if not valid[v, i]:
                continue
            s = 2 ** int(level[v, i])
            cell = (torch.floor(uv[v, :, 0]).long() // s == int(uv[v, i, 0]) // s) & \
                   (torch.floor(uv[v, :, 1]).long() // s == int(uv[v, i, 1]) // s) & valid[v]
            out[v, i] = z[v][cell].min()
    return out


@pytest.mark.parametrize("H,W", [(H, W), (45, 61)])  # 45 x 61: partial cells at every pyramid level
def test_cloud_depth_equals_brute_force(H, W):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=g, dtype=torch.float64) * torch.tensor([4.0, 3.0, 8.0]) - torch.tensor(
        [2.0, 1.5, 1.0])  # some behind the camera
    c2w = torch.cat([EYE, EYE.clone()])
    c2w[1, :3, 3] = torch.tensor([0.3, 0.0, -0.5])
    Ks = K.expand(2, -1, -1)
    uv, z = project_points(pts, c2w, Ks)
    valid = (z > 1e-6) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    level = torch.randint(0, 5, z.shape, generator=g)
    got = cloud_depth(uv, z, valid, H, W, level)
    want = brute_force_depth(uv, z, valid, level)
    torch.testing.assert_close(got, want)
    assert (got[valid] <= z[valid]).all() and (got[valid] > 0).all()  # never unknown, never behind the point
    assert (got[~valid] == 0).all()


def test_footprint_level_covers_the_point_spacing():
    spacing = torch.tensor([0.01, 0.1, 0.5, 5.0], dtype=torch.float64)
    z = torch.full((1, 4), 10.0, dtype=torch.float64)
    lv = footprint_level(spacing, z, torch.tensor([100.0], dtype=torch.float64), footprint_scale=2.0, max_level=4)
    # footprint 2 * 100 * s / 10 px = 0.2, 2, 10, 100 px -> cells of 1, 2, 16 (>= 10), 16 (capped) px
    assert lv.tolist() == [[0, 1, 4, 4]]
    assert 2 ** lv[0, 2] >= 10 and 2 ** (lv[0, 2] - 1) < 10


def _vis(points, depths=None, spacing=None):
    images = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f, valid, _ = sample_window_features(points, images, EYE, K, depths, radius=1, spacing=spacing)
    return f.reshape(-1, 9, 4)[:, 4, 3], valid.reshape(-1, 9)[:, 4]


def test_sparse_surface_hides_the_points_behind_it():
    """A wall at 5 m sampled every 0.3 m (2.4 px apart on screen: gaps between its points) in front of a wall at
    10 m: read at each point's footprint, the near wall's points are visible (vis ~ 0) and every far point behind
    it is hidden (vis ~ 5 m); read per pixel, far points seen through the gaps would pass as visible."""
    near = plane(5.0, 0.3, half=1.0)
    far = plane(10.0, 0.3, half=4.0)
    pts = torch.cat([near, far])
    spacing = torch.full((len(pts),), 0.3, dtype=torch.float64)
    vis, valid = _vis(pts, spacing=spacing)
    n = len(near)
    assert valid[:n].all()
    assert vis[:n].abs().max() < 1e-9  # the near wall is the nearest surface: D = its own depth
    behind = (far[:, 0].abs() < 0.9) & (far[:, 1].abs() < 0.9)  # strictly inside the near wall's silhouette
    assert behind.sum() > 10
    assert torch.allclose(vis[n:][behind], torch.full_like(vis[n:][behind], 5.0))
    clear = (far[:, 0].abs() > 3.0) | (far[:, 1].abs() > 3.0)  # outside it by more than a footprint cell (1 m)
    assert (vis[n:][clear & valid[n:]] < 1e-9).all()
    per_pixel, _ = _vis(pts, spacing=None)
    assert (per_pixel[n:][behind] < 1e-9).any()  # without the footprint, gaps let hidden points through


def test_unknown_depth_is_never_read_as_zero():
    """Sparse data depth (a few pixels known, as LiDAR gives): a point on the observed surface where the map has
    no value gets the cloud's depth (vis ~ 0), not vis = its own depth; where the map has a value, that is used."""
    wall = plane(6.0, 0.05, half=1.5)
    spacing = torch.full((len(wall),), 0.05, dtype=torch.float64)
    depths = torch.zeros(1, H, W, dtype=torch.float64)
    depths[0, ::8, ::8] = 6.0  # ~1.6 % of the pixels
    depths[0, 23:26, 31:34] = 5.0  # a known patch says the surface is 1 m nearer there
    vis, valid = _vis(wall, depths, spacing)
    assert valid.all()
    assert vis.abs().max() <= 1.0 + 1e-9 and (vis.abs() < 1e-9).float().mean() > 0.9
    uv, _ = project_points(wall, EYE, K)
    at = (torch.floor(uv[0, :, 0]) == 32) & (torch.floor(uv[0, :, 1]) == 24)
    assert at.any() and torch.allclose(vis[at], torch.ones_like(vis[at]))  # the data's value where it has one
    # (a bilinear sample that mixes in unknown pixels counts as unknown: elsewhere the cloud's depth is used)


def test_source_colour_prefers_the_views_that_see_the_point():
    """Window centres: view 0 sees the point unoccluded (red), view 1 has it 10 m behind a surface (green)."""
    R = 1
    feats = torch.zeros(2, 2, 9, 4)
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    feats[:, 0, :, :3] = torch.tensor([1.0, 0.0, 0.0])
    feats[:, 1, :, :3] = torch.tensor([0.0, 1.0, 0.0])
    feats[:, 1, :, 3] = 10.0
    valid[1, 0] = False  # point 1: view 0 cannot see it at all
    rgb = source_colour(feats.reshape(2, -1), valid.reshape(2, -1), 2, R,
                        fallback=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    assert rgb[0, 0] > 0.99 and rgb[0, 1] < math.exp(-10) * 1.01  # the occluded view hardly counts
    assert torch.allclose(rgb[1], torch.tensor([0.0, 1.0, 0.0]))  # the only view left, hidden or not
    none = source_colour(feats.reshape(2, -1), torch.zeros(2, 18, dtype=torch.bool), 2, R,
                         fallback=torch.tensor([[0.2, 0.3, 0.4], [0.5, 0.5, 0.5]]))
    assert torch.allclose(none, torch.tensor([[0.2, 0.3, 0.4], [0.5, 0.5, 0.5]]))
