"""Rendering of 3D Gaussians: gsplat on CUDA, the pure-PyTorch reference rasterizer elsewhere.

:func:`render_gaussians` is the single entry point the model uses. Both backends compute the same image (gsplat
1.4.0's "classic" rasterization, see :mod:`evolsplat_ns.model.rasterize_torch` for the maths); the camera
conventions are the project's (:mod:`evolsplat_ns.cameras`): OpenCV camera-to-world, pinhole ``K``, pixel
centres at half-integers.
"""

from __future__ import annotations

from typing import Dict, Literal, Optional

import torch
from torch import Tensor

from evolsplat_ns.cameras import world_to_camera
from evolsplat_ns.model.rasterize_torch import EPS2D, TILE_SIZE, rasterize_gaussians_torch

Backend = Literal["auto", "gsplat", "torch"]


MAX_TILE_SIZE = 32
"""gsplat runs one thread per pixel of a tile, at most 1024 per block."""


def check_tile_size(tile_size: int, option: str = "tile_size") -> int:
    """``tile_size`` as an int, or a :class:`~evolsplat_ns.errors.ConfigError` (a ``ValueError``) naming ``option``."""
    from evolsplat_ns.errors import ConfigError

    if not 1 <= int(tile_size) <= MAX_TILE_SIZE:
        raise ConfigError(f"{option} {tile_size}: expected 1 to {MAX_TILE_SIZE} pixels (gsplat runs one thread per "
                          "pixel of a tile, at most 1024)")
    return int(tile_size)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``"auto"`` -> ``"gsplat"`` for CUDA tensors, ``"torch"`` otherwise; other values are checked and returned."""
    if backend == "auto":
        return "gsplat" if torch.device(device).type == "cuda" else "torch"
    if backend not in ("gsplat", "torch"):
        raise ValueError(f"unknown rasterizer backend {backend!r} (expected 'auto', 'gsplat' or 'torch')")
    return backend


@torch.no_grad()
def visible_gaussians(means: Tensor, scales: Tensor, c2w: Tensor, K: Tensor, height: int, width: int,
                      near_plane: float = 0.01) -> Tensor:
    """Indices ``[M]`` of the Gaussians that can touch a ``width`` x ``height`` image; a superset of what the
    rasterizer keeps, so dropping the others changes nothing.

    The rasterizer (both backends) drops a Gaussian whose centre is nearer than ``near_plane`` or whose 3-sigma
    screen radius ``3 sqrt(lambda_max(J Sigma J^T) + eps2d)`` misses the image. Here ``lambda_max`` is bounded by
    ``|J|_F^2 s_max^2`` with the EWA Jacobian ``J = f/z [[1, 0, -x/z], [0, 1, -y/z]]`` (gsplat clamps ``x/z``,
    ``y/z``, which only shrinks ``J``), so the bound radius is never smaller than the real one.

    Args:
        means ``[N, 3]`` world, scales ``[N, 3]`` linear, c2w ``[4, 4]`` OpenCV, K ``[3|4, 3|4]``.
    """
    from evolsplat_ns.cameras import project_points

    uv, z = project_points(means, c2w[None], K[None])
    uv, z = uv[0], z[0]
    zs = z.clamp_min(near_plane)
    cam_x = (uv[:, 0] - K[0, 2]) / K[0, 0]  # x/z and y/z in the camera
    cam_y = (uv[:, 1] - K[1, 2]) / K[1, 1]
    f = torch.maximum(K[0, 0], K[1, 1])
    jac2 = (f / zs) ** 2 * (2.0 + cam_x**2 + cam_y**2)
    radius = 3.0 * torch.sqrt(jac2 * scales.amax(-1) ** 2 + EPS2D) + 1.0
    u, v = uv[:, 0], uv[:, 1]
    keep = (z >= near_plane) & (u + radius > 0) & (u - radius < width) & (v + radius > 0) & (v - radius < height)
    return keep.nonzero().squeeze(-1)


def render_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    c2w: Tensor,
    K: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    render_depth: bool = False,
    background: Optional[Tensor] = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    backend: Backend = "auto",
    return_info: bool = False,
    absgrad: bool = False,
    tile_size: int = TILE_SIZE,
) -> Dict[str, Tensor]:
    """Rasterize 3D Gaussians into one or several pinhole cameras.

    Conventions (the project's, see :mod:`evolsplat_ns.cameras`): cameras are **OpenCV camera-to-world**
    matrices (x right, y down, z forward); ``K`` is a pinhole intrinsic matrix (its skew is ignored, as gsplat
    does); the pixel in row ``v`` / column ``u`` has its centre at ``(u + 0.5, v + 0.5)``. The world-to-camera
    matrix given to the rasterizer is :func:`evolsplat_ns.cameras.world_to_camera` of ``c2w``.

    The image is gsplat 1.4.0's "classic" rasterization: covariance ``R(q) diag(s)^2 R(q)^T``, EWA projection
    with a 0.3 px^2 low-pass dilation, 3-sigma tile culling, ``alpha = min(0.999, o exp(-0.5 d^T Sigma^-1 d))``
    skipped below 1/255, front-to-back compositing in depth order stopping before the transmittance falls to
    1e-4. With ``sh_degree`` the colour is ``max(SH(dir) + 0.5, 0)`` with ``dir = mean - camera centre``.

    Args:
        means: ``[N, 3]`` Gaussian centres (world).
        quats: ``[N, 4]`` rotations as ``wxyz`` quaternions; need not be normalised.
        scales: ``[N, 3]`` **linear** (not log) standard deviations along the rotated axes.
        opacities: ``[N]`` opacities in (0, 1) (post-sigmoid).
        colors: ``[N, 3]`` RGB (``sh_degree=None``; any ``[N, D]`` works and gives ``D`` output channels) or
            ``[N, K, 3]`` SH coefficients with ``(sh_degree + 1)^2 <= K``.
        c2w: ``[4, 4]`` OpenCV camera-to-world, or ``[C, 4, 4]`` for a batch of cameras.
        K: ``[3, 3]`` (or ``[C, 3, 3]``) intrinsics; a ``[.., 4, 4]`` matrix uses its top-left 3x3.
            A single ``K`` is shared by all ``C`` cameras.
        width, height: image size in pixels.
        sh_degree: SH degree to evaluate, or None when ``colors`` are plain colours.
        render_depth: also render the expected depth (``sum w_i z_i / sum w_i``, camera z of the means).
        background: ``[3]`` (or ``[C, 3]``) colour composited behind the Gaussians
            (``rgb += (1 - alpha) * background``); None = black.
        near_plane, far_plane: Gaussians whose camera depth is outside ``[near, far]`` are culled.
        backend: "gsplat" (CUDA only: gsplat has no CPU path), "torch" (pure-PyTorch reference rasterizer:
            slow, for tests and small CPU demos) or "auto" (gsplat when ``means`` is on CUDA, torch otherwise).
        return_info: also return gsplat's ``info`` (projected ``means2d``, ``radii``, ...: what gsplat's
            densification strategies read); None with the torch backend, which has no such record.
        absgrad: gsplat's ``absgrad`` (for strategies that densify on absolute gradients).
        tile_size: side of the rasterizer's square pixel tiles (gsplat's default 16). A pixel composites the
            Gaussians whose 3-sigma box touches its tile, so the tile size changes an image only where a Gaussian
            reaches beyond its box (alpha below ``0.011 o``); smaller tiles split the long per-tile lists of a
            street's vanishing point (B2: 8 is 2.2x faster than 16 at KITTI-360 size, 32 is 2.1x slower).

    Returns:
        A dict with (``[C, ...]`` leading dimension only when ``c2w`` is batched):

        - **rgb**: ``[H, W, 3]`` (``[C, H, W, 3]``) composited colours (background included).
        - **alpha**: ``[H, W, 1]`` accumulated opacity ``1 - T_final``.
        - **depth**: ``[H, W, 1]`` expected z-depth (only with ``render_depth``; meaningless where alpha ~ 0).
        - **info**: gsplat's info dict, or None (only with ``return_info``).
    """
    tile_size = check_tile_size(tile_size)
    batched = c2w.dim() == 3
    c2w_b = c2w if batched else c2w[None]
    C = c2w_b.shape[0]
    K3 = K[..., :3, :3]
    Ks = K3.expand(C, 3, 3) if K3.dim() == 2 else K3
    if Ks.shape[0] != C:
        raise ValueError(f"K batch {tuple(K.shape)} does not match c2w batch {tuple(c2w.shape)}")
    viewmats = world_to_camera(c2w_b)
    backgrounds = None
    if background is not None:
        backgrounds = background.expand(C, background.shape[-1]) if background.dim() == 1 else background
    mode = "RGB+ED" if render_depth else "RGB"
    width, height = int(width), int(height)

    kind = resolve_backend(backend, means.device)
    if kind == "gsplat":
        import gsplat

        if sh_degree is not None:
            # gsplat would evaluate the SH itself, with camera centres from torch.inverse(viewmats): a host
            # synchronisation on every render (linalg.inv checks its result on the host). The centres are c2w's
            # translations: evaluate here with gsplat's own SH kernel and offset, and pass colours.
            dirs = means[None] - c2w_b[:, None, :3, 3].to(means.dtype)  # [C, N, 3]
            shs = colors.expand(C, *colors.shape) if colors.dim() == 3 else colors  # [C, N, K, 3]
            colors = torch.clamp_min(gsplat.spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)
            sh_degree = None

        render_colors, render_alphas, info = gsplat.rasterization(
            means=means,
            quats=quats,
            scales=scales,
            opacities=opacities,
            colors=colors,
            viewmats=viewmats,
            Ks=Ks,
            width=width,
            height=height,
            near_plane=near_plane,
            far_plane=far_plane,
            eps2d=EPS2D,
            sh_degree=sh_degree,
            backgrounds=backgrounds,
            render_mode=mode,
            rasterize_mode="classic",
            packed=False,  # packed projection compacts with nonzero(): one more host sync per call
            absgrad=absgrad,
            tile_size=tile_size,
        )
    else:
        info = None
        blk = max(1, TILE_SIZE // tile_size)
        render_colors, render_alphas = rasterize_gaussians_torch(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            sh_degree=sh_degree, render_mode=mode, backgrounds=backgrounds,
            near_plane=near_plane, far_plane=far_plane, eps2d=EPS2D, tile_size=tile_size,
            block_tiles=(blk, 4 * blk),  # pixel blocks of 16 x 64 whatever the tile size (speed only)
        )

    out = {"rgb": render_colors[..., :-1] if render_depth else render_colors, "alpha": render_alphas}
    if render_depth:
        out["depth"] = render_colors[..., -1:]
    if not batched:
        out = {k: v[0] for k, v in out.items()}
    if return_info:
        out["info"] = info
    return out


SEED_CLOUD_OPACITY = 0.9


def render_seed_cloud(segment: Dict[str, Tensor], c2w: Tensor, K: Tensor, width: int, height: int,
                      opacity: float = SEED_CLOUD_OPACITY, backend: Backend = "auto") -> Dict[str, Tensor]:
    """A segment's seed cloud as fixed Gaussians (no network): its points, own colours, isotropic KNN scales,
    opacity ``opacity``. The no-learning baseline of the benchmarks and the real-data fixture test.

    Args:
        segment: a segment's state (:mod:`evolsplat_ns.model.segment_state`): ``means`` [N, 3], ``colours`` [N, 3]
            in [0, 1], ``log_scales`` [N, 3].
    Returns:
        :func:`render_gaussians`' output: ``rgb`` ``[H, W, 3]`` on black, ``alpha`` ``[H, W, 1]``.
    """
    means = segment["means"]
    quats = torch.zeros(means.shape[0], 4, device=means.device, dtype=means.dtype)
    quats[:, 0] = 1
    return render_gaussians(means, quats, torch.exp(segment["log_scales"]), torch.full_like(means[:, 0], opacity),
                            segment["colours"], c2w, K, width, height, backend=backend)
