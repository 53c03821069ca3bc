"""Procedural street layout, ego trajectory and camera rig: :class:`SyntheticScene` and :func:`make_scene`.

World frame (the frame of the written ``transforms.json`` poses and ``seed.ply``): metric, **z up**, ground at
``z = 0``, the street runs roughly along **+x** (the driving direction), **+y** is to the left. The street
curves gently (``y = f(x)``), so the ego's heading varies by a few degrees. The ego starts at street
coordinate ``s = 0`` (``x = 0``), a few metres at most from the origin, in the right-hand lane.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: a scene depends only on ``(seed, index)``
and the number of frames (which sets the street's length); the geometry does not depend on the image size
(the horizontal field of view is drawn, the focal length follows from the width), and ``num_cameras`` only
selects the first cameras of the rig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from evolsplat_ns.data.synthetic import raycast
from evolsplat_ns.data.synthetic.primitives import Box, Cylinder, Primitive, Sphere
from evolsplat_ns.data.synthetic.road import Ground, GroundMaterial, Road
from evolsplat_ns.data.synthetic.textures import (
    Bark,
    CarBody,
    CarCabin,
    Facade,
    Foliage,
    Plain,
    Sidewalk,
    Sign,
    Sky,
)

#: Camera names indexed by camera id; ``--cameras C`` uses the first C.
CAMERA_NAMES = ("front", "front_left", "front_right")

_WALLS = [
    (0.80, 0.74, 0.62),  # sandstone
    (0.62, 0.30, 0.22),  # brick red
    (0.55, 0.55, 0.55),  # concrete
    (0.86, 0.85, 0.80),  # white render
    (0.52, 0.62, 0.72),  # pastel blue
    (0.80, 0.62, 0.30),  # ochre
    (0.40, 0.30, 0.24),  # dark brown
    (0.68, 0.72, 0.60),  # sage
    (0.78, 0.55, 0.55),  # rose
    (0.35, 0.38, 0.42),  # slate
]
_PAINTS = [
    (0.90, 0.90, 0.90), (0.70, 0.72, 0.74), (0.08, 0.08, 0.09), (0.70, 0.08, 0.07), (0.10, 0.22, 0.55),
    (0.12, 0.32, 0.20), (0.85, 0.70, 0.15), (0.45, 0.45, 0.50), (0.55, 0.30, 0.15), (0.30, 0.55, 0.75),
]
_SIGNS = [(0.80, 0.10, 0.10), (0.10, 0.25, 0.75), (0.95, 0.75, 0.10), (0.10, 0.55, 0.25)]
_FOLIAGE = [(0.22, 0.45, 0.16), (0.30, 0.50, 0.20), (0.18, 0.38, 0.20), (0.45, 0.50, 0.18), (0.60, 0.40, 0.12)]
_CLUTTER = [(0.15, 0.35, 0.2), (0.3, 0.3, 0.32), (0.15, 0.25, 0.55), (0.6, 0.5, 0.2)]
_VERGE = [(0.30, 0.45, 0.20), (0.52, 0.51, 0.48), (0.50, 0.42, 0.30)]


def _jitter(rng: np.random.Generator, color, amount: float = 0.06) -> Tuple[float, float, float]:
    c = np.clip(np.asarray(color) * (1.0 + rng.uniform(-amount, amount, 3)), 0.0, 1.0)
    return tuple(float(x) for x in c)  # type: ignore[return-value]


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def opencv_camera_pose(position, yaw: float, pitch: float) -> np.ndarray:
    """OpenCV camera-to-world ``[4, 4]`` of a camera at ``position`` looking along heading ``yaw`` (radians,
    counter-clockwise from +x about +z) tilted up by ``pitch`` (radians), with no roll, in the z-up world."""
    fwd = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(fwd, right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2] = right, down, fwd
    T[:3, 3] = position
    return T


@dataclass
class SyntheticScene:
    """One procedural street scene: geometry, materials, ego trajectory and camera rig (OpenCV poses)."""

    seed: int
    index: int
    width: int
    height: int
    K: np.ndarray
    """[3, 3] pinhole intrinsics shared by all cameras (fx = fy, principal point at the image centre)."""
    c2w: np.ndarray
    """[T, C, 4, 4] OpenCV camera-to-world poses in the world frame (z up)."""
    camera_names: List[str]
    primitives: List[Primitive]
    sky: Sky
    sun: np.ndarray
    road: Road
    params: Dict[str, float] = field(default_factory=dict)
    _corners: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"scene_{self.index:03d}"

    @property
    def num_frames(self) -> int:
        return int(self.c2w.shape[0])

    @property
    def num_cameras(self) -> int:
        return int(self.c2w.shape[1])

    def _box_corners(self) -> np.ndarray:
        if self._corners is None:
            self._corners = np.stack(
                [np.zeros((8, 3)) if p.kind == "ground" else p.corners() for p in self.primitives]
            )
        return self._corners

    def render(self, frame: int, camera: int) -> raycast.RenderResult:
        """Ray-cast image ``(frame, camera)``: uint8 RGB, float32 z-depth (0 = sky), sky mask, primitive ids."""
        return self.render_view(self.c2w[frame, camera])

    def render_view(
        self, c2w: np.ndarray, K: Optional[np.ndarray] = None, height: Optional[int] = None, width: Optional[int] = None
    ) -> raycast.RenderResult:
        """Ray-cast an arbitrary OpenCV camera (defaults: the scene's intrinsics and image size)."""
        always = [i for i, p in enumerate(self.primitives) if p.kind == "ground"]
        return raycast.render_view(
            self.primitives,
            self._box_corners(),
            self.sky,
            self.sun,
            c2w,
            self.K if K is None else K,
            self.height if height is None else height,
            self.width if width is None else width,
            always_test=always,
        )

    def raycast(self, origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest hits of rays ``origins [N, 3] | [3]`` + ``t * dirs [N, 3]`` (world frame).

        Returns ``t [N]`` (in units of ``|dirs|``; ``inf`` for a miss), ``prim_id [N]`` (-1 for a miss) and the
        shaded colour ``rgb [N, 3]`` in [0, 1] (sky colour for a miss).
        """
        dirs = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
        t, ids = raycast.cast_rays(self.primitives, origins, dirs)
        hit = ids >= 0
        P = np.zeros_like(dirs)
        o = np.broadcast_to(np.asarray(origins, dtype=np.float64), dirs.shape)
        P[hit] = o[hit] + t[hit, None] * dirs[hit]
        return t, ids, raycast.shade(self.primitives, self.sky, self.sun, P, ids, dirs)

    def distance_to_surface(self, points_world: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Unsigned distance ``[N]`` from world points ``[N, 3]`` to the nearest surface of the scene."""
        P = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        out = np.empty(len(P))
        for a in range(0, len(P), chunk):
            Q = P[a : a + chunk]
            best = np.full(len(Q), np.inf)
            for prim in self.primitives:
                best = np.minimum(best, prim.distance(Q))
            out[a : a + chunk] = best
        return out


# ----------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, rng: np.random.Generator, road: Road) -> None:
        self.rng = rng
        self.road = road
        self.prims: List[Primitive] = []
        self._key = 1000

    def key(self) -> int:
        self._key += 17
        return self._key

    def box_at(self, s: float, d: float, z0: float, size, material, yaw_offset: float = 0.0) -> Box:
        """Box of ``size = (along, across, height)`` centred at street coordinates (s, d), from height z0."""
        x, y = self.road.point(s, d)
        yaw = float(self.road.heading_at_s(s)) + yaw_offset
        b = Box(
            center=(float(x), float(y), z0 + size[2] / 2), half=np.asarray(size, dtype=np.float64) / 2, yaw=yaw,
            material=material,
        )
        self.prims.append(b)
        return b

    def facade(self, contrast_low: bool = False) -> Facade:
        rng = self.rng
        wall_i = int(rng.integers(len(_WALLS)))
        wall = _jitter(rng, _WALLS[wall_i], 0.08)
        style = 1 if (wall_i in (1, 6) or rng.uniform() < 0.15) else (2 if rng.uniform() < 0.3 else 0)
        glasses = [(0.16, 0.20, 0.27), (0.22, 0.27, 0.30), (0.12, 0.14, 0.16), (0.25, 0.32, 0.38)]
        glass = _jitter(rng, glasses[int(rng.integers(len(glasses)))])
        frame = (0.9, 0.9, 0.88) if rng.uniform() < 0.5 else _jitter(rng, (0.25, 0.22, 0.2))
        wh = float(rng.uniform(0.4, 0.6))
        return Facade(
            wall=wall, glass=glass, frame=frame, roof=_jitter(rng, (0.35, 0.33, 0.32), 0.2),
            column_spacing=float(rng.uniform(2.2, 3.6)), storey_height=float(rng.uniform(2.8, 3.6)),
            window_width=float(rng.uniform(0.35, 0.62)), window_height=wh, sill=float(rng.uniform(0.18, 0.9 - wh)),
            style=style, shop_floor=bool(rng.uniform() < 0.5 and not contrast_low), key=self.key(),
        )


def make_scene(
    seed: int, index: int, height: int = 96, width: int = 288, num_frames: int = 40, num_cameras: int = 3
) -> SyntheticScene:
    """Build scene ``index`` of the data set drawn with ``seed`` (deterministic in ``(seed, index)``)."""
    if not 1 <= num_cameras <= len(CAMERA_NAMES):
        raise ValueError(f"num_cameras must be in 1..{len(CAMERA_NAMES)}, got {num_cameras}")
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError("num_frames, height and width must be positive")
    rng = np.random.default_rng([int(seed), int(index)])
    u = rng.uniform

    # ---- camera, motion, street cross-section -------------------------------------------------------------
    hfov = np.deg2rad(u(72.0, 88.0))
    f = (width / 2.0) / np.tan(hfov / 2.0)
    K = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
    speed = float(u(0.8, 1.3))
    half_width = float(u(5.0, 7.0))
    sidewalk_w = float(u(2.0, 4.0))
    curb_h = float(u(0.10, 0.20))
    traj_len = (num_frames - 1) * speed
    s_min, s_max = -30.0, traj_len + 75.0

    amps = np.array([u(0.0, 3.0) if u() < 0.8 else 0.0, u(0.0, 0.6)])
    waves = 2 * np.pi / np.array([u(100.0, 200.0), u(50.0, 90.0)])
    phases = u(0.0, 2 * np.pi, 2)
    road = Road(amps, waves, phases, half_width, sidewalk_w, curb_h, x_range=(s_min - 120.0, s_max + 120.0))
    b = _Builder(rng, road)

    # ---- ground --------------------------------------------------------------------------------------------
    side_color = _jitter(rng, (0.62, 0.61, 0.58), 0.08)
    gx0, gx1 = float(road.x_of_s(s_min - 25.0)), float(road.x_of_s(s_max + 25.0))
    ground_mat = GroundMaterial(
        road=road, asphalt=float(u(0.26, 0.38)), centre_style=int(u() < 0.3), dash_period=float(u(6.0, 12.0)),
        dash_duty=float(u(0.35, 0.55)), crosswalk_s=float(u(5.0, max(6.0, traj_len + 20.0))),
        sidewalk_color=side_color, verge_color=_jitter(rng, _VERGE[int(rng.integers(len(_VERGE)))]), key=b.key(),
    )
    b.prims.append(Ground(road=road, x_range=(gx0, gx1), lateral=60.0, material=ground_mat))

    # ---- sidewalks: raised slabs along both sides ----------------------------------------------------------
    walk_mat = Sidewalk(color=side_color, tile=float(u(0.5, 0.9)), key=b.key())
    seg = 6.0
    for side in (-1.0, 1.0):
        s = s_min - 15.0
        while s < s_max + 15.0:
            b.box_at(s + seg / 2, side * (half_width + sidewalk_w / 2), 0.0, (seg + 0.4, sidewalk_w, curb_h), walk_mat)
            s += seg

    # ---- buildings --------------------------------------------------------------------------------------------
    # district type: (storeys lo, hi), max set-back, gap probability, max gap, back-row height range
    district = int(rng.choice(3, p=[0.3, 0.35, 0.35]))  # 0 urban canyon, 1 mixed, 2 suburban
    storeys_lo, storeys_hi, max_setback, gap_p, max_gap, back_h = [
        (3, 7, 2.0, 0.2, 8.0, (14.0, 35.0)),
        (2, 4, 5.0, 0.4, 12.0, (7.0, 16.0)),
        (1, 2, 10.0, 0.55, 15.0, (4.0, 9.0)),
    ][district]
    n_buildings = 0
    for side in (-1.0, 1.0):
        s = s_min - 10.0 - u(0.0, 8.0)
        while s < s_max + 5.0:
            if u() < gap_p:
                s += u(2.0, max_gap)  # a gap between buildings
            length, depth, setback = u(8.0, 22.0), u(8.0, 15.0), u(0.0, max_setback)
            mat = b.facade()
            storeys = int(rng.integers(storeys_lo, storeys_hi + 1))
            bh = storeys * mat.storey_height + u(0.4, 1.2)
            d_c = side * (half_width + sidewalk_w + setback + depth / 2)
            b.box_at(s + length / 2, d_c, 0.0, (length, depth, bh), mat)
            n_buildings += 1
            s += length + (u(0.0, 0.6) if u() < 0.5 else 0.0)
        # a continuous, taller back row seen through the gaps
        s = s_min - 40.0
        while s < s_max + 40.0:
            length = u(15.0, 30.0)
            mat = b.facade(contrast_low=True)
            bh = u(*back_h)
            d_c = side * (half_width + sidewalk_w + u(26.0, 30.0) + 5.0)
            b.box_at(s + length / 2, d_c, 0.0, (length, 10.0, bh), mat)
            s += length
    # the street ends in front (and behind) at a cross building
    across = 2 * (half_width + sidewalk_w + 40.0)
    b.box_at(s_max + 14.0, 0.0, 0.0, (16.0, across, u(*back_h)), b.facade())
    b.box_at(s_min - 22.0, 0.0, 0.0, (16.0, across, u(*back_h)), b.facade())

    # ---- cars --------------------------------------------------------------------------------------------------
    def car(s: float, d: float, yaw_offset: float) -> None:
        length, wd = u(3.8, 4.9), u(1.70, 1.95)
        body_h, clearance = u(0.6, 0.85), 0.18
        paint = _jitter(rng, _PAINTS[int(rng.integers(len(_PAINTS)))], 0.05)
        heading_sign = 1.0 if abs(yaw_offset) < np.pi / 2 else -1.0
        b.box_at(s, d, clearance, (length, wd, body_h), CarBody(paint=paint, ground_clearance=clearance), yaw_offset)
        cab_len = length * u(0.45, 0.6)
        cab_s = s - heading_sign * length * u(0.02, 0.12)
        b.box_at(cab_s, d, clearance + body_h, (cab_len, wd - 0.12, u(0.45, 0.6)), CarCabin(paint=paint), yaw_offset)

    park_p = u(0.35, 0.75)
    n_cars = 0
    for side in (-1.0, 1.0):
        s = s_min + u(0.0, 6.0)
        while s < s_max:
            if u() < park_p:
                facing = 0.0 if side < 0 else np.pi
                car(s, side * (half_width - 1.05) + u(-0.1, 0.1), facing + np.deg2rad(u(-2.5, 2.5)))
                n_cars += 1
            s += u(5.6, 9.0)
    for _ in range(int(rng.integers(0, 4))):  # stopped traffic in the opposite lane
        car(u(4.0, s_max - 8.0), half_width / 2 + u(-0.3, 0.3), np.pi + np.deg2rad(u(-3, 3)))
        n_cars += 1
    if u() < 0.6:  # a car ahead in the ego lane, beyond where the ego stops
        car(u(traj_len + 12.0, s_max - 6.0), -half_width / 2 + u(-0.2, 0.2), np.deg2rad(u(-2, 2)))
        n_cars += 1

    # ---- poles, signs, lamps ---------------------------------------------------------------------------------
    pole_mat = Plain(color=_jitter(rng, (0.42, 0.43, 0.45)), key=b.key())
    pole_s: Dict[float, List[float]] = {-1.0: [], 1.0: []}
    for side in (-1.0, 1.0):
        s = s_min + u(0.0, 10.0)
        while s < s_max:
            d = side * (half_width + 0.35)
            x, y = road.point(s, d)
            ph = u(4.5, 7.5)
            r = u(0.07, 0.11)
            b.prims.append(Cylinder(float(x), float(y), 0.0, ph, r, pole_mat))
            pole_s[side].append(s)
            if u() < 0.4:  # a sign facing the traffic of its side
                sz = u(0.28, 0.4)
                toward = -side  # right side (-1) faces the ego coming from -s
                # yawed by 90 degrees: local x runs across the street, the plate's faces (local +-y) along it
                b.box_at(s + toward * (r + 0.04), d, u(2.0, 2.6), (2 * sz, 0.06, 2 * sz),
                         Sign(color=_SIGNS[int(rng.integers(len(_SIGNS)))]), np.pi / 2)
            if u() < 0.5:  # a lamp arm over the street
                b.box_at(s, d - side * 0.8, ph - 0.15, (0.1, 1.6, 0.1), pole_mat)
                b.box_at(s, d - side * 1.55, ph - 0.28, (0.5, 0.3, 0.12), Plain(color=(0.85, 0.85, 0.8), key=b.key()))
            s += u(12.0, 26.0)

    # ---- trees -------------------------------------------------------------------------------------------------
    tree_p = 0.0 if u() < (0.2 if district < 2 else 0.05) else u(0.4, 0.9)
    n_trees = 0
    bark = Bark(color=_jitter(rng, (0.35, 0.25, 0.17)), key=b.key())
    foliage_base = _FOLIAGE[int(rng.integers(len(_FOLIAGE)))]
    for side in (-1.0, 1.0):
        s = s_min + u(0.0, 8.0)
        while s < s_max:
            if u() < tree_p and all(abs(s - ps) > 2.0 for ps in pole_s[side]):
                x, y = road.point(s, side * (half_width + 0.55 * sidewalk_w))
                th, tr = u(2.2, 3.8), u(0.12, 0.22)
                b.prims.append(Cylinder(float(x), float(y), 0.0, th, tr, bark))
                cr = u(1.2, 2.2)
                fol = Foliage(color=_jitter(rng, foliage_base, 0.12), key=b.key())
                b.prims.append(Sphere(np.array([x, y, th + 0.55 * cr]), cr, fol))
                if u() < 0.35:
                    b.prims.append(Sphere(np.array([x + u(-0.5, 0.5), y + u(-0.5, 0.5), th + 1.3 * cr]), 0.7 * cr, fol))
                n_trees += 1
            s += u(7.0, 15.0)

    # ---- street clutter: bins, boxes, bollards ----------------------------------------------------------------
    for side in (-1.0, 1.0):
        for _ in range(int(rng.integers(2, 7))):
            s = u(s_min, s_max)
            w, hgt = u(0.4, 0.9), u(0.6, 1.3)
            col = _jitter(rng, _CLUTTER[int(rng.integers(len(_CLUTTER)))])
            d = side * (half_width + sidewalk_w - 0.45 - w / 2)
            b.box_at(s, d, curb_h, (w, w, hgt), Plain(color=col, key=b.key()), np.deg2rad(u(-10, 10)))

    # ---- sky and sun ------------------------------------------------------------------------------------------
    sun_az, sun_el = u(0.0, 2 * np.pi), np.deg2rad(u(25.0, 65.0))
    sun = np.array([np.cos(sun_az) * np.cos(sun_el), np.sin(sun_az) * np.cos(sun_el), np.sin(sun_el)])
    hz = _jitter(rng, (0.80, 0.86, 0.92), 0.06)
    zen = _jitter(rng, [(0.30, 0.50, 0.82), (0.45, 0.60, 0.80), (0.55, 0.62, 0.70)][int(rng.integers(3))], 0.08)
    sky = Sky(horizon=np.asarray(hz), zenith=np.asarray(zen), sun_dir=sun, sun_glow=np.array([0.35, 0.3, 0.2]))

    # ---- ego trajectory and camera rig -------------------------------------------------------------------------
    lane_d = -(1.6 + 0.15 * (half_width - 5.0))
    weave_a, weave_p, weave_ph = u(0.0, 0.3), u(40.0, 80.0), u(0.0, 2 * np.pi)

    def ego_d(s):
        return lane_d + weave_a * np.sin(2 * np.pi * np.asarray(s) / weave_p + weave_ph)

    cam_h = float(u(1.5, 1.7))
    pitch = np.deg2rad(u(-2.0, 2.0))
    side_yaw = np.deg2rad(u(45.0, 55.0))
    # (forward, left) offsets in the ego frame and yaw offsets, by camera id
    rig = [((1.6, 0.0), 0.0), ((1.45, 0.3), side_yaw), ((1.45, -0.3), -side_yaw)][:num_cameras]
    s_t = np.arange(num_frames) * speed
    c2w = np.zeros((num_frames, num_cameras, 4, 4))
    for t, s in enumerate(s_t):
        x, y = road.point(s, ego_d(s))
        xa, ya = road.point(s - 0.05, ego_d(s - 0.05))
        xb, yb = road.point(s + 0.05, ego_d(s + 0.05))
        yaw = float(np.arctan2(yb - ya, xb - xa)) + np.deg2rad(rng.normal(0.0, 0.25))
        p_t = pitch + np.deg2rad(rng.normal(0.0, 0.15))
        R = _rot_z(yaw)
        for c, ((fwd, left), yaw_off) in enumerate(rig):
            pos = np.array([x, y, 0.0]) + R @ np.array([fwd, left, cam_h])
            c2w[t, c] = opencv_camera_pose(pos, yaw + yaw_off, p_t)

    yaws = np.array([np.arctan2(c2w[t, 0, 1, 2], c2w[t, 0, 0, 2]) for t in range(num_frames)])
    params = {
        "hfov_deg": float(np.rad2deg(hfov)),
        "speed_m_per_frame": speed,
        "road_half_width": half_width,
        "sidewalk_width": sidewalk_w,
        "camera_height": cam_h,
        "side_camera_yaw_deg": float(np.rad2deg(side_yaw)),
        "yaw_range_deg": float(np.rad2deg(yaws.max() - yaws.min())),
        "district": ["urban", "mixed", "suburban"][district],
        "num_buildings": n_buildings,
        "num_cars": n_cars,
        "num_trees": n_trees,
    }
    return SyntheticScene(
        seed=int(seed), index=int(index), width=int(width), height=int(height), K=K, c2w=c2w,
        camera_names=list(CAMERA_NAMES[:num_cameras]), primitives=b.prims, sky=sky, sun=sun, road=road, params=params,
    )
