"""Gaussian heads of EVolSplat (constants from the reference, SPEC).

Per point, from the 16-d volume feature ``f3`` and the window feature ``fw`` (V x (2R+1)^2 x 4):

=============  ===================================================  =========================================
head           input -> hidden -> output                            use
=============  ===================================================  =========================================
colour         [fw, dist, dir] -> 128 -> 128 -> 3 (sh_degree+1)^2   SH coefficients (view-dependent colour), as a
                                                                    correction of a base colour when one is given
geometry       [f3, dist, dir] -> 64 (Tanh) -> 7                    3 log-scale residuals + 4 quaternion
opacity        [f3, dist, dir] -> 64 -> 1                           logit of the opacity
offset         f3 -> 64 -> 3, Tanh x offset_max                     displacement of the point (metres)
=============  ===================================================  =========================================

``dist`` and ``dir`` are the distance and unit direction from the *target* camera centre to the point, so the
colour, geometry and opacity heads run once per target view; the offset head (and everything feeding it) is
view-independent and runs once per batch.

Base colour (``colour_residual``, our deviation from the reference): the colour head's output is added to the SH
of a base colour taken from the source views (:func:`evolsplat_ns.model.window_features.source_colour`), and its
last layer starts at zero, so that the first render already shows the sources' colours and the head learns a
correction. On real images the reference's plain head could fall into predicting colour from distance (the
visibility channel) and never find the pass-through; the opacity head then faded every Gaussian (grey renders).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evolsplat_ns.pointcloud.init import rgb_to_sh


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

    def __init__(self, volume_dim: int, window_dim: int, sh_degree: int = 1, offset_max: float = 0.1,
                 colour_residual: bool = False) -> None:
        super().__init__()
        self.sh_degree = sh_degree
        self.num_sh = (sh_degree + 1) ** 2
        self.offset_max = offset_max
        self.colour = mlp([window_dim + 4, 128, 128, 3 * self.num_sh])
        self.geometry = mlp([volume_dim + 4, 64, 7], hidden_act=nn.Tanh)
        self.opacity = mlp([volume_dim + 4, 64, 1])
        self.offset = mlp([volume_dim, 64, 3], out_act=nn.Tanh)
        if colour_residual:  # start from the base colour exactly; the correction is learned
            nn.init.zeros_(self.colour[-1].weight)
            nn.init.zeros_(self.colour[-1].bias)

    def predict_offset(self, f3: Tensor) -> Tensor:
        """``[N, 16] -> [N, 3]`` metres, bounded by ``offset_max``."""
        return self.offset_max * self.offset(f3)

    def predict_view(self, f3: Tensor, fw: Tensor, dist: Tensor, direction: Tensor,
                     base_rgb: Optional[Tensor] = None):
        """Per-view Gaussian attributes (``base_rgb``: see :meth:`predict_colour`).

        Returns:
            sh ``[N, (sh_degree+1)^2, 3]``, log-scale residual ``[N, 3]``, quaternion ``[N, 4]`` (unnormalised),
            opacity logit ``[N]``.
        """
        vd = torch.cat([dist, direction], dim=-1)
        dlog, quats, opa = self.predict_geometry(f3, vd)
        return self.predict_colour(fw, vd, base_rgb), dlog, quats, opa

    def decode(self, f3: Tensor, fw: Tensor, vd: Tensor, base_rgb: Optional[Tensor], base_log_scale: Tensor
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every point's Gaussian for one view, activations included, in one function without host syncs (what
        ``compile_decode`` compiles; this eager version is its reference twin).

        Returns:
            scales ``[N, 3]`` (linear), quaternions ``[N, 4]`` (unnormalised), opacities ``[N]`` (post-sigmoid),
            SH ``[N, (sh_degree+1)^2, 3]``.
        """
        dlog, quats, opa = self.predict_geometry(f3, vd)
        return torch.exp(dlog + base_log_scale), quats, torch.sigmoid(opa), self.predict_colour(fw, vd, base_rgb)

    def predict_geometry(self, f3: Tensor, vd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Log-scale residual ``[N, 3]``, quaternion ``[N, 4]``, opacity logit ``[N]`` from ``f3`` and
        ``vd = [dist, direction]`` ``[N, 4]`` (the cheap heads: they decide which points a view can see)."""
        x = torch.cat([f3, vd], dim=-1)
        geo = self.geometry(x)
        return geo[:, :3], geo[:, 3:], self.opacity(x).squeeze(-1)

    def predict_colour(self, fw: Tensor, vd: Tensor, base_rgb: Optional[Tensor] = None) -> Tensor:
        """SH coefficients ``[N, (sh_degree+1)^2, 3]`` from the window features and ``vd`` (the costly head); with
        ``base_rgb`` ``[N, 3]`` (in [0, 1]) the head's output corrects that colour (added to its degree-0 term)."""
        # colour[0] applied to [fw, vd] without building that [N, D + 4] copy (the largest tensor of a view): its
        # weight split by columns, the vd part and the bias first, then fw @ W_fw^T added in one addmm
        first, D = self.colour[0], fw.shape[-1]
        h = torch.addmm(F.linear(vd, first.weight[:, D:], first.bias), fw, first.weight[:, :D].t())
        sh = self.colour[1:](h).reshape(-1, self.num_sh, 3)
        if base_rgb is None:
            return sh
        dc = rgb_to_sh(base_rgb.to(sh.dtype))
        return torch.cat([sh[:, :1] + dc[:, None], sh[:, 1:]], dim=1)
