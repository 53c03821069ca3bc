"""Local image-window features of 3D points in the source views (EVolSplat's 2D appearance cue).

Each point is projected into each of the ``V`` source views (:func:`evolsplat_ns.cameras.project_points`:
OpenCV camera-to-world, pinhole ``K``, pixel centres at half-integers). Around the projected pixel position
``(u, v)`` a ``(2R+1) x (2R+1)`` window of positions ``(u + du, v + dv)``, ``du, dv in {-R, ..., R}`` (steps of
one pixel) is sampled bilinearly from the image. Each sample carries

- ``r, g, b``: the bilinear colour at the sample position;
- ``vis``: the visibility value of the point in that view, ``z - D(u, v)``: the point's projected depth minus
  the source depth map sampled at the window centre (the same value for every sample of the window). About 0
  for a point on the observed surface, positive for a point hidden behind it, negative for a point in front of
  it (free space). Where the depth map is 0 ("unknown", e.g. sky) this is just ``z`` (and a bilinear centre
  sample next to unknown pixels mixes in those zeros: use ``depth_mode="nearest"`` to avoid mixing).

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

from typing import Literal, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from evolsplat_ns.cameras import project_points


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
    depths: Tensor,
    radius: int = 1,
    *,
    min_depth: float = 1e-6,
    depth_mode: Literal["bilinear", "nearest"] = "bilinear",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample ``(2R+1)^2`` RGB windows and a visibility value of every point in every source view.

    Args:
        points: ``[N, 3]`` world points.
        images: ``[V, H, W, 3]`` source images, float in [0, 1].
        c2w: ``[V, 4, 4]`` OpenCV camera-to-world of the source views.
        K: ``[V, 3, 3]`` (or ``[V, 4, 4]``, top-left used) intrinsics.
        depths: ``[V, H, W]`` source z-depth maps (0 = unknown).
        radius: window radius ``R`` (EVolSplat's ``local_radius``, 1 -> 3x3 windows).
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

    centre = rearrange(_to_grid(uv, W, H), "v n xy -> v n 1 xy")
    dmap = rearrange(depths.to(dtype), "v h w -> v 1 h w")
    d_centre = F.grid_sample(dmap, centre, mode=depth_mode, padding_mode="border", align_corners=False)
    vis = z - rearrange(d_centre, "v 1 n 1 -> v n")  # [V, N]
    vis = repeat(vis, "v n -> v n s 1", s=S)

    feat = torch.cat([rgb, vis], dim=-1)  # [V, N, S, 4]
    feat = torch.where(valid[..., None], feat, torch.zeros_like(feat))
    features = rearrange(feat, "v n s c -> n (v s c)")
    valid = rearrange(valid, "v n s -> n (v s)")
    projection_mask = valid.sum(dim=-1) > radius * radius + 1
    return features, valid, projection_mask
