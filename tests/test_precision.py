"""Precision far from the origin (issue 18): a scene in UTM-like coordinates (5e6 m) gives the same clouds and the
same exported Gaussians (shifted by exactly the offset) as the same scene near the origin."""

import numpy as np
import pytest
import torch

from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.data.scene_index import Segment
from evolsplat_ns.export.ply import read_gaussian_ply, write_gaussian_ply
from evolsplat_ns.export.world_frame import to_data_world
from evolsplat_ns.pointcloud.generators import make_generator
from evolsplat_ns.pointcloud.options import PointCloudOptions
from evolsplat_ns.pointcloud.plyio import write_ply
from scene_fixtures import write_scene

OFFSET = np.array([5.0e6, 4.2e6, 130.0])
BOX = ((-1e3, -1e3, -1e3), (1e3, 1e3, 1e3))


def _scene(root, offset):
    rng = np.random.default_rng(0)
    seed_pts = rng.uniform(-10, 10, (500, 3)) + np.array([0.0, 0.0, 8.0])

    def mutate(meta):
        for fr in meta["frames"]:
            m = np.asarray(fr["transform_matrix"], dtype=np.float64)
            m[:3, 3] += offset
            fr["transform_matrix"] = m.tolist()
        meta["ply_file_path"] = "seed.ply"

    d = write_scene(root, num_frames=8, num_cams=2, size=(16, 24), mutate=mutate)
    write_ply(d / "seed.ply", seed_pts + offset, rng.uniform(0, 1, (500, 3)))
    return parse_scene(d, 0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("utm")
    return _scene(root / "near", np.zeros(3)), _scene(root / "far", OFFSET)


def test_project_frame_and_clouds_do_not_depend_on_where_the_scene_is(pair):
    near, far = pair
    for a, b in zip(near.images, far.images):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-6)  # the project frame: identical geometry
    seg = Segment(0, 0, tuple(range(near.num_frames)), tuple(range(near.num_frames)), BOX)
    for gen in ("depth", "seed-ply"):
        opts = PointCloudOptions(generator=gen, outlier_removal=False, filter_sky=False)
        pa, ca = make_generator(opts).generate_pointcloud(near, seg)
        pb, cb = make_generator(opts).generate_pointcloud(far, seg)
        assert len(pa) == len(pb) > 0, gen
        np.testing.assert_allclose(pb, pa, atol=1e-4, err_msg=gen)  # not the 0.5 m of float32 at 5e6
        np.testing.assert_array_equal(cb, ca)


def test_exported_gaussians_are_shifted_by_exactly_the_offset(pair, tmp_path):
    near, far = pair
    n = 200
    g = torch.Generator().manual_seed(0)
    gauss = {"means": torch.randn(n, 3, generator=g) * 20, "sh": torch.randn(n, 4, 3, generator=g),
             "opacity_logit": torch.randn(n, generator=g), "log_scales": torch.randn(n, 3, generator=g) - 3,
             "quats": torch.randn(n, 4, generator=g)}
    out = {}
    for name, scene in (("near", near), ("far", far)):
        w = to_data_world(gauss, scene.align)
        p = write_gaussian_ply(tmp_path / f"{name}.ply", w["means"], w["sh"], w["opacity_logit"], w["log_scales"],
                               w["quats"])
        out[name] = read_gaussian_ply(p)
    np.testing.assert_allclose(out["far"]["means"].double().numpy() - OFFSET, out["near"]["means"].double().numpy(),
                               atol=1e-6)
    for k in ("sh", "opacity_logit", "log_scales", "quats"):
        torch.testing.assert_close(out["far"][k], out["near"][k], atol=1e-5, rtol=1e-5)
