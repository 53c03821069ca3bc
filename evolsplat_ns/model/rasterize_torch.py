"""Pure-PyTorch reference rasterizer of 3D Gaussians (the maths of gsplat 1.4.0's default "classic" path).

This module exists so that the model can be run, tested and debugged on machines without CUDA (gsplat has no
CPU path at all). It is **slow** (a Python loop over blocks of 16x16-pixel tiles, dense per-block
pixel x Gaussian tensors, autograd instead of a hand-written backward): it is meant for unit tests and small CPU
demos (a few thousand Gaussians at ~100x300 pixels take about a second), not for training.

What it reproduces, step by step (gsplat 1.4.0 ``fully_fused_projection`` / ``isect_tiles`` /
``rasterize_to_pixels`` / ``spherical_harmonics``, ``rasterize_mode="classic"``, ``radius_clip=0``):

1. Covariance ``Sigma = R S S^T R^T`` with ``R`` from the normalised ``wxyz`` quaternion and ``S = diag(scales)``.
2. Camera space: ``t = R_w2c mu + t_w2c``, ``Sigma_c = R_w2c Sigma R_w2c^T``. A Gaussian is culled if its depth
   ``t_z`` is outside ``[near_plane, far_plane]``.
3. EWA projection: ``Sigma_2d = J Sigma_c J^T`` with the pinhole Jacobian
   ``J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]`` where ``tx/z`` and ``ty/z`` are clamped to 1.3 x the
   half field of view (only inside ``J``); the mean projects to ``(fx x/z + cx, fy y/z + cy)`` (the skew of ``K``
   is ignored, as gsplat does). A low-pass dilation ``eps2d = 0.3`` px^2 is added to the diagonal of
   ``Sigma_2d``; culled if its determinant is not positive. The conic is ``Sigma_2d^-1``.
4. Radius ``r = ceil(3 sqrt(lambda_max))`` with ``lambda_max = b + sqrt(max(0.01, b^2 - det))``,
   ``b = trace / 2``; culled if the ``r``-square around the mean misses the image. The Gaussian is evaluated on
   every pixel of every 16x16 tile its ``r``-square touches (exactly gsplat's tile intersection), not on a disc.
5. Per pixel (centre ``(u + 0.5, v + 0.5)``): ``sigma = 0.5 d^T conic d``, ``alpha = min(0.999, o exp(-sigma))``;
   skipped if ``alpha < 1/255`` (or ``sigma < 0``). Front-to-back compositing over the Gaussians sorted by depth
   (stable, so ties keep the input order); the pixel stops *before* the Gaussian that would make the
   transmittance ``T <= 1e-4``. ``colour = sum_i c_i alpha_i T_i (+ T_final background)``,
   ``alpha_out = 1 - T_final``.
6. Spherical harmonics (degree <= 4), gsplat's constants and basis order, direction ``mu - camera centre``
   normalised; then ``colour = max(colour + 0.5, 0)``.
7. ``render_mode`` "RGB+ED"/"ED": the camera-space depth ``t_z`` is composited as an extra channel (background
   0) and divided by ``max(alpha_out, 1e-10)``: the expected depth.

Memory: the forward pass allocates at most about ``max_pairs`` pixel x Gaussian elements per intermediate at a
time (pixel blocks x Gaussian chunks). With gradients enabled each block is wrapped in
:func:`torch.utils.checkpoint.checkpoint` (by default), so the memory kept for the backward pass is proportional
to the number of blocks times the number of candidate Gaussians, not to ``pixels x Gaussians``.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

#: Alphas below this are skipped (gsplat: ``alpha < 1.f / 255.f``).
ALPHA_THRESHOLD = 1.0 / 255.0
#: Alphas are clamped to at most this value.
MAX_ALPHA = 0.999
#: A pixel stops before the Gaussian that would bring its transmittance to ``<= TRANSMITTANCE_MIN``.
TRANSMITTANCE_MIN = 1e-4
#: Low-pass dilation added to the projected 2D covariance (px^2).
EPS2D = 0.3
#: gsplat's tile size (pixels).
TILE_SIZE = 16

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]


# --------------------------------------------------------------------------------------------------- geometry
def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` from ``wxyz`` quaternions ``[..., 4]`` (normalised here)."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances ``R diag(s)^2 R^T`` ``[N, 3, 3]`` from quaternions ``[N, 4]`` and linear scales ``[N, 3]``."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    covars: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    eps2d: float = EPS2D,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of 3D Gaussians into one pinhole camera (gsplat's ``fully_fused_projection``, classic).

    Args:
        means: ``[N, 3]`` world means.
        covars: ``[N, 3, 3]`` world covariances.
        viewmat: ``[4, 4]`` world-to-camera (OpenCV axes).
        K: ``[3, 3]`` intrinsics (skew ignored).
        width, height: image size in pixels.

    Returns:
        means2d ``[N, 2]`` (pixels, top-left pixel centre at (0.5, 0.5)), conics ``[N, 3]`` (upper triangle of
        the inverse dilated 2D covariance: a, b, c with ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``),
        depths ``[N]`` (camera z), radii ``[N]`` (float, integer-valued; 0 = culled).
    """
    R = viewmat[:3, :3]
    t = viewmat[:3, 3]
    mc = means @ R.T + t
    cov_c = R @ covars @ R.T
    x, y, z = mc.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    # avoid inf/nan for culled Gaussians at z == 0 (their outputs are discarded anyway)
    zs = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
    rz = 1.0 / zs
    rz2 = rz * rz
    tx = zs * torch.minimum(torch.maximum(x * rz, -lim_x_neg), lim_x_pos)
    ty = zs * torch.minimum(torch.maximum(y * rz, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    J = torch.stack([fx * rz, zero, -fx * tx * rz2, zero, fy * rz, -fy * ty * rz2], dim=-1).reshape(-1, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)

    a = cov2d[:, 0, 0] + eps2d
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + eps2d
    det = a * c - b * b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    with torch.no_grad():
        half_tr = 0.5 * (a + c)
        v1 = half_tr + torch.sqrt(torch.clamp(half_tr * half_tr - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(torch.clamp(v1, min=0.0)))
        mx, my = means2d[:, 0], means2d[:, 1]
        valid = (
            (z >= near_plane)
            & (z <= far_plane)
            & (det > 0)
            & (radius > 0)
            & (mx + radius > 0)
            & (mx - radius < width)
            & (my + radius > 0)
            & (my - radius < height)
        )
        radius = torch.where(valid, radius, torch.zeros_like(radius))
    return means2d, conics, z, radius


# --------------------------------------------------------------------------------------- spherical harmonics
def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis ``[..., (degree+1)^2]`` at unit directions ``[..., 3]`` (gsplat's constants and order)."""
    if not 0 <= degree <= 4:
        raise ValueError(f"sh_degree must be in [0, 4], got {degree}")
    out = [torch.full_like(dirs[..., 0], 0.2820947917738781)]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        c1 = 0.48860251190292
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        z2 = z * z
        tmp_b = -1.092548430592079 * z
        fc1 = x * x - y * y
        fs1 = 2.0 * x * y
        sh6 = 0.9461746957575601 * z2 - 0.3153915652525201
        out += [0.5462742152960395 * fs1, tmp_b * y, sh6, tmp_b * x, 0.5462742152960395 * fc1]
    if degree >= 3:
        tmp_c = -2.285228997322329 * z2 + 0.4570457994644658
        tmp_b3 = 1.445305721320277 * z
        fc2 = x * fc1 - y * fs1
        fs2 = x * fs1 + y * fc1
        sh12 = z * (1.865881662950577 * z2 - 1.119528997770346)
        out += [-0.5900435899266435 * fs2, tmp_b3 * fs1, tmp_c * y, sh12, tmp_c * x, tmp_b3 * fc1,
                -0.5900435899266435 * fc2]
    if degree >= 4:
        tmp_d = z * (-4.683325804901025 * z2 + 2.007139630671868)
        tmp_c4 = 3.31161143515146 * z2 - 0.47308734787878
        tmp_b4 = -1.770130769779931 * z
        fc3 = x * fc2 - y * fs2
        fs3 = x * fs2 + y * fc2
        sh20 = 1.984313483298443 * z * sh12 - 1.006230589874905 * sh6
        out += [0.6258357354491763 * fs3, tmp_b4 * fs2, tmp_c4 * fs1, tmp_d * y, sh20, tmp_d * x, tmp_c4 * fc1,
                tmp_b4 * fc2, 0.6258357354491763 * fc3]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """View-dependent colour ``[..., 3]`` from SH coefficients ``[..., K, 3]`` (first ``(degree+1)^2`` used) at
    directions ``[..., 3]`` (normalised here). No offset / clamp: see :func:`sh_to_rgb`."""
    n = (degree + 1) ** 2
    if coeffs.shape[-2] < n:
        raise ValueError(f"sh_degree {degree} needs {n} coefficients, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))
    return torch.einsum("...k,...kc->...c", basis, coeffs[..., :n, :])


def sh_to_rgb(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """gsplat's colour from SH: ``max(eval_sh + 0.5, 0)``."""
    return torch.clamp_min(eval_sh(degree, dirs, coeffs) + 0.5, 0.0)


# --------------------------------------------------------------------------------------------- compositing
def _composite_block(
    pix: Tensor,  # [P, 2] pixel centres
    pix_tile: Tensor,  # [P, 2] long tile coordinates (x, y)
    means2d: Tensor,  # [M, 2] sorted front to back
    conics: Tensor,  # [M, 3]
    opacities: Tensor,  # [M]
    colors: Tensor,  # [M, D]
    tile_lo: Tensor,  # [M, 2] long, inclusive
    tile_hi: Tensor,  # [M, 2] long, exclusive
    chunk: int,
) -> Tuple[Tensor, Tensor]:
    """Front-to-back compositing of ``M`` depth-sorted 2D Gaussians on ``P`` pixels.

    Returns the composited colours ``[P, D]`` and the final log-transmittance ``[P]``.
    """
    P = pix.shape[0]
    M, D = colors.shape
    log_t_min = math.log(TRANSMITTANCE_MIN)
    log_t_all = pix.new_zeros(P)  # over every hit Gaussian: decides where a pixel stops
    log_t = pix.new_zeros(P)  # over the Gaussians actually composited
    acc = pix.new_zeros(P, D)
    for s in range(0, M, chunk):
        sl = slice(s, min(M, s + chunk))
        d = means2d[None, sl, :] - pix[:, None, :]  # [P, m, 2]
        con = conics[sl]
        sigma = 0.5 * (con[:, 0] * d[..., 0] ** 2 + con[:, 2] * d[..., 1] ** 2) + con[:, 1] * d[..., 0] * d[..., 1]
        alpha = torch.clamp_max(opacities[sl] * torch.exp(-sigma), MAX_ALPHA)
        with torch.no_grad():
            lo, hi = tile_lo[sl], tile_hi[sl]
            hit = (
                (pix_tile[:, None, 0] >= lo[:, 0])
                & (pix_tile[:, None, 0] < hi[:, 0])
                & (pix_tile[:, None, 1] >= lo[:, 1])
                & (pix_tile[:, None, 1] < hi[:, 1])
                & (sigma >= 0)
                & (alpha >= ALPHA_THRESHOLD)
            )
            a_hit = torch.where(hit, alpha, torch.zeros_like(alpha))
            cum_all = log_t_all[:, None] + torch.cumsum(torch.log1p(-a_hit), dim=1)
            keep = hit & (cum_all > log_t_min)  # a prefix of the hits: the transmittance only decreases
            log_t_all = cum_all[:, -1]
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        log1m = torch.log1p(-alpha)
        cum = torch.cumsum(log1m, dim=1)
        weights = alpha * torch.exp(log_t[:, None] + cum - log1m)  # alpha_i * T before i
        acc = acc + weights @ colors[sl]
        log_t = log_t + cum[:, -1]
        if bool((log_t_all <= log_t_min).all()):
            break
    return acc, log_t


def rasterize_gaussians_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    render_mode: RenderMode = "RGB",
    backgrounds: Optional[Tensor] = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = EPS2D,
    tile_size: int = TILE_SIZE,
    block_tiles: Sequence[int] = (1, 4),
    max_pairs: int = 1 << 21,
    checkpoint: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """Rasterize 3D Gaussians on the CPU (or any device) with the maths of ``gsplat.rasterization`` (classic).

    Mirrors ``gsplat.rasterization``'s arguments and first two outputs; slow, for tests and small demos.

    Args:
        means: ``[N, 3]`` world means.
        quats: ``[N, 4]`` ``wxyz`` quaternions (need not be normalised).
        scales: ``[N, 3]`` linear scales.
        opacities: ``[N]`` in (0, 1).
        colors: ``[N, D]`` per-Gaussian features (``sh_degree=None``) or ``[N, K, 3]`` SH coefficients.
        viewmats: ``[C, 4, 4]`` world-to-camera (OpenCV axes).
        Ks: ``[C, 3, 3]`` intrinsics.
        width, height: image size in pixels.
        sh_degree: SH degree to evaluate (``(sh_degree + 1)^2 <= K``), or None for plain features.
        render_mode: "RGB" (features), "D" / "ED" (accumulated / expected depth only), "RGB+D" / "RGB+ED"
            (features with the depth appended as the last channel).
        backgrounds: ``[C, D]`` background features (the depth channel's background is 0).
        near_plane, far_plane: depth culling range (inclusive).
        eps2d: low-pass dilation of the projected covariance (px^2).
        tile_size: tile size of the tile intersection test (gsplat's default 16).
        block_tiles: ``(rows, cols)`` of tiles processed together (speed / memory trade-off only).
        max_pairs: at most about this many pixel x Gaussian elements per intermediate tensor.
        checkpoint: recompute each block in the backward pass instead of storing its intermediates;
            None = when autograd records the graph.

    Returns:
        render_colors ``[C, H, W, X]`` and render_alphas ``[C, H, W, 1]`` (X as in gsplat: D, 1 or D + 1).
    """
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"unknown render_mode {render_mode!r}")
    C = viewmats.shape[0]
    N = means.shape[0]
    if sh_degree is None:
        if colors.dim() != 2 or colors.shape[0] != N:
            raise ValueError(f"colors must be [N, D] without sh_degree, got {tuple(colors.shape)}")
    elif colors.dim() != 3 or colors.shape[0] != N or colors.shape[2] != 3:
        raise ValueError(f"SH colors must be [N, K, 3], got {tuple(colors.shape)}")
    width, height = int(width), int(height)
    device, dtype = means.device, means.dtype
    covars = quat_scale_to_covar(quats, scales)
    tiles_w = math.ceil(width / tile_size)
    tiles_h = math.ceil(height / tile_size)
    bty, btx = int(block_tiles[0]), int(block_tiles[1])
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and any(
            t.requires_grad for t in (means, quats, scales, opacities, colors, viewmats, Ks)
        )

    out_colors, out_alphas = [], []
    for cam in range(C):
        viewmat, K = viewmats[cam], Ks[cam]
        means2d, conics, depths, radii = project_gaussians(
            means, covars, viewmat, K, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane
        )
        vis = torch.nonzero(radii > 0).squeeze(-1)
        order = vis[torch.sort(depths[vis].detach(), stable=True).indices]

        # per-Gaussian features of the visible Gaussians, front to back
        if sh_degree is None:
            feats = colors[order]
        else:
            campos = torch.linalg.inv(viewmat)[:3, 3]
            feats = sh_to_rgb(sh_degree, means[order] - campos, colors[order])
        bg = backgrounds[cam] if backgrounds is not None else None
        if render_mode in ("RGB+D", "RGB+ED"):
            feats = torch.cat([feats, depths[order, None]], dim=-1)
            if bg is not None:
                bg = torch.cat([bg, bg.new_zeros(1)])
        elif render_mode in ("D", "ED"):
            feats = depths[order, None]
            bg = None
        Dout = feats.shape[-1]
        m2d, con, opa = means2d[order], conics[order], opacities[order]

        with torch.no_grad():
            r = radii[order]
            tx, ty, tr = m2d[:, 0].detach() / tile_size, m2d[:, 1].detach() / tile_size, r / tile_size
            tile_lo = torch.stack([torch.floor(tx - tr).clamp(0, tiles_w), torch.floor(ty - tr).clamp(0, tiles_h)],
                                  dim=-1).long()
            tile_hi = torch.stack([torch.ceil(tx + tr).clamp(0, tiles_w), torch.ceil(ty + tr).clamp(0, tiles_h)],
                                  dim=-1).long()

        rows_c, rows_a = [], []
        for by0 in range(0, tiles_h, bty):
            by1 = min(tiles_h, by0 + bty)
            y0, y1 = by0 * tile_size, min(height, by1 * tile_size)
            row_c, row_a = [], []
            for bx0 in range(0, tiles_w, btx):
                bx1 = min(tiles_w, bx0 + btx)
                x0, x1 = bx0 * tile_size, min(width, bx1 * tile_size)
                h, w = y1 - y0, x1 - x0
                cand = torch.nonzero(
                    (tile_lo[:, 0] < bx1) & (tile_hi[:, 0] > bx0) & (tile_lo[:, 1] < by1) & (tile_hi[:, 1] > by0)
                ).squeeze(-1)
                if cand.numel() == 0:
                    col = feats.new_zeros(h, w, Dout)
                    log_t = torch.zeros(h, w, device=device, dtype=dtype)
                else:
                    py, px = torch.meshgrid(
                        torch.arange(y0, y1, device=device), torch.arange(x0, x1, device=device), indexing="ij"
                    )
                    pix_i = torch.stack([px.reshape(-1), py.reshape(-1)], dim=-1)
                    pix = pix_i.to(dtype) + 0.5
                    pix_tile = torch.div(pix_i, tile_size, rounding_mode="floor")
                    chunk = max(1, max_pairs // pix.shape[0])
                    args = (pix, pix_tile, m2d[cand], con[cand], opa[cand], feats[cand], tile_lo[cand],
                            tile_hi[cand], chunk)
                    if checkpoint:
                        col, log_t = _checkpoint(_composite_block, *args, use_reentrant=False)
                    else:
                        col, log_t = _composite_block(*args)
                    col, log_t = col.reshape(h, w, Dout), log_t.reshape(h, w)
                trans = torch.exp(log_t)[..., None]
                if bg is not None:
                    col = col + trans * bg
                row_c.append(col)
                row_a.append(1.0 - trans)
            rows_c.append(torch.cat(row_c, dim=1))
            rows_a.append(torch.cat(row_a, dim=1))
        img = torch.cat(rows_c, dim=0)
        alpha = torch.cat(rows_a, dim=0)
        if render_mode in ("ED", "RGB+ED"):
            img = torch.cat([img[..., :-1], img[..., -1:] / alpha.clamp(min=1e-10)], dim=-1)
        out_colors.append(img)
        out_alphas.append(alpha)
    return torch.stack(out_colors), torch.stack(out_alphas)
