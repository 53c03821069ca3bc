"""Standard 3D Gaussian Splatting PLY files (the layout common 3DGS viewers load).

Per vertex: ``x y z``, ``nx ny nz`` (zeros), ``f_dc_0..2``, ``f_rest_0..(3(K-1)-1)`` channel-major (all red
coefficients, then green, then blue), ``opacity`` (logit), ``scale_0..2`` (log), ``rot_0..3`` (unit quaternion,
w x y z). Written atomically: a temporary file in the same folder, then renamed.

Every property is float32, as 3DGS tools expect, except ``x y z`` when a coordinate exceeds
:data:`DOUBLE_POSITIONS_ABOVE` metres (world frames in UTM, ~5e6 m, where float32 would round positions to 0.5 m):
then they are float64 (PLY ``double``), so that a scene far from the origin exports the same geometry as near it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch
from torch import Tensor

from evolsplat_ns.atomic import write_atomic


DOUBLE_POSITIONS_ABOVE = 1.0e5
"""Metres: beyond this, float32 spacing exceeds 7 mm, and positions are written as float64."""


def gaussian_ply_fields(num_rest: int):
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * num_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def write_gaussian_ply(path: Union[str, Path], means: Tensor, sh: Tensor, opacity_logit: Tensor, log_scales: Tensor,
                       quats: Tensor) -> Path:
    """Write Gaussians as a 3DGS PLY.

    Args:
        means ``[N, 3]``; sh ``[N, K, 3]`` SH coefficients (K = (degree+1)^2, the DC term first);
        opacity_logit ``[N]``; log_scales ``[N, 3]``; quats ``[N, 4]`` (w x y z, normalised here).
    """
    from plyfile import PlyData, PlyElement

    path = Path(path)
    N, K, _ = sh.shape
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rest = sh[:, 1:, :].transpose(1, 2).reshape(N, 3 * (K - 1))  # channel-major
    cols = [torch.zeros_like(means), sh[:, 0, :], rest, opacity_logit.reshape(N, 1), log_scales, q]
    data = torch.cat([c.detach().float().cpu() for c in cols], dim=1).numpy()
    xyz = means.detach().double().cpu().numpy()
    pos_type = "f8" if N and float(np.abs(xyz).max()) > DOUBLE_POSITIONS_ABOVE else "f4"
    names = gaussian_ply_fields(K - 1)
    arr = np.empty(N, dtype=[(n, pos_type if n in ("x", "y", "z") else "f4") for n in names])
    for i, n in enumerate(("x", "y", "z")):
        arr[n] = xyz[:, i]
    for i, n in enumerate(names[3:]):
        arr[n] = data[:, i]
    write_atomic(path, lambda f: PlyData([PlyElement.describe(arr, "vertex")], text=False).write(f))
    return path


def read_gaussian_ply(path: Union[str, Path]) -> Dict[str, Tensor]:
    """Read a 3DGS PLY (the layout above; any SH degree) back: ``means`` ``[N, 3]``, ``sh`` ``[N, K, 3]``,
    ``opacity_logit`` ``[N]``, ``log_scales`` ``[N, 3]``, ``quats`` ``[N, 4]`` (float32). A file that is not such
    a PLY, is truncated, or holds non-finite values raises :class:`DataValidationError` naming it."""
    from plyfile import PlyData

    from evolsplat_ns.errors import DataValidationError

    path = Path(path)
    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"].data
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, said in one line
        raise DataValidationError(path, None, "a readable 3DGS PLY (binary or ascii, with a 'vertex' element)",
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
    names = set(v.dtype.names or ())
    base = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [n for n in base if n not in names]
    if missing:
        raise DataValidationError(path, "vertex", f"the 3DGS fields {base}", f"missing {missing}")
    n_rest = sum(1 for n in names if n.startswith("f_rest_"))
    k = n_rest // 3 + 1
    if n_rest % 3 or int(round((k) ** 0.5)) ** 2 != k:
        raise DataValidationError(path, "f_rest_*", "3 ((degree+1)^2 - 1) coefficients", n_rest)

    def cols(fields):
        return torch.from_numpy(np.stack([np.asarray(v[f], dtype=np.float32) for f in fields], axis=1))

    n = len(v)
    rest = cols([f"f_rest_{i}" for i in range(n_rest)]) if n_rest else torch.zeros(n, 0)
    sh = torch.cat([cols(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None], rest.reshape(n, 3, k - 1).transpose(1, 2)], 1)
    xyz = torch.from_numpy(np.stack([np.asarray(v[f], dtype=np.float64) for f in ("x", "y", "z")], axis=1))
    out = {"means": xyz if xyz.abs().max() > DOUBLE_POSITIONS_ABOVE else xyz.float(), "sh": sh, "opacity_logit": cols(["opacity"])[:, 0],
           "log_scales": cols(["scale_0", "scale_1", "scale_2"]), "quats": cols(["rot_0", "rot_1", "rot_2", "rot_3"])}
    for name, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise DataValidationError(path, name, "finite values", f"{int((~torch.isfinite(t)).sum())} non-finite")
    return out
