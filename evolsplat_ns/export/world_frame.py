"""Gaussians from the project frame back to the data's own world frame (what exports write).

Inside the project every scene lives in its project frame: ``x_project = align @ x_world`` (``SceneRecord.align``,
a rigid transform). An exported cloud must overlay on the user's data, so each exported Gaussian is moved by
``align^-1``: its mean, its orientation (quaternion), and its view-dependent colour — SH coefficients are defined
over directions of the frame they live in, so a rotated frame needs rotated coefficients (each SH band is mapped
into itself; the map is found exactly by least squares over enough sample directions). Scales and opacities do not
change under a rigid motion. float64 throughout.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch import Tensor


def sh_rotation(R: np.ndarray, degree: int) -> np.ndarray:
    """``[K, K]`` (``K = (degree+1)^2``) map of SH coefficients under the rotation ``R`` ``[3, 3]``: with ``c' = M c``,
    the colour of ``c'`` in direction ``R d`` equals the colour of ``c`` in direction ``d``."""
    from evolsplat_ns.model.rasterize_torch import sh_basis

    k = (degree + 1) ** 2
    rng = np.random.default_rng(0)
    d = rng.normal(size=(max(64, 4 * k), 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    new_dirs = torch.as_tensor(d @ np.asarray(R, dtype=np.float64).T)
    b_new = sh_basis(degree, new_dirs).double().numpy()  # basis at R d
    b_old = sh_basis(degree, torch.as_tensor(d)).double().numpy()  # basis at d
    M, *_ = np.linalg.lstsq(b_new, b_old, rcond=None)  # b_new @ M = b_old
    return M


def rotate_quaternions(q: Tensor, R: np.ndarray) -> Tensor:
    """Quaternions (w x y z, ``[N, 4]``) of ``R @ rot(q)``."""
    from scipy.spatial.transform import Rotation

    qn = q.detach().cpu().double().numpy()
    rot = Rotation.from_matrix(np.asarray(R, dtype=np.float64)) * Rotation.from_quat(qn[:, [1, 2, 3, 0]])
    xyzw = rot.as_quat()
    return torch.as_tensor(xyzw[:, [3, 0, 1, 2]], dtype=q.dtype, device=q.device)


def to_data_world(gaussians: Dict[str, Tensor], align: np.ndarray) -> Dict[str, Tensor]:
    """The Gaussians of :meth:`EvolSplatModel.export_gaussians` (``means`` [N, 3], ``quats`` [N, 4], ``sh`` [N, K, 3],
    ``log_scales``, ``opacity_logit``), project frame -> data world frame (``align``: [4, 4] world -> project).
    ``means`` come back as float64: world coordinates may be far from the origin."""
    inv = np.linalg.inv(np.asarray(align, dtype=np.float64))
    R, t = inv[:3, :3], inv[:3, 3]
    means = gaussians["means"]
    out = dict(gaussians)
    m = means.detach().double().cpu().numpy() @ R.T + t
    out["means"] = torch.as_tensor(m, dtype=torch.float64, device=means.device)  # world frame: float64 (UTM)
    out["quats"] = rotate_quaternions(gaussians["quats"], R)
    sh = gaussians["sh"]
    k = sh.shape[1]
    degree = int(round(np.sqrt(k))) - 1
    if degree > 0:
        M = torch.as_tensor(sh_rotation(R, degree), dtype=torch.float64, device=sh.device)
        out["sh"] = torch.einsum("kj,njc->nkc", M, sh.double()).to(sh.dtype)
    return out
