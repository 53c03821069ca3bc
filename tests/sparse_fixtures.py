"""Voxel clouds at a driving segment's size for the sparse-convolution GPU tests."""

import torch


def street_voxels(g: torch.Generator, device) -> torch.Tensor:
    """``[N, 4]`` int64 rows ``(0, x, y, z)``, N ~ 1.4e5 unique voxels: 150 k Gaussian draws stretched along the
    street (60 voxels x, 8 y, 60 z), the shape of a segment's cloud. Draws from ``g``, so a caller's later draws
    from it are reproducible."""
    xyz = torch.unique((torch.randn(150_000, 3, generator=g) * torch.tensor([60.0, 8.0, 60.0])).long() + 200, dim=0)
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).to(device)
