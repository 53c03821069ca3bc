"""Gaussian heads of EVolSplat (constants from the reference, SPEC).

Per point, from the 16-d volume feature ``f3`` and the window feature ``fw`` (V x (2R+1)^2 x 4):

=============  ===================================================  =========================================
head           input -> hidden -> output                            use
=============  ===================================================  =========================================
colour         [fw, dist, dir] -> 128 -> 128 -> 3 (sh_degree+1)^2   SH coefficients (view-dependent colour)
geometry       [f3, dist, dir] -> 64 (Tanh) -> 7                    3 log-scale residuals + 4 quaternion
opacity        [f3, dist, dir] -> 64 -> 1                           logit of the opacity
offset         f3 -> 64 -> 3, Tanh x offset_max                     displacement of the point (metres)
=============  ===================================================  =========================================

``dist`` and ``dir`` are the distance and unit direction from the *target* camera centre to the point, so the
colour, geometry and opacity heads run once per target view; the offset head (and everything feeding it) is
view-independent and runs once per batch.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def mlp(dims, hidden_act=nn.ReLU, out_act=None) -> nn.Sequential:
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(hidden_act())
    if out_act is not None:
        layers.append(out_act())
    return nn.Sequential(*layers)


def view_inputs(means: Tensor, cam_center: Tensor) -> Tuple[Tensor, Tensor]:
    """Distance ``[N, 1]`` and unit direction ``[N, 3]`` from the camera centre to each point (no gradient)."""
    with torch.no_grad():
        d = means - cam_center.reshape(1, 3)
        dist = d.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return dist, d / dist


class GaussianHeads(nn.Module):
    """The four EVolSplat heads; see the module docstring."""

    def __init__(self, volume_dim: int, window_dim: int, sh_degree: int = 1, offset_max: float = 0.1) -> None:
        super().__init__()
        self.sh_degree = sh_degree
        self.num_sh = (sh_degree + 1) ** 2
        self.offset_max = offset_max
        self.colour = mlp([window_dim + 4, 128, 128, 3 * self.num_sh])
        self.geometry = mlp([volume_dim + 4, 64, 7], hidden_act=nn.Tanh)
        self.opacity = mlp([volume_dim + 4, 64, 1])
        self.offset = mlp([volume_dim, 64, 3], out_act=nn.Tanh)

    def predict_offset(self, f3: Tensor) -> Tensor:
        """``[N, 16] -> [N, 3]`` metres, bounded by ``offset_max``."""
        return self.offset_max * self.offset(f3)

    def predict_view(self, f3: Tensor, fw: Tensor, dist: Tensor, direction: Tensor):
        """Per-view Gaussian attributes.

        Returns:
            sh ``[N, (sh_degree+1)^2, 3]``, log-scale residual ``[N, 3]``, quaternion ``[N, 4]`` (unnormalised),
            opacity logit ``[N]``.
        """
        vd = torch.cat([dist, direction], dim=-1)
        dlog, quats, opa = self.predict_geometry(f3, vd)
        return self.predict_colour(fw, vd), dlog, quats, opa

    def predict_geometry(self, f3: Tensor, vd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Log-scale residual ``[N, 3]``, quaternion ``[N, 4]``, opacity logit ``[N]`` from ``f3`` and
        ``vd = [dist, direction]`` ``[N, 4]`` (the cheap heads: they decide which points a view can see)."""
        x = torch.cat([f3, vd], dim=-1)
        geo = self.geometry(x)
        return geo[:, :3], geo[:, 3:], self.opacity(x).squeeze(-1)

    def predict_colour(self, fw: Tensor, vd: Tensor) -> Tensor:
        """SH coefficients ``[N, (sh_degree+1)^2, 3]`` from the window features and ``vd`` (the costly head)."""
        return self.colour(torch.cat([fw, vd], dim=-1)).reshape(-1, self.num_sh, 3)
