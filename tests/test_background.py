"""The background hemisphere (:mod:`evolsplat_ns.model.background`)."""

import math

import pytest
import torch

from evolsplat_ns.model.background import HemisphereBackground
from evolsplat_ns.model.render import render_gaussians

H, W = 24, 40


def _setup(seed=0):
    torch.manual_seed(seed)
    bg = HemisphereBackground(num_views=2, num_points=4000, radius=20.0, center=(0.0, 3.8, 5.6))
    torch.nn.init.normal_(bg.colour[-2].weight, std=0.5)  # colours and scales that vary over the dome
    K = torch.tensor([[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]])
    src_c2w = torch.eye(4).repeat(2, 1, 1)
    src_c2w[1, 0, 3] = 1.0
    images = torch.rand(2, H, W, 3)
    target = torch.eye(4)
    target[:3, 3] = torch.tensor([0.5, 0.0, 2.0])
    yaw = math.radians(25)  # turned to the side: part of the dome is outside the image, part unseen by the sources
    target[0, 0], target[0, 2], target[2, 0], target[2, 2] = math.cos(yaw), math.sin(yaw), -math.sin(yaw), math.cos(yaw)
    return bg, K, src_c2w, images, target


def _render(out, c2w, K):
    means, rgb, scales, opa = out
    quats = torch.zeros(means.shape[0], 4)
    quats[:, 0] = 1
    return render_gaussians(means, quats, scales, opa, rgb, c2w, K, W, H, backend="torch")


@pytest.mark.parametrize("cull", [False, True])
def test_fixed_shape_dome_renders_the_compact_image(cull):
    """compact=False (no host sync, fixed shapes: the compiled render path) keeps every point, with opacity 0
    where the compact path drops it; the images are equal."""
    bg, K, src_c2w, images, target = _setup()
    extra = (K, H, W) if cull else (None, None, None)
    with torch.no_grad():
        compact = bg(src_c2w[0], target, images, src_c2w, K.expand(2, 3, 3), *extra)
        fixed = bg(src_c2w[0], target, images, src_c2w, K.expand(2, 3, 3), *extra, compact=False)
    assert fixed[0].shape[0] == bg.points.shape[0] > compact[0].shape[0] > 0
    assert set(fixed[3].unique().tolist()) == {0.0, 1.0} and bool((compact[3] == 1).all())
    a, b = _render(compact, target, K), _render(fixed, target, K)
    assert a["alpha"].mean() > 0.3  # the dome fills much of the image
    torch.testing.assert_close(b["rgb"], a["rgb"], atol=1e-6, rtol=0)
    torch.testing.assert_close(b["alpha"], a["alpha"], atol=1e-6, rtol=0)


def test_dome_follows_the_target_along_the_reference_axis_and_stays_in_range():
    bg, K, src_c2w, images, target = _setup()
    with torch.no_grad():
        means, rgb, scales, _ = bg(src_c2w[0], torch.eye(4), images, src_c2w, K.expand(2, 3, 3), compact=False)
        ahead = torch.eye(4)
        ahead[2, 3] = 3.0
        means2, *_ = bg(src_c2w[0], ahead, images, src_c2w, K.expand(2, 3, 3), compact=False)
    torch.testing.assert_close(means2 - means, torch.tensor([0.0, 0.0, 3.0]).expand_as(means))
    spacing = math.exp(bg.base_log_scale)
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert scales.min() >= spacing / math.e - 1e-6 and scales.max() <= spacing * math.e + 1e-6
