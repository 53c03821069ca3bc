"""Batches from the synthetic streets are geometrically consistent in the project's OpenCV convention.

A pixel's depth unprojected from one view of a batch lands, in another view (another camera of the same frame,
or another frame), on a pixel of the same colour wherever it is visible there.
"""

import pytest
import torch

from evolsplat_ns.cameras import project_points, unproject_depth
from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig
from evolsplat_ns.data.synthetic import generate_scenes


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo")
    generate_scenes(root, 2, 11, 48, 144, num_frames=30, num_cameras=3, quiet=True)
    cfg = EvolSplatDataManagerConfig(keyframes_per_segment=8)
    cfg.data = root
    return cfg.setup(device="cpu")


def _reprojection_agreement(src, i, j):
    """Fraction of pixels of view i, visible in view j, whose colour matches there (and the count)."""
    d = src.depth[i]
    pts = unproject_depth(d, src.extrinsics[i], src.intrinsics[i])[d > 0]
    cols = src.image[i][d > 0]
    uv, z = project_points(pts, src.extrinsics[j : j + 1], src.intrinsics[j : j + 1])
    uv, z = uv[0], z[0]
    H, W = d.shape
    inside = (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
    u, v = uv[inside, 0].long(), uv[inside, 1].long()
    visible = (src.depth[j][v, u] - z[inside]).abs() < 0.05 * z[inside]  # not occluded in view j
    diff = (src.image[j][v, u][visible] - cols[inside][visible]).abs().max(-1).values
    return float((diff < 0.1).float().mean()), int(visible.sum())


def test_cameras_of_one_frame_agree(dm):
    _, b = dm.next_train(0)
    src = b.source
    # views 0, 1, 2 are front, front-left, front-right of the first source frame (frame-major, then camera)
    assert src.frame_indices[:3].unique().numel() == 1 and src.cam_indices[:3].tolist() == [0, 1, 2]
    for j in (1, 2):
        frac, n = _reprojection_agreement(src, 0, j)
        assert n > 100 and frac > 0.7, (j, frac, n)


def test_frames_agree_across_time(dm):
    _, b = dm.next_train(3)
    frac, n = _reprojection_agreement(b.source, 3, 0)  # front camera, second source frame -> first source frame
    assert n > 100 and frac > 0.7, (frac, n)


def test_the_batch_pose_is_metric_and_relative_to_the_first_front_camera(dm):
    scene = dm.scenes[0]
    torch.testing.assert_close(torch.as_tensor(scene.image(0, 0).c2w), torch.eye(4, dtype=torch.float64))
    centres = torch.as_tensor(scene.front_centers())
    step = (centres[1:] - centres[:-1]).norm(dim=-1)
    assert 0.7 < float(step.mean()) < 1.4  # the synthetic ego drives ~1 m per frame: no rescaling
    assert float(centres[-1, 2]) > 15  # driving forward = +z of the first camera
