"""Background of EVolSplat: a far hemisphere of Gaussians coloured from the source views.

The reference places a Fibonacci hemisphere of 700^2 points of radius 100 m, centred at (0, 3.8, 5.6) in the
OpenCV frame of the middle input camera (3.8 m below and 5.6 m ahead of it, so the dome covers the sky and the
far background), and moves it along that frame's z axis with the target camera. Each point's colour and
scale residual come from a small MLP (9 -> 64 -> 6, Tanh) over the RGB of the source views at the point's
projection; opacity is 1. The result is composited behind the foreground: ``fg + (1 - alpha_fg) * bg``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from einops import rearrange

from evolsplat_ns.cameras import rigid_inverse
from evolsplat_ns.model.heads import mlp
from evolsplat_ns.model.window_features import sample_windows


def fibonacci_hemisphere(n: int, radius: float) -> Tensor:
    """``[M, 3]`` points (M ≈ n/2) of a Fibonacci sphere of ``n`` points, upper half (y <= 0: y points down)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    pts = torch.stack([torch.cos(theta) * torch.sin(phi), torch.cos(phi), torch.sin(theta) * torch.sin(phi)], -1)
    pts = pts[pts[:, 1] <= 0.0]
    return (pts * radius).float()


def sample_colours(points: Tensor, images: Tensor, c2w: Tensor, K: Tensor) -> Tuple[Tensor, Tensor]:
    """Bilinear RGB of each source view at each point's projection (the window sampler with R = 0).

    Args:
        points ``[N, 3]``, images ``[V, H, W, 3]``, c2w ``[V, 4, 4]`` OpenCV, K ``[V, 3|4, 3|4]``.
    Returns:
        colours ``[N, V * 3]`` (zero where invalid), valid ``[N, V]`` (in front of the camera and inside the image).
    """
    rgb, valid, _, _ = sample_windows(points, images, c2w, K, radius=0)  # [V, N, 1, 3], [V, N, 1]
    rgb = rgb[:, :, 0] * valid[..., :1]  # [V, N, 3]
    return rearrange(rgb, "v n c -> n (v c)"), valid[:, :, 0].T


class HemisphereBackground(nn.Module):
    """Background Gaussians of one segment for one target view; see the module docstring."""

    def __init__(self, num_views: int, num_points: int = 700 * 700, radius: float = 100.0,
                 center: Tuple[float, float, float] = (0.0, 3.8, 5.6)) -> None:
        super().__init__()
        self.register_buffer("points", fibonacci_hemisphere(num_points, radius), persistent=False)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32), persistent=False)
        # Base scale: the spacing of the Fibonacci lattice (sphere area / points).
        spacing = math.sqrt(4 * math.pi * radius**2 / max(num_points, 1))
        self.base_log_scale = math.log(spacing)
        self.colour = mlp([3 * num_views, 64, 6], out_act=nn.Tanh)

    def forward(self, ref_c2w: Tensor, target_c2w: Tensor, src_images: Tensor, src_c2w: Tensor, src_K: Tensor,
                target_K: Optional[Tensor] = None, height: Optional[int] = None, width: Optional[int] = None,
                compact: bool = True):
        """Background Gaussians in world coordinates for one target view.

        Args:
            ref_c2w ``[4, 4]``: the segment's reference camera (middle source frame, front camera).
            target_c2w ``[4, 4]``: the target camera; the dome follows it along the reference z axis.
            target_K, height, width: when given, dome points that cannot reach the target image (bounded with
                the largest scale the colour head can give, ``e`` times the lattice spacing) are dropped before
                the colour head; the rendered image is unchanged.
            compact: drop the points no source view sees (and, with ``target_K``, those outside the image). False:
                keep every point, with opacity 0 where it would be dropped: the same image, fixed shapes and no
                host synchronisation (the path that ``compile_decode`` renders).
        Returns:
            means ``[M, 3]``, colours ``[M, 3]`` in [0, 1], scales ``[M, 3]`` (linear), opacities ``[M]`` (ones).
        """
        ref_c2w = ref_c2w.to(self.points.dtype)
        target_in_ref = (rigid_inverse(ref_c2w) @ target_c2w.to(ref_c2w.dtype))[:3, 3]  # no host sync
        local = self.points + self.center + torch.stack(
            [torch.zeros_like(target_in_ref[2]), torch.zeros_like(target_in_ref[2]), target_in_ref[2]])
        world = local @ ref_c2w[:3, :3].T + ref_c2w[:3, 3]
        if target_K is not None and compact:
            from evolsplat_ns.model.render import visible_gaussians

            bound = torch.full_like(world[:, :1], math.exp(self.base_log_scale + 1.0))
            world = world[visible_gaussians(world, bound.expand(-1, 3), target_c2w, target_K, height, width)]
        feats, valid = sample_colours(world, src_images, src_c2w, src_K)
        keep = valid.any(dim=1)
        if compact:
            world, feats = world[keep], feats[keep]
        out = self.colour(feats)
        rgb = 0.5 * (out[:, :3] + 1.0)
        scales = torch.exp(self.base_log_scale + out[:, 3:])  # Tanh residual: within e^(+-1) of the spacing
        return world, rgb, scales, (torch.ones_like(rgb[:, 0]) if compact else keep.to(rgb.dtype))
