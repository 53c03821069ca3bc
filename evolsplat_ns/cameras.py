"""Camera conventions: the one place where conventions are converted.

Inside the project every pose is an **OpenCV camera-to-world** matrix ``c2w`` of shape ``[..., 4, 4]``
(camera axes: x right, y down, z forward) and every intrinsic matrix is a pinhole ``K`` of shape
``[..., 3, 3]`` (or the design document's ``[..., 4, 4]`` "eye with K in the top-left" form).
Pixel centres are at half-integers: the pixel in row ``v`` and column ``u`` covers
``[u, u+1) x [v, v+1)`` and its centre is ``(u + 0.5, v + 0.5)``.

OpenGL / nerfstudio / Blender camera-to-world matrices (x right, y up, z backward) appear only at the
boundaries: when reading ``transforms.json`` files and when building nerfstudio ``Cameras``. The
conversion between the two is a right-multiplication by ``diag(1, -1, -1, 1)`` and is its own inverse.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Flips the y and z camera axes; converts OpenGL camera axes to OpenCV ones and back.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def _flip(c2w: ArrayLike) -> ArrayLike:
    if isinstance(c2w, torch.Tensor):  # negate the y and z columns: exact, and no host matrix to copy over
        return torch.cat([c2w[..., :1], -c2w[..., 1:3], c2w[..., 3:]], dim=-1)
    return np.asarray(c2w) @ _FLIP_YZ.astype(np.asarray(c2w).dtype)


def opengl_to_opencv(c2w_gl: ArrayLike) -> ArrayLike:
    """OpenGL camera-to-world ``[..., 4, 4]`` -> OpenCV camera-to-world ``[..., 4, 4]``."""
    return _flip(c2w_gl)


def opencv_to_opengl(c2w_cv: ArrayLike) -> ArrayLike:
    """OpenCV camera-to-world ``[..., 4, 4]`` -> OpenGL camera-to-world ``[..., 4, 4]``."""
    return _flip(c2w_cv)


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pinhole ``K`` ``[3, 3]`` float64."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def k_to_4x4(K: ArrayLike) -> ArrayLike:
    """``[..., 3, 3]`` -> ``[..., 4, 4]`` (identity with ``K`` in the top-left; the batch format)."""
    if isinstance(K, torch.Tensor):
        out = torch.eye(4, dtype=K.dtype, device=K.device).expand(*K.shape[:-2], 4, 4).clone()
    else:
        out = np.broadcast_to(np.eye(4, dtype=np.asarray(K).dtype), (*K.shape[:-2], 4, 4)).copy()
    out[..., :3, :3] = K
    return out


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics of an image resized by ``(sx, sy)`` (pixel-centre convention preserved)."""
    K = np.array(K, dtype=np.float64, copy=True)
    K[0, :] *= sx
    K[1, :] *= sy
    return K


def rigid_inverse(T: ArrayLike) -> ArrayLike:
    """Inverse of rigid transforms ``[..., 4, 4]`` (rotation transposed), numpy or torch."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:4]
    if isinstance(T, torch.Tensor):
        Rt = R.transpose(-1, -2)
        out = torch.zeros_like(T)
    else:
        Rt = np.swapaxes(R, -1, -2)
        out = np.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3:4] = -(Rt @ t)
    out[..., 3, 3] = 1.0
    return out


def world_to_camera(c2w: ArrayLike) -> ArrayLike:
    """OpenCV camera-to-world -> world-to-camera ("viewmat" in gsplat's terms)."""
    return rigid_inverse(c2w)


def project_points(points: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor):
    """Project world points into OpenCV cameras.

    Args:
        points: ``[N, 3]`` world points.
        c2w: ``[V, 4, 4]`` OpenCV camera-to-world.
        K: ``[V, 3, 3]`` (or ``[V, 4, 4]``, top-left used).

    Returns:
        uv: ``[V, N, 2]`` pixel coordinates (continuous; centre of the top-left pixel is (0.5, 0.5)).
        z: ``[V, N]`` depth along the camera z axis (negative behind the camera).
    """
    K = K[..., :3, :3]
    w2c = rigid_inverse(c2w)
    cam = torch.einsum("vij,nj->vni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    zs = torch.where(z.abs() < 1e-8, torch.full_like(z, 1e-8), z)
    x = cam[..., 0] / zs
    y = cam[..., 1] / zs
    u = K[:, None, 0, 0] * x + K[:, None, 0, 1] * y + K[:, None, 0, 2]
    v = K[:, None, 1, 1] * y + K[:, None, 1, 2]
    return torch.stack([u, v], dim=-1), z


def unproject_depth(depth: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Unproject a z-depth map ``[H, W]`` of one OpenCV camera to world points ``[H, W, 3]``.

    Pixel ``(v, u)`` is unprojected through its centre ``(u + 0.5, v + 0.5)``.
    """
    H, W = depth.shape
    K = K[:3, :3].to(depth.dtype)
    v, u = torch.meshgrid(
        torch.arange(H, dtype=depth.dtype, device=depth.device) + 0.5,
        torch.arange(W, dtype=depth.dtype, device=depth.device) + 0.5,
        indexing="ij",
    )
    y = (v - K[1, 2]) / K[1, 1]
    x = (u - K[0, 2] - K[0, 1] * y) / K[0, 0]
    cam = torch.stack([x * depth, y * depth, depth], dim=-1)
    c2w = c2w.to(depth.dtype)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def to_nerfstudio_cameras(c2w: torch.Tensor, K: torch.Tensor, height, width):
    """OpenCV ``c2w`` ``[V, 4, 4]`` and ``K`` ``[V, 3|4, 3|4]`` -> nerfstudio ``Cameras`` (OpenGL, 3x4).

    ``height`` / ``width``: ints, or ``[V, 1]`` integer tensors for views of different sizes.
    The only place where nerfstudio's convention is produced.
    """
    from nerfstudio.cameras.cameras import Cameras, CameraType

    K = K[..., :3, :3]
    c2w_gl = opencv_to_opengl(c2w.float())[..., :3, :4]
    V = c2w.shape[0]
    return Cameras(
        camera_to_worlds=c2w_gl,
        fx=K[:, 0, 0:1].float(),
        fy=K[:, 1, 1:2].float(),
        cx=K[:, 0, 2:3].float(),
        cy=K[:, 1, 2:3].float(),
        width=width.reshape(V, 1).long() if isinstance(width, torch.Tensor) else torch.full((V, 1), int(width)),
        height=height.reshape(V, 1).long() if isinstance(height, torch.Tensor) else torch.full((V, 1), int(height)),
        camera_type=CameraType.PERSPECTIVE,
    )


def from_nerfstudio_cameras(cameras, camera_to_worlds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nerfstudio ``Cameras`` (OpenGL 3x4) -> (OpenCV ``c2w`` ``[V, 4, 4]``, ``K`` ``[V, 3, 3]``).
    ``camera_to_worlds``: OpenGL ``[V, 3, 4]`` poses to use instead of the cameras' own (a pose-optimised copy),
    without building another ``Cameras``."""
    c2w34 = (cameras.camera_to_worlds if camera_to_worlds is None else camera_to_worlds).reshape(-1, 3, 4)
    V = c2w34.shape[0]
    c2w = torch.eye(4, dtype=c2w34.dtype, device=c2w34.device).repeat(V, 1, 1)
    c2w[:, :3, :4] = c2w34
    c2w = opengl_to_opencv(c2w)
    K = torch.zeros(V, 3, 3, dtype=c2w34.dtype, device=c2w34.device)
    K[:, 0, 0] = cameras.fx.reshape(-1)
    K[:, 1, 1] = cameras.fy.reshape(-1)
    K[:, 0, 2] = cameras.cx.reshape(-1)
    K[:, 1, 2] = cameras.cy.reshape(-1)
    K[:, 2, 2] = 1.0
    return c2w, K


# ----------------------------------------------------------------------------------------------------------------
# Conventions of the real-data layouts (evolsplat_ns.data.layouts). Each returns OpenCV camera-to-world matrices
# in the data's own world frame; the layouts then re-express them relative to the first front-camera image.
# ----------------------------------------------------------------------------------------------------------------

#: Columns are the OpenCV camera axes (x right, y down, z forward) written in Waymo camera axes (x forward,
#: y left, z up): ``c2w_opencv = c2w_waymo_camera @ WAYMO_CAMERA_TO_OPENCV`` (DriveStudio's Waymo extrinsics).
WAYMO_CAMERA_TO_OPENCV = np.array(
    [[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def waymo_camera_to_opencv(c2w_waymo: np.ndarray) -> np.ndarray:
    """Camera-to-X ``[..., 4, 4]`` with Waymo camera axes (x forward, y left, z up) -> OpenCV camera axes."""
    return np.asarray(c2w_waymo, dtype=np.float64) @ WAYMO_CAMERA_TO_OPENCV


def rigid_matrix(R: np.ndarray, t) -> np.ndarray:
    """``[4, 4]`` float64 from a rotation ``[3, 3]`` and a translation ``[3]``."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=np.float64)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def quaternion_wxyz_to_matrix(w: float, x: float, y: float, z: float) -> np.ndarray:
    """Unit quaternion (scalar first, Hamilton convention; normalised here) -> rotation ``[3, 3]``."""
    q = np.array([w, x, y, z], dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"quaternion {q.tolist()} has no direction")
    w, x, y, z = q / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion_wxyz(R: np.ndarray) -> np.ndarray:
    """Rotation ``[3, 3]`` -> unit quaternion ``[4]`` (w, x, y, z), w >= 0. Inverse of :func:`quaternion_wxyz_to_matrix`."""
    R = np.asarray(R, dtype=np.float64)
    # Shepperd's method: pick the largest of the four squared components for numerical stability.
    tr = np.trace(R)
    cands = np.array([tr, R[0, 0], R[1, 1], R[2, 2]])
    i = int(np.argmax(cands))
    if i == 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif i == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif i == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def pandaset_pose_to_c2w(pose: dict) -> np.ndarray:
    """A PandaSet pose ``{"position": {x, y, z}, "heading": {w, x, y, z}}`` -> ``[4, 4]`` sensor-to-world.

    For cameras the sensor axes are already OpenCV's (PandaSet projects with ``inv(pose)`` and a plain pinhole).
    """
    p, h = pose["position"], pose["heading"]
    R = quaternion_wxyz_to_matrix(h["w"], h["x"], h["y"], h["z"])
    return rigid_matrix(R, [p["x"], p["y"], p["z"]])


#: WGS84 equatorial radius (metres) used by KITTI's Mercator projection of the OXTS positions.
EARTH_RADIUS_M = 6378137.0


def oxts_mercator_scale(lat0_deg: float) -> float:
    """Mercator scale of a KITTI drive: ``cos(latitude of its first OXTS packet)``."""
    return float(np.cos(np.deg2rad(lat0_deg)))


def oxts_to_pose(lat: float, lon: float, alt: float, roll: float, pitch: float, yaw: float, scale: float) -> np.ndarray:
    """KITTI OXTS packet -> IMU-to-world ``[4, 4]`` (world: Mercator east/north/up in metres; IMU axes: x forward,
    y left, z up). Angles in radians, ``R = Rz(yaw) Ry(pitch) Rx(roll)`` — the KITTI devkit's conversion."""
    tx = scale * np.deg2rad(lon) * EARTH_RADIUS_M
    ty = scale * EARTH_RADIUS_M * np.log(np.tan(np.deg2rad(90.0 + lat) / 2.0))
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    Rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    Ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    Rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rigid_matrix(Rz @ Ry @ Rx, [tx, ty, alt])


def kitti_rectified_camera(P_rect: np.ndarray) -> tuple:
    """KITTI ``P_rect_0i`` ``[3, 4]`` -> (``K`` ``[3, 3]``, ``[4, 4]`` rectified camera 0 -> rectified camera i).

    ``P_rect_0i = K [I | t]`` projects points of the rectified camera-0 frame; camera i is camera 0 shifted by
    ``t = K^-1 P[:, 3]`` (mostly along x: the stereo baseline).
    """
    P = np.asarray(P_rect, dtype=np.float64).reshape(3, 4)
    K = P[:, :3].copy()
    t = np.linalg.solve(K, P[:, 3])
    return K, rigid_matrix(np.eye(3), t)
