"""Local image-window features of 3D points in the source views (EVolSplat's 2D appearance cue).

Each point is projected into each of the ``V`` source views (:func:`evolsplat_ns.cameras.project_points`:
OpenCV camera-to-world, pinhole ``K``, pixel centres at half-integers). Around the projected pixel position
``(u, v)`` a ``(2R+1) x (2R+1)`` window of positions ``(u + du, v + dv)``, ``du, dv in {-R, ..., R}`` (steps of
one pixel) is sampled bilinearly from the image. Each sample carries

- ``r, g, b``: the bilinear colour at the sample position;
- ``vis``: the visibility value of the point in that view, ``z - D(u, v)``: the point's projected depth minus
  the source depth at the window centre (the same value for every sample of the window). About 0 for a point on
  the observed surface, positive for a point hidden behind it, negative for a point in front of it (free space).
  ``D`` is never "unknown": without depth maps it is the z-buffer of the points themselves at each point's
  footprint (:mod:`evolsplat_ns.model.visibility`, then ``vis >= 0``); with depth maps it is the map's value
  where the map has one (``> 0``, read with ``depth_mode``; a bilinear sample touching unknown pixels counts as
  unknown) and the points' z-buffer elsewhere. (Reading a missing value as 0 would make ``vis`` the point's depth:
  sparse LiDAR depth then feeds the network distance instead of visibility.)

A sample is *valid* when the point is in front of the camera (``z > min_depth``) and the sample position lies
inside the image (``0 <= u + du < W`` and ``0 <= v + dv < H``, the pixel areas). Invalid samples have
``r, g, b, vis`` set to 0. A point is used (``projection_mask``) only if more than ``R^2 + 1`` of its
``V (2R+1)^2`` samples are valid.

Feature layout (``[N, V * (2R+1)^2 * 4]``, 108 for ``V = 3``, ``R = 1``): view-major, then window row
(``dv`` from ``-R`` to ``R``), then window column (``du`` from ``-R`` to ``R``), then ``[r, g, b, vis]``; i.e.
``features.reshape(N, V, 2R+1, 2R+1, 4)[n, i, R + dv, R + du]`` is the sample of point ``n`` in view ``i`` at
offset ``(du, dv)``. ``valid`` has the same layout without the channel axis.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from evolsplat_ns.cameras import project_points
from evolsplat_ns.model.visibility import fill_unknown_depth, visibility_depth


def window_offsets(radius: int, device=None, dtype=torch.float32) -> Tensor:
    """Pixel offsets ``[(2R+1)^2, 2]`` as ``(du, dv)``, row-major (``dv`` outer, ``du`` inner)."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    dv, du = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([du.reshape(-1), dv.reshape(-1)], dim=-1)


def feature_dim(num_views: int, radius: int = 1) -> int:
    """Length of a point's feature: ``V (2R+1)^2 4``."""
    return num_views * (2 * radius + 1) ** 2 * 4


def _to_grid(uv: Tensor, width: int, height: int) -> Tensor:
    """Continuous pixel coordinates -> ``grid_sample`` coordinates (``align_corners=False``): ``x = 2u/W - 1``."""
    scale = torch.tensor([2.0 / width, 2.0 / height], device=uv.device, dtype=uv.dtype)
    return uv * scale - 1.0


def sample_windows(points: Tensor, images: Tensor, c2w: Tensor, K: Tensor, radius: int = 1, *,
                   min_depth: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project points into the views and sample a ``(2R+1)^2`` window of bilinear RGB around each projection.

    Returns:
        rgb ``[V, N, S, 3]`` (not yet zeroed where invalid), valid ``[V, N, S]`` (in front of the camera and inside
        the image), uv ``[V, N, 2]`` and z ``[V, N]`` of the projections (dtype of ``images``).
    """
    V, H, W, _ = images.shape
    N = points.shape[0]
    dtype = images.dtype
    S = (2 * radius + 1) ** 2
    uv, z = project_points(points.to(c2w.dtype), c2w, K.to(c2w.dtype))  # [V, N, 2], [V, N]
    uv, z = uv.to(dtype), z.to(dtype)
    offsets = window_offsets(radius, device=points.device, dtype=dtype)  # [S, 2]
    win = uv[:, :, None, :] + offsets  # [V, N, S, 2]
    inside = (win[..., 0] >= 0) & (win[..., 0] < W) & (win[..., 1] >= 0) & (win[..., 1] < H)
    valid = inside & (z > min_depth)[:, :, None]  # [V, N, S]
    grid = rearrange(_to_grid(win, W, H), "v n s xy -> v (n s) 1 xy")
    img = rearrange(images, "v h w c -> v c h w")
    rgb = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rearrange(rgb, "v c (n s) 1 -> v n s c", n=N, s=S), valid, uv, z


def sample_window_features(
    points: Tensor,
    images: Tensor,
    c2w: Tensor,
    K: Tensor,
    depths: Optional[Tensor] = None,
    radius: int = 1,
    *,
    spacing: Optional[Tensor] = None,
    min_depth: float = 1e-6,
    depth_mode: Literal["bilinear", "nearest"] = "bilinear",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample ``(2R+1)^2`` RGB windows and a visibility value of every point in every source view.

    Args:
        points: ``[N, 3]`` world points.
        images: ``[V, H, W, 3]`` source images, float in [0, 1].
        c2w: ``[V, 4, 4]`` OpenCV camera-to-world of the source views.
        K: ``[V, 3, 3]`` (or ``[V, 4, 4]``, top-left used) intrinsics.
        depths: ``[V, H, W]`` source z-depth maps (0 = unknown), or ``None``: the points' own z-buffer.
        radius: window radius ``R`` (EVolSplat's ``local_radius``, 1 -> 3x3 windows).
        spacing: ``[N]`` metres, each point's neighbour spacing (its base Gaussian scale): the footprint at which
            the points' z-buffer is read (:func:`evolsplat_ns.model.visibility.footprint_level`); ``None``: per pixel.
        min_depth: a point counts as in front of a camera when its depth exceeds this.
        depth_mode: interpolation of the depth map at the window centre.

    Returns:
        features: ``[N, V (2R+1)^2 4]`` (layout in the module docstring), dtype of ``images``.
        valid: ``[N, V (2R+1)^2]`` bool per sample.
        projection_mask: ``[N]`` bool, ``valid.sum(-1) > R^2 + 1``.

    Bilinear samples use :func:`torch.nn.functional.grid_sample` with ``align_corners=False`` and border
    padding: the continuous position ``u`` maps to ``x = 2u/W - 1``, so a position ``(j + 0.5, i + 0.5)`` returns
    pixel ``[i, j]`` exactly; valid samples within half a pixel of the border replicate the border pixels.
    """
    _, H, W, _ = images.shape
    dtype = images.dtype
    S = (2 * radius + 1) ** 2
    rgb, valid, uv, z = sample_windows(points, images, c2w, K, radius, min_depth=min_depth)

    centre_in = (z > min_depth) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    d_centre = visibility_depth(uv, z, centre_in, H, W, K, spacing)  # [V, N], never 0 where centre_in
    if depths is not None:
        centre = rearrange(_to_grid(uv, W, H), "v n xy -> v n 1 xy")
        dmap = rearrange(depths.to(dtype), "v h w -> v 1 h w")
        known = (dmap > 0).to(dtype)
        d_data = F.grid_sample(dmap, centre, mode=depth_mode, padding_mode="border", align_corners=False)
        # a bilinear sample is known only if every pixel it mixes is (else the zeros of unknown pixels leak in)
        k = F.grid_sample(known, centre, mode=depth_mode, padding_mode="border", align_corners=False)
        d_data = torch.where(rearrange(k, "v 1 n 1 -> v n") > 1 - 1e-6, rearrange(d_data, "v 1 n 1 -> v n"), 0.0)
        d_centre = fill_unknown_depth(d_data, d_centre)
    vis = z - d_centre  # [V, N]

    V, N = z.shape
    ok = rearrange(valid, "v n s -> n v s 1")
    rgb_n, vis_n = rearrange(rgb, "v n s c -> n v s c"), rearrange(vis, "v n -> n v 1 1").expand(N, V, S, 1)
    zero = torch.zeros((), dtype=dtype, device=points.device)
    if torch.is_grad_enabled() and (rgb.requires_grad or vis.requires_grad):  # autograd cannot write into out=
        features = torch.where(ok, torch.cat([rgb_n, vis_n], dim=-1), zero)
    else:  # written once, in the output layout (no concatenated or masked copies of this, the largest tensor of the
        # extraction): colour channels, then the visibility broadcast over the window; 0 where invalid
        features = torch.empty(N, V, S, 4, dtype=dtype, device=points.device)
        torch.where(ok, rgb_n, zero, out=features[..., :3])
        torch.where(ok, vis_n, zero, out=features[..., 3:])
    features = features.reshape(N, V * S * 4)
    valid = rearrange(valid, "v n s -> n (v s)")
    projection_mask = valid.sum(dim=-1) > radius * radius + 1
    return features, valid, projection_mask


def source_colour(features: Tensor, valid: Tensor, num_views: int, radius: int = 1, *,
                  vis_scale: float = 1.0, fallback: Optional[Tensor] = None) -> Tensor:
    """What the source views say a point's colour is: the window-centre colours, averaged over the views with
    weights ``exp(-max(vis, 0) / vis_scale)`` (views that see the point unoccluded dominate; if every view has it
    hidden, the least hidden wins).

    Args:
        features: ``[N, V (2R+1)^2 4]`` window features (:func:`sample_window_features`).
        valid: ``[N, V (2R+1)^2]`` bool, their validity.
        vis_scale: metres of occlusion that divide a view's weight by ``e``.
        fallback: ``[N, 3]`` colour of points whose centre sample is valid in no view (e.g. the seed colour);
            default 0.5 grey.

    Returns:
        ``[N, 3]`` RGB in [0, 1].
    """
    S = (2 * radius + 1) ** 2
    f = rearrange(features, "n (v s c) -> n v s c", v=num_views, s=S, c=4)[:, :, S // 2]  # [N, V, 4] centre
    ok = rearrange(valid, "n (v s) -> n v s", v=num_views, s=S)[:, :, S // 2]
    w = torch.exp(-f[..., 3].clamp_min(0.0) / vis_scale) * ok.to(f.dtype)  # [N, V]
    total = w.sum(dim=-1, keepdim=True)
    rgb = (w[..., None] * f[..., :3]).sum(dim=1) / total.clamp_min(1e-12)
    if fallback is None:
        fallback = torch.full_like(rgb, 0.5)
    return torch.where(total > 0, rgb, fallback.to(rgb.dtype))
