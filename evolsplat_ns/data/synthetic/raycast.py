"""Vectorised analytic ray casting and shading (numpy).

``render_view`` casts one ray per pixel centre ``(u + 0.5, v + 0.5)`` of an OpenCV pinhole camera. Ray directions
are ``R @ K^-1 [u + 0.5, v + 0.5, 1]``, whose camera-z component is 1, so the ray parameter of a hit *is* its
z-depth, exactly what :func:`evolsplat_ns.cameras.unproject_depth` inverts. Before any intersection test each
primitive is culled against the camera: its bounding box is clipped to ``z >= near`` and projected, and only the
pixels inside that screen rectangle are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.data.synthetic.primitives import Primitive

NEAR = 0.05
AMBIENT = 0.5
DIFFUSE = 0.6

# the 12 edges of a box whose corners are ordered as in primitives._UNIT_CORNERS (index = 4 sx + 2 sy + sz)
_EDGES = np.array([(i, i | b) for i in range(8) for b in (1, 2, 4) if not i & b], dtype=np.int64)


@dataclass
class RenderResult:
    rgb: np.ndarray
    """[H, W, 3] uint8."""
    depth: np.ndarray
    """[H, W] float32 metric z-depth; 0 where the ray hits nothing (sky)."""
    sky: np.ndarray
    """[H, W] bool."""
    prim_id: np.ndarray
    """[H, W] int64 index of the primitive hit (-1 for sky)."""


def cast_rays(primitives: Sequence[Primitive], origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest hit of arbitrary rays ``origins [N, 3]`` (or one ``[3]``) + ``t * dirs [N, 3]``.

    Returns ``t [N]`` (``inf`` for a miss; in units of ``|dirs|``) and ``prim_id [N]`` (-1 for a miss).
    """
    dirs = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
    origins = np.asarray(origins, dtype=np.float64)
    o = tuple(origins[..., k] for k in range(3))
    d = tuple(dirs[:, k] for k in range(3))
    t_best = np.full(len(dirs), np.inf)
    ids = np.full(len(dirs), -1, dtype=np.int64)
    for k, prim in enumerate(primitives):
        t = prim.intersect(o, d)
        m = t < t_best
        t_best[m] = t[m]
        ids[m] = k
    return t_best, ids


def shade(
    primitives: Sequence[Primitive], sky, sun: np.ndarray, P: np.ndarray, ids: np.ndarray, dirs: np.ndarray
) -> np.ndarray:
    """Colours ``[N, 3]`` in [0, 1] of hit points ``P [N, 3]`` on primitives ``ids`` (sky colour where -1)."""
    rgb = np.empty((len(ids), 3))
    order = np.argsort(ids, kind="stable")
    uniq, starts = np.unique(ids[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for k, a, b in zip(uniq, starts, ends):
        idx = order[a:b]
        if k < 0:
            rgb[idx] = sky.color(dirs[idx])
            continue
        prim = primitives[k]
        Pk = P[idx]
        normal, local, face = prim.surface(Pk)
        albedo = prim.material.albedo(prim, Pk, local, face)
        light = AMBIENT + DIFFUSE * np.clip(normal @ sun, 0.0, 1.0)
        if prim.kind != "ground":  # a little darkening near the ground, like ambient occlusion
            light = light * (0.8 + 0.2 * np.clip(Pk[:, 2] / 1.2, 0.0, 1.0))
        rgb[idx] = albedo * light[:, None]
    return np.clip(rgb, 0.0, 1.0)


def camera_rays(c2w: np.ndarray, K: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World directions ``(Dx, Dy, Dz)``, each ``[H, W]``, with camera-z component 1, through pixel centres."""
    K = np.asarray(K, dtype=np.float64)
    v = np.arange(height, dtype=np.float64) + 0.5
    u = np.arange(width, dtype=np.float64) + 0.5
    yc = (v - K[1, 2]) / K[1, 1]
    xc = (u[None, :] - K[0, 2] - K[0, 1] * yc[:, None]) / K[0, 0]
    yc = np.broadcast_to(yc[:, None], (height, width))
    R = np.asarray(c2w, dtype=np.float64)[:3, :3]
    return tuple(R[i, 0] * xc + R[i, 1] * yc + R[i, 2] for i in range(3))  # type: ignore[return-value]


def screen_rects(corners: np.ndarray, c2w: np.ndarray, K: np.ndarray, height: int, width: int) -> np.ndarray:
    """Conservative pixel rectangles ``[P, 4]`` = (u0, u1, v0, v1), end-exclusive, of boxes ``corners [P, 8, 3]``.

    Each box is clipped to the half-space ``z >= NEAR`` of the camera before projection; an empty rectangle
    (``u1 <= u0`` or ``v1 <= v0``) means the box is outside the view.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    R, o = c2w[:3, :3], c2w[:3, 3]
    cam = (corners - o) @ R  # [P, 8, 3]
    z = cam[..., 2]
    a, b = cam[:, _EDGES[:, 0]], cam[:, _EDGES[:, 1]]  # [P, 12, 3]
    za, zb = a[..., 2], b[..., 2]
    straddle = (za - NEAR) * (zb - NEAR) < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(straddle, (NEAR - za) / (zb - za), 0.0)
    clip = a + alpha[..., None] * (b - a)
    pts = np.concatenate([cam, clip], axis=1)  # [P, 20, 3]
    valid = np.concatenate([z >= NEAR, straddle], axis=1)
    zz = np.where(valid, np.maximum(pts[..., 2], NEAR), 1.0)
    u = K[0, 0] * pts[..., 0] / zz + K[0, 1] * pts[..., 1] / zz + K[0, 2]
    v = K[1, 1] * pts[..., 1] / zz + K[1, 2]
    umin = np.where(valid, u, np.inf).min(axis=1)
    umax = np.where(valid, u, -np.inf).max(axis=1)
    vmin = np.where(valid, v, np.inf).min(axis=1)
    vmax = np.where(valid, v, -np.inf).max(axis=1)
    any_valid = valid.any(axis=1)
    big = 1e9
    rect = np.stack(
        [
            np.floor(np.clip(umin, -big, big) - 0.5),
            np.floor(np.clip(umax, -big, big) - 0.5) + 2,
            np.floor(np.clip(vmin, -big, big) - 0.5),
            np.floor(np.clip(vmax, -big, big) - 0.5) + 2,
        ],
        axis=1,
    )
    rect[:, :2] = np.clip(rect[:, :2], 0, width)
    rect[:, 2:] = np.clip(rect[:, 2:], 0, height)
    rect = rect.astype(np.int64)
    rect[~any_valid] = 0
    return rect


def render_view(
    primitives: Sequence[Primitive],
    corners: np.ndarray,
    sky,
    sun: np.ndarray,
    c2w: np.ndarray,
    K: np.ndarray,
    height: int,
    width: int,
    always_test: Optional[Sequence[int]] = None,
) -> RenderResult:
    """Ray-cast one OpenCV camera.

    Args:
        primitives: the scene's primitives.
        corners: ``[P, 8, 3]`` bounding-box corners of ``primitives`` (rows of ``always_test`` are ignored).
        sky: an object with ``color(dirs [N, 3]) -> [N, 3]``.
        sun: unit vector towards the sun.
        c2w: ``[4, 4]`` OpenCV camera-to-world.
        K: ``[3, 3]`` intrinsics.
        always_test: indices of primitives tested against every pixel (the unbounded ground).
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    o = tuple(float(x) for x in c2w[:3, 3])
    D = camera_rays(c2w, K, height, width)
    t_buf = np.full((height, width), np.inf)
    id_buf = np.full((height, width), -1, dtype=np.int64)
    always = set(always_test or ())
    for k in sorted(always):
        t = primitives[k].intersect(o, D)
        m = t < t_buf
        t_buf[m] = t[m]
        id_buf[m] = k
    rects = screen_rects(corners, c2w, K, height, width)
    live = np.nonzero((rects[:, 1] > rects[:, 0]) & (rects[:, 3] > rects[:, 2]))[0]
    for k in live:
        if k in always:
            continue
        u0, u1, v0, v1 = rects[k]
        t = primitives[k].intersect(o, (D[0][v0:v1, u0:u1], D[1][v0:v1, u0:u1], D[2][v0:v1, u0:u1]))
        blk = t_buf[v0:v1, u0:u1]
        m = t < blk
        if m.any():
            blk[m] = t[m]
            id_buf[v0:v1, u0:u1][m] = k
    ids = id_buf.reshape(-1)
    t = t_buf.reshape(-1)
    dirs = np.stack([d.reshape(-1) for d in D], axis=-1)
    hit = ids >= 0
    P = np.zeros_like(dirs)
    P[hit] = np.asarray(o) + t[hit, None] * dirs[hit]
    rgb = shade(primitives, sky, sun, P, ids, dirs)
    rgb8 = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)
    depth = np.where(hit, t, 0.0).astype(np.float32).reshape(height, width)
    return RenderResult(rgb=rgb8, depth=depth, sky=~hit.reshape(height, width), prim_id=id_buf)
