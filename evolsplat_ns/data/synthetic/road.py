"""The street: a gently curving centre line ``y = f(x)`` in a z-up world, and the textured ground plane.

Curvilinear street coordinates: ``s`` (arc length along the centre line, 0 at the ego's first position)
and ``d`` (signed lateral offset, positive to the left of the driving direction +x).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

from evolsplat_ns.data.synthetic.primitives import EPS, Primitive
from evolsplat_ns.data.synthetic.textures import Material, cell_noise, frac


@dataclass
class Road:
    """Centre line ``y(x) = sum_i a_i sin(k_i x + p_i)`` and the street's cross-section widths."""

    amplitudes: np.ndarray
    wavenumbers: np.ndarray
    phases: np.ndarray
    half_width: float
    """Asphalt from ``d = -half_width`` to ``+half_width``."""
    sidewalk_width: float
    curb_height: float
    x_range: Tuple[float, float]
    _x_tab: np.ndarray = field(init=False, repr=False)
    _s_tab: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        x = np.arange(self.x_range[0], self.x_range[1] + 0.125, 0.125)
        ds = np.sqrt(1.0 + self.slope(0.5 * (x[1:] + x[:-1])) ** 2) * np.diff(x)
        s = np.concatenate([[0.0], np.cumsum(ds)])
        s -= np.interp(0.0, x, s)
        self._x_tab, self._s_tab = x, s

    def center_y(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.sum(self.amplitudes * np.sin(self.wavenumbers * x[..., None] + self.phases), axis=-1)

    def slope(self, x):
        x = np.asarray(x, dtype=np.float64)
        k = self.wavenumbers
        return np.sum(self.amplitudes * k * np.cos(k * x[..., None] + self.phases), axis=-1)

    def heading(self, x):
        return np.arctan(self.slope(x))

    def x_of_s(self, s):
        return np.interp(s, self._s_tab, self._x_tab)

    def s_of_x(self, x):
        return np.interp(x, self._x_tab, self._s_tab)

    def point(self, s, d):
        """World ``(x, y)`` of street coordinates ``(s, d)``."""
        xc = self.x_of_s(s)
        th = self.heading(xc)
        return xc - np.asarray(d) * np.sin(th), self.center_y(xc) + np.asarray(d) * np.cos(th)

    def heading_at_s(self, s):
        return self.heading(self.x_of_s(s))

    def to_sd(self, x, y):
        """Approximate street coordinates of world points (exact on a straight street)."""
        th = self.heading(x)
        return self.s_of_x(x), (y - self.center_y(x)) * np.cos(th)


@dataclass
class GroundMaterial(Material):
    """Asphalt with lane markings and a crosswalk, pavement under the sidewalks, a verge beyond."""

    road: Road
    asphalt: float
    centre_style: int  # 0 dashed white, 1 double yellow
    dash_period: float
    dash_duty: float
    crosswalk_s: float
    sidewalk_color: Tuple[float, float, float]
    verge_color: Tuple[float, float, float]
    key: int

    def albedo(self, prim, P, local, face):
        x, y = P[:, 0], P[:, 1]
        s, d = self.road.to_sd(x, y)
        ad = np.abs(d)
        rw = self.road.half_width
        n1 = cell_noise(x, y, scale=0.3, key=self.key)
        n2 = cell_noise(x, y, scale=2.5, key=self.key + 1)
        g = self.asphalt * (0.9 + 0.16 * n1 + 0.14 * (n2 - 0.5))
        out = np.repeat(g[:, None], 3, axis=1) * np.array([1.0, 1.0, 1.04])
        paint = np.zeros(len(P), dtype=bool)
        white = np.array([0.88, 0.88, 0.85])
        if self.centre_style == 0:
            centre = (ad < 0.075) & (frac(s / self.dash_period) < self.dash_duty)
        else:
            centre = np.abs(ad - 0.13) < 0.06
        edge = np.abs(ad - (rw - 0.3)) < 0.075
        cross = (s > self.crosswalk_s) & (s < self.crosswalk_s + 3.5) & (ad < rw - 0.5) & (frac(d / 1.1) < 0.5)
        wear = (0.82 + 0.16 * n1)[:, None]
        if self.centre_style == 0:
            paint |= centre
        else:
            out[centre] = np.array([0.9, 0.72, 0.15]) * wear[centre]
        paint |= edge | cross
        out[paint] = white * wear[paint]
        walk = (ad >= rw) & (ad <= rw + self.road.sidewalk_width)
        out[walk] = self.sidewalk_color
        verge = ad > rw + self.road.sidewalk_width
        if np.any(verge):
            v = cell_noise(x[verge], y[verge], scale=0.6, key=self.key + 2)
            out[verge] = np.asarray(self.verge_color)[None] * (0.8 + 0.4 * v[:, None])
        return np.clip(out, 0, 1)


@dataclass
class Ground(Primitive):
    """The plane ``z = 0`` over the street's footprint: ``x`` in ``x_range`` and ``|d| <= lateral``."""

    road: Road
    x_range: Tuple[float, float]
    lateral: float
    material: Material
    kind: str = "ground"

    def _inside(self, x, y):
        _, d = self.road.to_sd(x, y)
        return (x >= self.x_range[0]) & (x <= self.x_range[1]) & (np.abs(d) <= self.lateral)

    def intersect(self, o, d):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[2] / d[2]
        x = o[0] + t * d[0]
        y = o[1] + t * d[1]
        ok = (t > EPS) & np.isfinite(t) & self._inside(x, y)
        return np.where(ok, t, np.inf)

    def surface(self, P):
        normal = np.zeros_like(P)
        normal[:, 2] = 1.0
        return normal, P.copy(), np.full(len(P), 4, dtype=np.int64)

    def distance(self, P):
        out_x = np.maximum(self.x_range[0] - P[:, 0], 0.0) + np.maximum(P[:, 0] - self.x_range[1], 0.0)
        return np.hypot(P[:, 2], out_x)

    def corners(self):  # pragma: no cover - the ground is never culled
        raise NotImplementedError

