"""The EVolSplat model (nerfstudio ``Model``).

The configuration carries the reference method's constants (SPEC). The network itself arrives with the model
issue; until then setting the model up raises a clear error instead of training something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Tuple, Type

from nerfstudio.models.base_model import Model, ModelConfig


@dataclass
class EvolSplatModelConfig(ModelConfig):
    """EVolSplat: sparse volume encoder + image-window features + Gaussian heads + background."""

    _target: Type = field(default_factory=lambda: EvolSplatModel)
    voxel_size: float = 0.1
    """Voxel size of the sparse feature volume (metres)."""
    local_radius: int = 1
    """Window radius R of the image-window features ((2R+1)^2 samples per source view)."""
    sh_degree: int = 1
    """Spherical-harmonics degree of the decoded colour."""
    offset_max: float = 0.1
    """Bound of the predicted per-point offset (metres)."""
    sparse_backend: Literal["torch", "torchsparse"] = "torch"
    """Sparse convolution backend: the project's own PyTorch one, or torchsparse when importable."""
    volume_sampling: Literal["sparse", "dense"] = "sparse"
    """Sample the feature volume straight from the sparse voxels, or densify it like the reference."""
    freeze_volume: bool = False
    """Compute the feature volume of a segment once and keep it frozen."""
    bg_num_points: int = 700 * 700
    """Points of the background hemisphere."""
    bg_radius: float = 100.0
    bg_center: Tuple[float, float, float] = (0.0, 3.8, 5.6)
    ssim_lambda: float = 0.2
    entropy_weight: float = 0.1
    entropy_every: int = 10


class EvolSplatModel(Model):
    config: EvolSplatModelConfig

    def populate_modules(self) -> None:
        raise NotImplementedError(
            "The EVolSplat network is not implemented yet in this version of evolsplat-ns (model issue #4). "
            "The data side works: try `evolsplat-ns-inspect --data DIR`."
        )
