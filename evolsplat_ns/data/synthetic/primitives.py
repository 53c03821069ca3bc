"""Analytic primitives: z-yawed boxes, vertical capped cylinders, spheres.

Each primitive offers
  * ``intersect(o, d)``: ray parameter of the nearest hit in front of the origin (``inf`` for a miss), vectorised;
    ``o`` is ``(ox, oy, oz)`` and ``d`` is ``(dx, dy, dz)``, each a scalar or an array, all broadcast together.
    Directions need not be unit vectors: the returned ``t`` is in units of ``|d|`` (the renderer passes
    directions with camera-z component 1, so ``t`` is the z-depth).
  * ``surface(P)``: outward normals ``[M, 3]``, local coordinates ``[M, 3]`` and a face index ``[M]``.
  * ``distance(P)``: unsigned distance ``[N]`` from points to the primitive's surface.
  * ``corners()``: ``[8, 3]`` corners of a bounding box (used for screen-space culling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

from evolsplat_ns.data.synthetic.textures import Material

EPS = 1e-6

_UNIT_CORNERS = np.array(
    [[sx, sy, sz] for sx in (-1.0, 1.0) for sy in (-1.0, 1.0) for sz in (-1.0, 1.0)], dtype=np.float64
)


class Primitive:
    material: Material
    kind: str = "primitive"

    def intersect(self, o, d) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def surface(self, P: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def distance(self, P: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def corners(self) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Box(Primitive):
    """Box with half extents ``half`` (local x, y, z), rotated by ``yaw`` about the world z axis."""

    center: np.ndarray
    half: np.ndarray
    yaw: float
    material: Material
    kind: str = "box"
    _c: float = field(init=False, repr=False)
    _s: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.half = np.asarray(self.half, dtype=np.float64)
        self._c = float(np.cos(self.yaw))
        self._s = float(np.sin(self.yaw))

    def to_local(self, P: np.ndarray) -> np.ndarray:
        q = P - self.center
        c, s = self._c, self._s
        return np.stack([q[..., 0] * c + q[..., 1] * s, -q[..., 0] * s + q[..., 1] * c, q[..., 2]], axis=-1)

    def intersect(self, o, d):
        c, s = self._c, self._s
        qx, qy, qz = o[0] - self.center[0], o[1] - self.center[1], o[2] - self.center[2]
        ol = (qx * c + qy * s, -qx * s + qy * c, qz)
        dl = (d[0] * c + d[1] * s, -d[0] * s + d[1] * c, d[2])
        tnear = None
        tfar = None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for k in range(3):
                inv = 1.0 / dl[k]
                ta = (-self.half[k] - ol[k]) * inv
                tb = (self.half[k] - ol[k]) * inv
                lo = np.fmin(ta, tb)
                hi = np.fmax(ta, tb)
                tnear = lo if tnear is None else np.fmax(tnear, lo)
                tfar = hi if tfar is None else np.fmin(tfar, hi)
        hit = (tnear <= tfar) & (tnear > EPS)
        return np.where(hit, tnear, np.inf)

    def surface(self, P):
        local = self.to_local(P)
        q = np.abs(local) / self.half
        axis = np.argmax(q, axis=-1)
        sign = np.sign(np.take_along_axis(local, axis[:, None], axis=-1)[:, 0])
        sign[sign == 0] = 1.0
        face = axis * 2 + (sign < 0)
        n_local = np.zeros_like(local)
        n_local[np.arange(len(axis)), axis] = sign
        c, s = self._c, self._s
        normal = np.stack(
            [n_local[:, 0] * c - n_local[:, 1] * s, n_local[:, 0] * s + n_local[:, 1] * c, n_local[:, 2]], axis=-1
        )
        return normal, local, face

    def distance(self, P):
        q = np.abs(self.to_local(P)) - self.half
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
        inside = np.minimum(q.max(axis=-1), 0.0)
        return np.abs(outside + inside)

    def corners(self):
        local = _UNIT_CORNERS * self.half
        c, s = self._c, self._s
        return np.stack(
            [local[:, 0] * c - local[:, 1] * s, local[:, 0] * s + local[:, 1] * c, local[:, 2]], axis=-1
        ) + self.center


@dataclass
class Cylinder(Primitive):
    """Vertical capped cylinder: axis through ``(x, y)``, from height ``z0`` to ``z1``, radius ``radius``."""

    x: float
    y: float
    z0: float
    z1: float
    radius: float
    material: Material
    kind: str = "cylinder"

    def intersect(self, o, d):
        qx, qy = o[0] - self.x, o[1] - self.y
        dx, dy, dz = d
        r2 = self.radius**2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            a = dx * dx + dy * dy
            b = qx * dx + qy * dy
            c = qx * qx + qy * qy - r2
            disc = b * b - a * c
            t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            z = o[2] + t_side * dz
            ok = (disc >= 0) & (a > 0) & (t_side > EPS) & (z >= self.z0) & (z <= self.z1)
            t = np.where(ok, t_side, np.inf)
            for zc in (self.z1, self.z0):
                tc = (zc - o[2]) / dz
                px, py = qx + tc * dx, qy + tc * dy
                okc = (tc > EPS) & (px * px + py * py <= r2)
                t = np.where(okc & (tc < t), tc, t)
        return t

    def surface(self, P):
        zc = 0.5 * (self.z0 + self.z1)
        local = np.stack([P[:, 0] - self.x, P[:, 1] - self.y, P[:, 2] - zc], axis=-1)
        rho = np.hypot(local[:, 0], local[:, 1])
        d_side = np.abs(rho - self.radius)
        d_top = np.abs(P[:, 2] - self.z1)
        d_bot = np.abs(P[:, 2] - self.z0)
        face = np.zeros(len(P), dtype=np.int64)
        face[(d_top < d_side) & (d_top <= d_bot)] = 4
        face[(d_bot < d_side) & (d_bot < d_top)] = 5
        normal = np.zeros_like(local)
        side = face == 0
        rr = np.maximum(rho[side], 1e-12)
        normal[side, 0] = local[side, 0] / rr
        normal[side, 1] = local[side, 1] / rr
        normal[face == 4, 2] = 1.0
        normal[face == 5, 2] = -1.0
        return normal, local, face

    def distance(self, P):
        rho = np.hypot(P[:, 0] - self.x, P[:, 1] - self.y)
        hz = 0.5 * (self.z1 - self.z0)
        dz = np.abs(P[:, 2] - 0.5 * (self.z0 + self.z1)) - hz
        dr = rho - self.radius
        outside = np.hypot(np.maximum(dr, 0.0), np.maximum(dz, 0.0))
        inside = np.minimum(np.maximum(dr, dz), 0.0)
        return np.abs(outside + inside)

    def corners(self):
        r = self.radius
        lo = np.array([self.x - r, self.y - r, self.z0])
        hi = np.array([self.x + r, self.y + r, self.z1])
        return lo + (_UNIT_CORNERS + 1.0) / 2.0 * (hi - lo)


@dataclass
class Sphere(Primitive):
    center: np.ndarray
    radius: float
    material: Material
    kind: str = "sphere"

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)

    def intersect(self, o, d):
        qx, qy, qz = o[0] - self.center[0], o[1] - self.center[1], o[2] - self.center[2]
        dx, dy, dz = d
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            a = dx * dx + dy * dy + dz * dz
            b = qx * dx + qy * dy + qz * dz
            c = qx * qx + qy * qy + qz * qz - self.radius**2
            disc = b * b - a * c
            t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        return np.where((disc >= 0) & (t > EPS), t, np.inf)

    def surface(self, P):
        local = P - self.center
        normal = local / self.radius
        return normal, local, np.zeros(len(P), dtype=np.int64)

    def distance(self, P):
        return np.abs(np.linalg.norm(P - self.center, axis=-1) - self.radius)

    def corners(self):
        return self.center + _UNIT_CORNERS * self.radius
