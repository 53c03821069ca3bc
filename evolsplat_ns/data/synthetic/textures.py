"""Procedural textures: integer hashing, cell noise, materials and the sky.

Every texture is a pure function of the world hit point (and the primitive's parameters), never of the
viewing camera, so a surface point has the same colour in every image (Lambertian, view-independent).
Hashing is done in uint32 integer arithmetic so that results do not depend on floating-point ``sin`` tricks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

_M1 = np.uint32(0x8DA6B343)
_M2 = np.uint32(0xD8163841)
_M3 = np.uint32(0xCB1AB31F)
_M4 = np.uint32(0x7FEB352D)
_M5 = np.uint32(0x846CA68B)


def hash01(*keys) -> np.ndarray:
    """Uniform pseudo-random numbers in ``[0, 1)`` from integer keys (arrays broadcast; ints accepted)."""
    arrays = [np.asarray(k, dtype=np.int64).astype(np.uint32) for k in keys]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    x = np.zeros(shape, dtype=np.uint32)
    for a, m in zip(arrays, (_M1, _M2, _M3, _M1, _M2, _M3)):
        x = (x ^ (a * m)) * _M4
        x ^= x >> np.uint32(15)
    x ^= x >> np.uint32(16)
    x *= _M4
    x ^= x >> np.uint32(15)
    x *= _M5
    x ^= x >> np.uint32(16)
    return x.astype(np.float64) / 4294967296.0


def cell_noise(*coords: np.ndarray, scale: float, key: int = 0) -> np.ndarray:
    """Piecewise-constant noise in ``[0, 1)``: one random value per cell of size ``scale``."""
    cells = [np.floor(np.asarray(c) / scale).astype(np.int64) for c in coords]
    return hash01(key, *cells)


def mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-point blend ``a * (1 - w) + b * w`` of colours ``[..., 3]`` by weights ``[...]``."""
    w = np.asarray(w, dtype=np.float64)[..., None]
    return np.asarray(a) * (1.0 - w) + np.asarray(b) * w


def frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


@dataclass
class Sky:
    """Sky colour as a function of the viewing direction only (so it is the same from every camera)."""

    horizon: np.ndarray
    zenith: np.ndarray
    sun_dir: np.ndarray
    sun_glow: np.ndarray

    def color(self, dirs: np.ndarray) -> np.ndarray:
        d = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
        elev = np.clip(d[..., 2], 0.0, 1.0) ** 0.55
        col = mix(self.horizon, self.zenith, elev)
        glow = np.clip(d @ self.sun_dir, 0.0, 1.0) ** 24
        return np.clip(col + glow[..., None] * self.sun_glow, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Materials. ``albedo(prim, P, local, face)`` gets world points ``P [M, 3]``, the primitive's local coordinates
# ``local [M, 3]`` and (for boxes) the hit face ``face [M]`` in 0..5 = (+x, -x, +y, -y, +z, -z) of the local frame.
# --------------------------------------------------------------------------------------------------------------


class Material:
    def albedo(self, prim, P: np.ndarray, local: np.ndarray, face: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Plain(Material):
    """Flat colour with mild cell noise."""

    color: Tuple[float, float, float]
    noise: float = 0.06
    noise_scale: float = 0.35
    key: int = 0

    def albedo(self, prim, P, local, face):
        n = cell_noise(P[:, 0], P[:, 1], P[:, 2], scale=self.noise_scale, key=self.key)
        return np.clip(np.asarray(self.color)[None] * (1.0 + self.noise * (n[:, None] - 0.5) * 2.0), 0, 1)


@dataclass
class Facade(Material):
    """Building facade: storeys of windows on a grid, ground-floor shop windows, optional bricks/panels, a roof."""

    wall: Tuple[float, float, float]
    glass: Tuple[float, float, float]
    frame: Tuple[float, float, float]
    roof: Tuple[float, float, float]
    column_spacing: float
    storey_height: float
    window_width: float  # fraction of the column
    window_height: float  # fraction of the storey
    sill: float  # fraction of the storey below the window
    style: int  # 0 plain, 1 bricks, 2 panels
    shop_floor: bool
    key: int
    contrast: float = 1.0

    def albedo(self, prim, P, local, face):
        M = P.shape[0]
        out = np.empty((M, 3))
        half = prim.half
        top = face == 4
        roof_noise = cell_noise(P[top, 0], P[top, 1], scale=1.0, key=self.key)
        out[top] = np.asarray(self.roof) * (0.9 + 0.2 * roof_noise[:, None])
        side = ~top
        if not np.any(side):
            return out
        loc = local[side]
        fc = face[side]
        along_x = fc >= 2  # faces +-y run along the local x axis
        h = np.where(along_x, loc[:, 0] + half[0], loc[:, 1] + half[1])
        face_len = np.where(along_x, 2 * half[0], 2 * half[1])
        z = loc[:, 2] + half[2]
        height = 2 * half[2]
        wall = np.broadcast_to(np.asarray(self.wall), (loc.shape[0], 3)).copy()
        grime = cell_noise(h, z, fc, scale=0.5, key=self.key + 1)
        wall *= (0.94 + 0.12 * grime)[:, None]
        if self.style == 1:  # bricks: rows of 0.3 m, bricks 0.6 m, half-offset every other row
            row = np.floor(z / 0.3)
            bx = h / 0.6 + 0.5 * (row % 2)
            mortar = (frac(z / 0.3) < 0.12) | (frac(bx) < 0.06)
            tint = cell_noise(bx, row, scale=1.0, key=self.key + 2)
            wall *= (0.9 + 0.2 * tint)[:, None]
            wall[mortar] = wall[mortar] * 0.6 + 0.35
        elif self.style == 2:  # concrete panels
            seam = (frac(h / (self.column_spacing / 2)) < 0.04) | (frac(z / self.storey_height) < 0.04)
            wall[seam] *= 0.75
        # storey bands
        band = frac(z / self.storey_height) > 0.95
        wall[band] *= 0.82
        # parapet at the top
        wall[z > height - 0.35] *= 0.7
        # window grid, centred on the face
        n_cols = np.maximum(np.floor(face_len / self.column_spacing), 1)
        start = (face_len - n_cols * self.column_spacing) / 2
        hc = (h - start) / self.column_spacing
        col = np.floor(hc)
        fu = hc - col
        storey = np.floor(z / self.storey_height)
        fv = z / self.storey_height - storey
        n_storeys = np.floor((height - 0.4) / self.storey_height)
        valid_col = (col >= 0) & (col < n_cols)
        valid_row = (storey < n_storeys) & (storey >= (1 if self.shop_floor else 0))
        in_win = (
            valid_col
            & valid_row
            & (np.abs(fu - 0.5) < self.window_width / 2)
            & (fv > self.sill)
            & (fv < self.sill + self.window_height)
        )
        frame_w = 0.06
        in_glass = (
            in_win
            & (np.abs(fu - 0.5) < self.window_width / 2 - frame_w * self.window_width)
            & (fv > self.sill + frame_w * self.window_height)
            & (fv < self.sill + self.window_height * (1 - frame_w))
        )
        out_side = wall
        out_side[in_win] = self.frame
        if np.any(in_glass):
            r = hash01(self.key + 3, col[in_glass].astype(np.int64), storey[in_glass].astype(np.int64), fc[in_glass])
            glass = np.asarray(self.glass)[None] * (0.7 + 0.6 * r[:, None])
            lit = r > 0.88
            glass[lit] = np.array([0.95, 0.85, 0.55])
            # a reflection gradient inside each pane
            g = (fv[in_glass] - self.sill) / self.window_height
            glass *= (0.85 + 0.3 * g)[:, None]
            out_side[in_glass] = glass
        if self.shop_floor:  # ground floor: wide shop windows and a door per column group
            gf = (storey == 0) & valid_col
            shop = gf & (np.abs(fu - 0.5) < 0.42) & (fv > 0.12) & (fv < 0.78)
            if np.any(shop):
                r = hash01(self.key + 4, col[shop].astype(np.int64), fc[shop])
                out_side[shop] = np.asarray(self.glass)[None] * (0.6 + 0.5 * r[:, None]) + 0.05
            awning = gf & (fv >= 0.8) & (fv < 0.9)
            out_side[awning] = np.asarray(self.frame) * 0.6 + 0.1
        out[side] = np.clip(out_side, 0, 1)
        return out


@dataclass
class CarBody(Material):
    """Car body: paint with wheels on the long sides and lights on the ends."""

    paint: Tuple[float, float, float]
    ground_clearance: float

    def albedo(self, prim, P, local, face):
        half = prim.half
        out = np.broadcast_to(np.asarray(self.paint), (P.shape[0], 3)).copy()
        z = local[:, 2] + half[2] + self.ground_clearance  # height above the ground
        long_side = (face == 2) | (face == 3)
        wheel_r = 0.34
        for cx in (-0.62 * half[0], 0.62 * half[0]):
            w = long_side & ((local[:, 0] - cx) ** 2 + (z - wheel_r) ** 2 < wheel_r**2)
            out[w] = (0.06, 0.06, 0.07)
            hub = w & ((local[:, 0] - cx) ** 2 + (z - wheel_r) ** 2 < (0.45 * wheel_r) ** 2)
            out[hub] = (0.55, 0.55, 0.58)
        front = face == 0
        back = face == 1
        lamp = (np.abs(np.abs(local[:, 1]) - 0.7 * half[1]) < 0.18 * half[1]) & (local[:, 2] > 0.1 * half[2])
        out[front & lamp] = (0.95, 0.95, 0.88)
        out[back & lamp] = (0.8, 0.08, 0.06)
        plate = (front | back) & (np.abs(local[:, 1]) < 0.22) & (np.abs(local[:, 2] + 0.2 * half[2]) < 0.08)
        out[plate] = (0.92, 0.92, 0.92)
        out[face == 4] *= 0.95
        return out


@dataclass
class CarCabin(Material):
    """Car cabin: glass band on the sides, paint on the roof and pillars."""

    paint: Tuple[float, float, float]

    def albedo(self, prim, P, local, face):
        half = prim.half
        out = np.broadcast_to(np.asarray(self.paint), (P.shape[0], 3)).copy()
        vertical = face < 4
        fz = (local[:, 2] + half[2]) / (2 * half[2])
        along = np.where(face >= 2, local[:, 0] / half[0], local[:, 1] / half[1])
        glass = vertical & (fz > 0.1) & (fz < 0.9) & (np.abs(along) < 0.9)
        pillar = (face >= 2) & (np.abs(along) < 0.05)
        g = glass & ~pillar
        out[g] = np.array([0.12, 0.15, 0.19]) + 0.12 * fz[g, None]
        return out


@dataclass
class Sidewalk(Material):
    """Paving tiles on top, concrete curb faces."""

    color: Tuple[float, float, float]
    tile: float
    key: int

    def albedo(self, prim, P, local, face):
        out = np.broadcast_to(np.asarray(self.color), (P.shape[0], 3)).copy()
        top = face == 4
        a = local[top, 0] / self.tile
        b = local[top, 1] / self.tile
        t = hash01(self.key, np.floor(a).astype(np.int64), np.floor(b).astype(np.int64))
        tile = np.asarray(self.color)[None] * (0.92 + 0.14 * t[:, None])
        joint = (frac(a) < 0.05) | (frac(b) < 0.05)
        tile[joint] *= 0.7
        out[top] = tile
        out[~top] = np.asarray(self.color) * 1.1 + 0.03
        return np.clip(out, 0, 1)


@dataclass
class Sign(Material):
    """Traffic sign plate: coloured face with a white border."""

    color: Tuple[float, float, float]

    def albedo(self, prim, P, local, face):
        half = prim.half
        out = np.full((P.shape[0], 3), 0.55)
        big = (face == 2) | (face == 3)
        inner = big & (np.abs(local[:, 0]) < 0.78 * half[0]) & (np.abs(local[:, 2]) < 0.78 * half[2])
        out[big] = 0.95
        out[inner] = self.color
        sym = inner & (np.abs(local[:, 2]) < 0.12 * half[2]) & (np.abs(local[:, 0]) < 0.55 * half[0])
        out[sym] = 0.95
        return out


@dataclass
class Bark(Material):
    color: Tuple[float, float, float]
    key: int

    def albedo(self, prim, P, local, face):
        arc = np.arctan2(local[:, 1], local[:, 0]) * prim.radius  # vertical bark streaks
        n = cell_noise(arc / 0.06, P[:, 2] / 0.4, scale=1.0, key=self.key)
        return np.clip(np.asarray(self.color)[None] * (0.75 + 0.5 * n[:, None]), 0, 1)


@dataclass
class Foliage(Material):
    color: Tuple[float, float, float]
    key: int

    def albedo(self, prim, P, local, face):
        n1 = cell_noise(P[:, 0], P[:, 1], P[:, 2], scale=0.45, key=self.key)
        n2 = cell_noise(P[:, 0], P[:, 1], P[:, 2], scale=1.3, key=self.key + 1)
        f = 0.65 + 0.4 * n1 + 0.25 * (n2 - 0.5)
        return np.clip(np.asarray(self.color)[None] * f[:, None], 0, 1)
