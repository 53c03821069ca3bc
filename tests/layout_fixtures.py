"""Fixture scenes in the real layouts (reference KITTI-360 / Waymo, DriveStudio, raw PandaSet, raw KITTI).

One analytic world, shared by all writers (the data world, z up): a street corridor with a checkered ground
(z = 0), two facades (y = +-7 m, up to 5 m), end walls (x = -15 m and x = 45 m), sky elsewhere, and a dozen
**markers**: small floating points of pure colours. The ego vehicle drives along +x on a gentle curve.

Each writer encodes the ground truth in its dataset's own conventions with code of its own (deliberately not
using :mod:`evolsplat_ns.cameras`): Waymo camera axes, PandaSet quaternions, KITTI's calibration chain and
Mercator OXTS, OpenGL matrices relative to the middle frame. Images are ray cast (each pixel through its centre)
so their colours are a function of the world point; markers are painted as 5x5 blocks around the pixel that
contains their projection. Every LiDAR sweep holds the markers first (rows ``0..len(MARKERS)-1``), then samples
of the surfaces, in the sensor frame the dataset uses.

Images are small (the loaders read sizes from the headers / calibration); everything else is as the real data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

SKY_RGB = (135, 206, 235)
Y_WALL, Z_TOP, X_BACK, X_FAR = 7.0, 5.0, -15.0, 45.0
CAM_HEIGHT = 1.6

MARKERS = np.array([
    [6.0, 3.0, 1.2], [9.0, -3.0, 1.8], [14.0, 2.5, 1.0], [18.0, -2.5, 2.2], [24.0, 3.5, 1.5], [30.0, -3.0, 1.1],
    [3.0, 5.0, 2.5], [3.0, -5.0, 2.0], [-6.0, 2.0, 1.5], [-8.0, -2.0, 1.7], [12.0, 5.5, 3.0], [20.0, -5.5, 0.8],
])
MARKER_RGB = np.array([
    [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
    [255, 128, 0], [128, 0, 255], [0, 128, 0], [128, 0, 0], [0, 0, 128], [255, 255, 255],
], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# world
# ----------------------------------------------------------------------------------------------------------------


def surface_colour(p: np.ndarray, surf: np.ndarray) -> np.ndarray:
    """[N, 3] uint8 colour of surface points (2 m checker, a different palette per surface)."""
    palettes = np.array([
        [[70, 70, 70], [110, 110, 110]],  # ground
        [[150, 90, 50], [110, 70, 40]],  # left facade (y = +7)
        [[50, 90, 150], [40, 70, 110]],  # right facade (y = -7)
        [[60, 140, 60], [40, 100, 40]],  # back wall
        [[170, 160, 60], [130, 120, 40]],  # far wall
    ], dtype=np.uint8)
    cell = (np.floor(p[:, 0] / 2.0) + np.floor(p[:, 1] / 2.0) + np.floor(p[:, 2] / 2.0)).astype(np.int64) % 2
    return palettes[surf, cell]


def raycast(origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest hit along rays ``[N, 3]`` -> (t [N] (inf = sky), surface id [N])."""
    n = len(dirs)
    best = np.full(n, np.inf)
    surf = np.full(n, -1)
    planes = [(2, 0.0, 0), (1, Y_WALL, 1), (1, -Y_WALL, 2), (0, X_BACK, 3), (0, X_FAR, 4)]
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, val, sid in planes:
            t = (val - origins[:, axis]) / dirs[:, axis]
            p = origins + t[:, None] * dirs
            ok = (t > 1e-6) & np.isfinite(t)
            ok &= (p[:, 0] >= X_BACK - 1e-6) & (p[:, 0] <= X_FAR + 1e-6)
            ok &= (np.abs(p[:, 1]) <= Y_WALL + 1e-6) & (p[:, 2] >= -1e-6) & (p[:, 2] <= Z_TOP)
            better = ok & (t < best)
            best[better] = t[better]
            surf[better] = sid
    return best, surf


def surface_samples(spacing: float = 0.35, seed: int = 0) -> np.ndarray:
    """[N, 3] LiDAR samples of the surfaces (jittered grid)."""
    rng = np.random.default_rng(seed)
    xs = np.arange(X_BACK + 0.1, X_FAR, spacing)
    ys = np.arange(-Y_WALL + 0.1, Y_WALL, spacing)
    zs = np.arange(0.1, Z_TOP, spacing)
    out = [np.stack(np.meshgrid(xs, ys, [0.0], indexing="ij"), -1).reshape(-1, 3)]
    for y in (Y_WALL, -Y_WALL):
        out.append(np.stack(np.meshgrid(xs, [y], zs, indexing="ij"), -1).reshape(-1, 3))
    for x in (X_BACK, X_FAR):
        out.append(np.stack(np.meshgrid([x], ys, zs, indexing="ij"), -1).reshape(-1, 3))
    pts = np.concatenate(out)
    jitter = rng.uniform(-0.3, 0.3, pts.shape) * spacing
    for axis, val in ((2, 0.0), (1, Y_WALL), (1, -Y_WALL), (0, X_BACK), (0, X_FAR)):
        on = np.isclose(pts[:, axis], val)
        jitter[on, axis] = 0.0  # stay on the surface
    return pts + jitter


def lidar_world(seed: int = 0) -> np.ndarray:
    """[K + N, 3] one sweep in the world: the markers first, then surface samples."""
    return np.concatenate([MARKERS, surface_samples(seed=seed)])


def render(c2w: np.ndarray, K: np.ndarray, W: int, H: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8, z-depth [H, W] float32 (0 = sky), sky [H, W] bool) of an OpenCV camera."""
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    rays_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    dirs = rays_cam @ c2w[:3, :3].T
    origin = np.broadcast_to(c2w[:3, 3], dirs.shape)
    t, surf = raycast(origin, dirs)
    sky = ~np.isfinite(t)
    img = np.tile(np.array(SKY_RGB, np.uint8), (H * W, 1))
    hit = ~sky
    img[hit] = surface_colour(origin[hit] + t[hit, None] * dirs[hit], surf[hit])
    depth = np.where(sky, 0.0, t).astype(np.float32)  # rays have z = 1 in the camera: t is the z-depth
    img = img.reshape(H, W, 3)
    depth = depth.reshape(H, W)
    # markers: 5x5 blocks around the pixel containing the projection, when in front of the surfaces
    w2c = np.linalg.inv(c2w)
    pc = MARKERS @ w2c[:3, :3].T + w2c[:3, 3]
    for k in np.argsort(-pc[:, 2], kind="stable"):  # far to near: a nearer marker's block covers a farther one's
        p, rgb = pc[k], MARKER_RGB[k]
        if p[2] <= 0.1:
            continue
        col, row = int(np.floor(K[0, 0] * p[0] / p[2] + K[0, 2])), int(np.floor(K[1, 1] * p[1] / p[2] + K[1, 2]))
        if 0 <= col < W and 0 <= row < H and (depth[row, col] == 0 or p[2] < depth[row, col]):
            img[max(0, row - 2): row + 3, max(0, col - 2): col + 3] = rgb
    return img, depth, sky.reshape(H, W)


def marker_pixel(c2w: np.ndarray, K: np.ndarray, W: int, H: int, i: int) -> Optional[Tuple[int, int]]:
    """(row, col) where marker ``i`` was painted in an image, or None."""
    w2c = np.linalg.inv(c2w)
    p = w2c[:3, :3] @ MARKERS[i] + w2c[:3, 3]
    if p[2] <= 0.1:
        return None
    col, row = int(np.floor(K[0, 0] * p[0] / p[2] + K[0, 2])), int(np.floor(K[1, 1] * p[1] / p[2] + K[1, 2]))
    return (row, col) if 0 <= col < W and 0 <= row < H else None


# ----------------------------------------------------------------------------------------------------------------
# ego trajectory and camera rig (ground truth, data world)
# ----------------------------------------------------------------------------------------------------------------


def ego_pose(t: int, step: float = 1.2) -> np.ndarray:
    """Ego -> world (x forward, y left, z up) at timestep ``t``: along +x on a gentle left curve."""
    x = step * t
    y = 0.02 * x * x
    yaw = np.arctan(0.04 * x)
    c, s = np.cos(yaw), np.sin(yaw)
    T = np.eye(4)
    T[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    T[:3, 3] = [x, y, 0.0]
    return T


RIG_YAW = {"front": 0.0, "front_left": 45.0, "front_right": -45.0, "left": 90.0, "right": -90.0, "back": 180.0}


def camera_in_ego(yaw_deg: float) -> np.ndarray:
    """OpenCV camera -> ego for a camera 1.6 m up, looking horizontally ``yaw`` degrees left of forward."""
    from scene_fixtures import camera_pose

    a = np.deg2rad(yaw_deg)
    T = camera_pose(0.0, yaw_deg, CAM_HEIGHT)
    T[:3, 3] = [1.0 + 0.5 * np.cos(a), 0.5 * np.sin(a), CAM_HEIGHT]
    return T


def K_for(W: int, H: int, hfov_deg: float = 90.0) -> np.ndarray:
    f = (W / 2.0) / np.tan(np.deg2rad(hfov_deg) / 2.0)
    return np.array([[f, 0, W / 2.0 + 0.3], [0, f, H / 2.0 - 0.2], [0, 0, 1.0]])


@dataclass
class Truth:
    """Ground truth of a written scene: OpenCV c2w per (timestep index, camera id) in the data world."""

    c2w: Dict[Tuple[int, int], np.ndarray]
    K: Dict[int, np.ndarray]
    size: Tuple[int, int]
    num_frames: int
    cameras: List[int]

    def front_centers(self, front: int) -> np.ndarray:
        return np.stack([self.c2w[(t, front)][:3, 3] for t in range(self.num_frames)])


def _save_jpg(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img).save(path, quality=95, subsampling=0)


# ----------------------------------------------------------------------------------------------------------------
# DriveStudio processed scene
# ----------------------------------------------------------------------------------------------------------------

#: OpenCV camera axes expressed in Waymo camera axes (x forward, y left, z up): columns = images of the Waymo axes
#: in OpenCV coordinates, written out from the axis description (the fixture's own statement of the convention).
_WAYMO_AXES_IN_CV = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def write_drivestudio(scene_dir: Path, num_frames: int = 12, cams=(0, 1, 2), size=(64, 40), style: str = "waymo",
                      depth: bool = False, sky: bool = True) -> Truth:
    """A DriveStudio scene; ``style``: ``waymo`` (static camera->ego + ego_pose, 14-column sweeps in the ego frame),
    ``nuscenes`` (per-frame camera->world, 4-column sweeps in the LiDAR frame + lidar_pose) or ``pandaset``
    (per-frame camera->world, ego_pose = the LiDAR pose, 5-column sweeps x y z intensity laser-id in that frame)."""
    W, H = size
    names = ["front", "front_left", "front_right", "left", "right"]
    for sub in ("images", "intrinsics", "extrinsics", "lidar", "sky_masks") + (("depth",) if depth else ()) \
            + (("lidar_pose",) if style == "nuscenes" else ("ego_pose",)):
        (scene_dir / sub).mkdir(parents=True, exist_ok=True)
    K = K_for(W, H)
    truth = Truth({}, {}, (W, H), num_frames, list(cams))
    lidar_in_ego = np.eye(4)
    lidar_in_ego[:3, 3] = [1.2, 0.0, 2.0]
    world = lidar_world()
    for c in cams:
        np.savetxt(scene_dir / "intrinsics" / f"{c}.txt", [K[0, 0], K[1, 1], K[0, 2], K[1, 2], 0.01, -0.002, 0, 0, 0])
        truth.K[c] = K
        cam_cv = camera_in_ego(RIG_YAW[names[c]])
        if style == "waymo":
            R = np.eye(4)
            R[:3, :3] = _WAYMO_AXES_IN_CV
            np.savetxt(scene_dir / "extrinsics" / f"{c}.txt", cam_cv @ R)  # Waymo camera -> ego
    for t in range(num_frames):
        E = ego_pose(t)
        if style == "waymo":
            np.savetxt(scene_dir / "ego_pose" / f"{t:03d}.txt", E)
        for c in cams:
            c2w = E @ camera_in_ego(RIG_YAW[names[c]])
            truth.c2w[(t, c)] = c2w
            img, dep, skym = render(c2w, K, W, H)
            _save_jpg(scene_dir / "images" / f"{t:03d}_{c}.jpg", img)
            if style != "waymo":
                np.savetxt(scene_dir / "extrinsics" / f"{t:03d}_{c}.txt", c2w)  # camera -> world, OpenCV
            if sky:
                Image.fromarray((skym * 255).astype(np.uint8)).save(scene_dir / "sky_masks" / f"{t:03d}_{c}.png")
            if depth:
                np.save(scene_dir / "depth" / f"{t:03d}_{c}.npy", dep)
        if style == "waymo":
            pts_ego = (world - E[:3, 3]) @ E[:3, :3]  # world -> ego
            rows = np.zeros((len(world), 14), np.float32)
            rows[:, 0:3] = lidar_in_ego[:3, 3]
            rows[:, 3:6] = pts_ego
            rows[:, 11] = 0.3  # intensity
            rows[:, 13] = 0  # laser id (TOP)
        elif style == "nuscenes":
            L = E @ lidar_in_ego
            np.savetxt(scene_dir / "lidar_pose" / f"{t:03d}.txt", L)
            pts = (world - L[:3, 3]) @ L[:3, :3]  # world -> LiDAR
            rows = np.concatenate([pts, np.full((len(pts), 1), 0.5)], 1).astype(np.float32)
        else:  # pandaset: the "ego" pose written is the LiDAR pose, points in that frame
            L = E @ lidar_in_ego
            np.savetxt(scene_dir / "ego_pose" / f"{t:03d}.txt", L)
            pts = (world - L[:3, 3]) @ L[:3, :3]
            rows = np.concatenate([pts, np.full((len(pts), 1), 12.0), (np.arange(len(pts)) % 5 == 0)[:, None]], 1)
        rows.astype(np.float32).tofile(scene_dir / "lidar" / f"{t:03d}.bin")
    return truth


# ----------------------------------------------------------------------------------------------------------------
# raw PandaSet
# ----------------------------------------------------------------------------------------------------------------

PANDASET_CAMERAS = ["front", "front_left", "front_right", "left", "right", "back"]


def write_pandaset(seq_dir: Path, num_frames: int = 12, size=(96, 54), cams=PANDASET_CAMERAS,
                   missing_sweeps=(), stand_still: int = 0) -> Truth:
    """A raw PandaSet sequence: per camera folder jpgs + intrinsics/poses/timestamps JSON; LiDAR sweeps as gzipped
    pickled pandas DataFrames (x, y, z world, i, t, d); ``missing_sweeps`` are not written. The car waits for the
    first ``stand_still`` frames (as in PandaSet 002, at a light; the clock runs on), then drives off."""
    import pandas as pd
    from scipy.spatial.transform import Rotation

    W, H = size
    K = K_for(W, H)
    ids = [PANDASET_CAMERAS.index(n) for n in cams]
    truth = Truth({}, {}, (W, H), num_frames, ids)
    t0 = 1557539924.0  # PandaSet timestamps are UNIX seconds
    for name in cams:
        c = PANDASET_CAMERAS.index(name)
        d = seq_dir / "camera" / f"{name}_camera"
        d.mkdir(parents=True, exist_ok=True)
        (d / "intrinsics.json").write_text(json.dumps({"fx": K[0, 0], "fy": K[1, 1], "cx": K[0, 2], "cy": K[1, 2]}))
        poses, times = [], []
        for t in range(num_frames):
            c2w = ego_pose(max(0, t - stand_still)) @ camera_in_ego(RIG_YAW[name])
            truth.c2w[(t, c)] = c2w
            truth.K[c] = K
            qx, qy, qz, qw = Rotation.from_matrix(c2w[:3, :3]).as_quat()  # scipy: scalar last
            poses.append({"position": {"x": c2w[0, 3], "y": c2w[1, 3], "z": c2w[2, 3]},
                          "heading": {"w": qw, "x": qx, "y": qy, "z": qz}})
            times.append(t0 + 0.1 * t + 0.004 * c)  # cameras fire as the spinning LiDAR sweeps past them
            img, _, _ = render(c2w, K, W, H)
            _save_jpg(d / f"{t:02d}.jpg", img)
        (d / "poses.json").write_text(json.dumps(poses))
        (d / "timestamps.json").write_text(json.dumps(times))
    ld = seq_dir / "lidar"
    ld.mkdir(parents=True, exist_ok=True)
    world = lidar_world()
    lposes, ltimes = [], []
    for t in range(num_frames):
        E = ego_pose(max(0, t - stand_still))
        qx, qy, qz, qw = Rotation.from_matrix(E[:3, :3]).as_quat()
        lposes.append({"position": {"x": E[0, 3], "y": E[1, 3], "z": E[2, 3] + 1.8},
                       "heading": {"w": qw, "x": qx, "y": qy, "z": qz}})
        ltimes.append(t0 + 0.1 * t)
        if t in missing_sweeps:
            continue
        n = len(world)
        d_col = np.zeros(n, np.int64)
        d_col[len(MARKERS) + 1::7] = 1  # some rows from the forward-facing sensor
        df = pd.DataFrame({"x": world[:, 0], "y": world[:, 1], "z": world[:, 2], "i": np.full(n, 20.0),
                           "t": t0 + 0.1 * t + np.linspace(-0.05, 0.05, n), "d": d_col})
        df.to_pickle(ld / f"{t:02d}.pkl.gz")  # compression inferred from the name: gzip
    (ld / "poses.json").write_text(json.dumps(lposes))
    (ld / "timestamps.json").write_text(json.dumps(ltimes))
    return truth


# ----------------------------------------------------------------------------------------------------------------
# raw KITTI
# ----------------------------------------------------------------------------------------------------------------

# 2011_09_26 calibration values (rotations as published, to 7 digits); images scaled down by 1/8.
KITTI_VELO_TO_CAM_R = [7.533745e-03, -9.999714e-01, -6.166020e-04, 1.480249e-02, 7.280733e-04, -9.998902e-01,
                       9.998621e-01, 7.523790e-03, 1.480755e-02]
KITTI_VELO_TO_CAM_T = [-4.069766e-03, -7.631618e-02, -2.717806e-01]
KITTI_IMU_TO_VELO_R = [9.999976e-01, 7.553071e-04, -2.035826e-03, -7.854027e-04, 9.998898e-01, -1.482298e-02,
                       2.024406e-03, 1.482454e-02, 9.998881e-01]
KITTI_IMU_TO_VELO_T = [-8.086759e-01, 3.195559e-01, -7.997231e-01]
KITTI_R_RECT_00 = [9.999239e-01, 9.837760e-03, -7.445048e-03, -9.869795e-03, 9.999421e-01, -4.278459e-03,
                   7.402527e-03, 4.351614e-03, 9.999631e-01]
KITTI_P_RECT = {
    0: [7.215377e+02, 0, 6.095593e+02, 0, 0, 7.215377e+02, 1.728540e+02, 0, 0, 0, 1, 0],
    1: [7.215377e+02, 0, 6.095593e+02, -3.875744e+02, 0, 7.215377e+02, 1.728540e+02, 0, 0, 0, 1, 0],
    2: [7.215377e+02, 0, 6.095593e+02, 4.485728e+01, 0, 7.215377e+02, 1.728540e+02, 2.163791e-01, 0, 0, 1,
        2.745884e-03],
    3: [7.215377e+02, 0, 6.095593e+02, -3.395242e+02, 0, 7.215377e+02, 1.728540e+02, 2.199936e+00, 0, 0, 1,
        2.729905e-03],
}
KITTI_SCALE = 0.125
KITTI_LAT0, KITTI_LON0, KITTI_ALT0, KITTI_YAW0 = 49.015003, 8.434285, 116.4, 0.6
ER = 6378137.0


def _fmt(vals) -> str:
    return " ".join(f"{float(v):.6e}" for v in vals)


def _P_scaled(i: int) -> np.ndarray:
    P = np.array(KITTI_P_RECT[i], float).reshape(3, 4)
    P[:2] *= KITTI_SCALE  # an image 1/8 the size: the first two rows of P scale
    return P


def _rt(R, T) -> np.ndarray:
    M = np.eye(4)
    M[:3, :3] = np.array(R, float).reshape(3, 3)
    M[:3, 3] = T
    return M


def write_kitti_calib(date_dir: Path, size=(155, 47)) -> None:
    date_dir.mkdir(parents=True, exist_ok=True)
    lines = ["calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02"]
    for i in range(4):
        P = _P_scaled(i)
        lines += [f"S_{i:02d}: {_fmt([1392 * KITTI_SCALE, 512 * KITTI_SCALE])}",
                  f"K_{i:02d}: {_fmt(P[:, :3].reshape(-1))}", f"D_{i:02d}: {_fmt([-0.37, 0.2, 0.0, 0.0, -0.07])}",
                  f"R_{i:02d}: {_fmt(np.eye(3).reshape(-1))}", f"T_{i:02d}: {_fmt([-0.54 * (i % 2), 0.0, 0.0])}",
                  f"S_rect_{i:02d}: {_fmt(size)}", f"R_rect_{i:02d}: {_fmt(KITTI_R_RECT_00 if i == 0 else np.eye(3).reshape(-1))}",
                  f"P_rect_{i:02d}: {_fmt(P.reshape(-1))}"]
    (date_dir / "calib_cam_to_cam.txt").write_text("\n".join(lines) + "\n")
    (date_dir / "calib_velo_to_cam.txt").write_text(
        f"calib_time: 15-Mar-2012 11:37:16\nR: {_fmt(KITTI_VELO_TO_CAM_R)}\nT: {_fmt(KITTI_VELO_TO_CAM_T)}\n"
        f"delta_f: 0.000000e+00 0.000000e+00\ndelta_c: 0.000000e+00 0.000000e+00\n")
    (date_dir / "calib_imu_to_velo.txt").write_text(
        f"calib_time: 25-May-2012 16:47:16\nR: {_fmt(KITTI_IMU_TO_VELO_R)}\nT: {_fmt(KITTI_IMU_TO_VELO_T)}\n")


def kitti_camera_truth(T_w_imu: np.ndarray, cam: int) -> np.ndarray:
    """OpenCV c2w of rectified camera ``cam`` given IMU -> world (the devkit's chain, written out with inverses)."""
    T_velo_imu = _rt(KITTI_IMU_TO_VELO_R, KITTI_IMU_TO_VELO_T)
    T_cam0_velo = _rt(KITTI_VELO_TO_CAM_R, KITTI_VELO_TO_CAM_T)
    R_rect = np.eye(4)
    R_rect[:3, :3] = np.array(KITTI_R_RECT_00).reshape(3, 3)
    P = _P_scaled(cam)
    T_i = np.eye(4)
    T_i[:3, 3] = np.linalg.inv(P[:, :3]) @ P[:, 3]
    T_cam_velo = T_i @ R_rect @ T_cam0_velo
    return T_w_imu @ np.linalg.inv(T_velo_imu) @ np.linalg.inv(T_cam_velo)


def _mercator_inverse(tx: float, ty: float, scale: float) -> Tuple[float, float]:
    lon = np.rad2deg(tx / (scale * ER))
    lat = np.rad2deg(2.0 * np.arctan(np.exp(ty / (scale * ER))) - np.pi / 2.0)
    return lat, lon


def write_kitti_drive(date_dir: Path, drive: str = "0001", num_frames: int = 12, size=(155, 47),
                      timestamps: bool = True) -> Truth:
    """A synced+rectified raw KITTI drive under ``date_dir`` (write the calibration with ``write_kitti_calib``).

    Ground truth: the IMU poses relative to the first frame are ``ego_pose(t)`` (the IMU plays the ego frame);
    the absolute OXTS packets are that trajectory placed at (KITTI_LAT0, KITTI_LON0) with heading KITTI_YAW0.
    """
    W, H = size
    d = date_dir / f"{date_dir.name}_drive_{drive}_sync"
    for sub in ("image_02/data", "image_03/data", "velodyne_points/data", "oxts/data"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    scale = np.cos(np.deg2rad(KITTI_LAT0))
    tx0 = scale * np.deg2rad(KITTI_LON0) * ER
    ty0 = scale * ER * np.log(np.tan(np.deg2rad(90 + KITTI_LAT0) / 2))
    c0, s0 = np.cos(KITTI_YAW0), np.sin(KITTI_YAW0)
    A0 = np.eye(4)
    A0[:3, :3] = [[c0, -s0, 0], [s0, c0, 0], [0, 0, 1]]
    A0[:3, 3] = [tx0, ty0, KITTI_ALT0]
    truth = Truth({}, {}, (W, H), num_frames, [2, 3])
    T_velo_imu = _rt(KITTI_IMU_TO_VELO_R, KITTI_IMU_TO_VELO_T)
    world = lidar_world()
    stamps = []
    for t in range(num_frames):
        rel = ego_pose(t)  # IMU -> first-IMU frame (the data world)
        absT = A0 @ rel
        lat, lon = _mercator_inverse(absT[0, 3], absT[1, 3], scale)
        yaw = np.arctan2(absT[1, 0], absT[0, 0])
        pitch = -np.arcsin(np.clip(absT[2, 0], -1, 1))
        roll = np.arctan2(absT[2, 1], absT[2, 2])
        rest = [0.5, 12.0, 12.0, 0.1, 0.0, 0.1, 0.0, 9.8, 0.1, 0.0, 9.8, 0.0, 0.0, 0.01, 0.0, 0.0, 0.01, 0.3, 0.05]
        vals = [lat, lon, absT[2, 3], roll, pitch, yaw] + rest
        (d / "oxts" / "data" / f"{t:010d}.txt").write_text(
            " ".join(repr(float(v)) for v in vals) + " 4 10 4 4 4\n")  # navstat numsats posmode velmode orimode
        for cam in (2, 3):
            c2w = kitti_camera_truth(rel, cam)
            truth.c2w[(t, cam)] = c2w
            K = _P_scaled(cam)[:, :3]
            truth.K[cam] = K
            img, _, _ = render(c2w, K, W, H)
            Image.fromarray(img).save(d / f"image_{cam:02d}" / "data" / f"{t:010d}.png")
        velo_to_world = rel @ np.linalg.inv(T_velo_imu)
        Tinv = np.linalg.inv(velo_to_world)
        pts = world @ Tinv[:3, :3].T + Tinv[:3, 3]
        np.concatenate([pts, np.full((len(pts), 1), 0.25)], 1).astype(np.float32).tofile(
            d / "velodyne_points" / "data" / f"{t:010d}.bin")
        stamps.append(f"2011-09-26 13:02:{25 + 0.1 * t:012.9f}")
    if timestamps:
        for sub in ("image_02", "image_03", "velodyne_points", "oxts"):
            (d / sub / "timestamps.txt").write_text("\n".join(stamps) + "\n")
    return truth


# ----------------------------------------------------------------------------------------------------------------
# the reference's preprocessed KITTI-360 / Waymo scene
# ----------------------------------------------------------------------------------------------------------------


def write_reference(scene_dir: Path, first_frame: int = 94, num_frames: int = 12, two_cameras: bool = True,
                    size=(96, 32)) -> Truth:
    """A reference scene: KITTI-360 style (``{frame}_{cam:02d}.png``, two cameras 0.5 m apart; frame numbers cross
    a digit boundary so that name order differs from time order) or Waymo style (``{frame:06d}.png``). Poses are
    OpenGL, relative to the middle image of the time-ordered list; ``inv_pose`` its inverse original pose; depth in
    ``depth/<stem>.npy``; seed PLY ``Drop50/<first>.ply`` (markers + surface samples, normalised frame); sky from
    ``semantic/instance/<stem>.png`` label maps (Cityscapes train id 10 = sky), as the reference's preprocessing."""
    from evolsplat_ns.pointcloud.plyio import write_ply

    W, H = size
    K = K_for(W, H, hfov_deg=80.0)
    scene_dir.mkdir(parents=True, exist_ok=True)
    (scene_dir / "depth").mkdir(exist_ok=True)
    cams = [0, 1] if two_cameras else [0]
    truth = Truth({}, {}, (W, H), num_frames, cams)
    # time-ordered list, camera 00 then 01 per frame (as the reference's reader appends them)
    entries = []
    for t in range(num_frames):
        for c in cams:
            c2w = ego_pose(t) @ camera_in_ego(0.0)
            if c == 1:
                shift = np.eye(4)
                shift[0, 3] = 0.5  # the right camera: 0.5 m along the camera's x
                c2w = c2w @ shift
            truth.c2w[(t, c)] = c2w
            truth.K[c] = K
            name = f"{first_frame + t}_{c:02d}" if two_cameras else f"{first_frame + t:06d}"
            entries.append((name, c2w))
    mid = len(entries) // 2
    inv_pose = np.linalg.inv(entries[mid][1])
    flip = np.diag([1.0, -1.0, -1.0])
    frames = []
    (scene_dir / "semantic" / "instance").mkdir(parents=True, exist_ok=True)
    for name, c2w in entries:
        img, dep, sky = render(c2w, K, W, H)
        Image.fromarray(img).save(scene_dir / f"{name}.png")
        labels = np.where(sky, 10, np.where(dep > 0, 2, 0)).astype(np.uint8)  # Cityscapes train ids: 10 = sky
        Image.fromarray(labels).save(scene_dir / "semantic" / "instance" / f"{name}.png")
        np.save(scene_dir / "depth" / f"{name}.npy", dep)
        rel = inv_pose @ c2w
        rel[:3, :3] = rel[:3, :3] @ flip  # OpenCV -> OpenGL camera axes
        if two_cameras:
            frames.append({"file_path": f"{name}.png", "transform_matrix": rel.tolist()})
        else:  # the reference's Waymo reader writes "./" paths and a per-frame 4x4 intrinsics matrix
            K4 = np.eye(4)
            K4[:3, :3] = K
            frames.append({"file_path": f"./{name}.png", "transform_matrix": rel.tolist(), "intrinsics": K4.tolist()})
    world = lidar_world()
    cols = np.concatenate([MARKER_RGB, surface_colour(world[len(MARKERS):], _surface_ids(world[len(MARKERS):]))])
    (scene_dir / "Drop50").mkdir(exist_ok=True)
    norm = world @ inv_pose[:3, :3].T + inv_pose[:3, 3]
    write_ply(scene_dir / "Drop50" / f"{first_frame}.ply", norm, cols / 255.0)
    meta = {"fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2], "w": W, "h": H,
            "inv_pose": inv_pose.tolist(), "scale": 1,
            "ply_file_path_Drop25": f"Drop25/{first_frame}.ply", "ply_file_path_Drop50": f"Drop50/{first_frame}.ply",
            "ply_file_path_full": f"full/{first_frame}.ply", "ply_file_path_Drop80": f"Drop80/{first_frame}.ply",
            "frames": frames}
    (scene_dir / "transforms.json").write_text(json.dumps(meta, indent=4))
    return truth


def _surface_ids(p: np.ndarray) -> np.ndarray:
    sid = np.zeros(len(p), np.int64)
    sid[np.isclose(p[:, 1], Y_WALL)] = 1
    sid[np.isclose(p[:, 1], -Y_WALL)] = 2
    sid[np.isclose(p[:, 0], X_BACK)] = 3
    sid[np.isclose(p[:, 0], X_FAR)] = 4
    return sid


# ----------------------------------------------------------------------------------------------------------------
# checking one-line user errors on loaded data (tests/test_bad_files.py, tests/test_bad_inputs_round3.py)
# ----------------------------------------------------------------------------------------------------------------


def load(root: Path, **opts):
    """Every scene of the data root ``root`` as the dataparser loads them (``LayoutOptions(**opts)``)."""
    from evolsplat_ns.data.layouts import LayoutOptions, load_layout_scenes

    return load_layout_scenes(root, LayoutOptions(**opts))


def error_of(fn, *args, **kw) -> str:
    """The one-line message of the DataValidationError ``fn(*args, **kw)`` raises."""
    import pytest

    from evolsplat_ns.errors import DataValidationError

    with pytest.raises(DataValidationError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def assert_names(msg: str, path: Path, *words: str) -> None:
    """``msg`` names ``path`` (as given or normalised) and contains every one of ``words``."""
    import os

    assert str(Path(os.path.normpath(path))) in msg or str(path) in msg, (path, msg)
    for w in words:
        assert w in msg, (w, msg)
