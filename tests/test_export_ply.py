"""3DGS PLY export: standard fields, values round-trip, atomic write."""

import numpy as np
import pytest
import torch
from plyfile import PlyData

from evolsplat_ns.export.ply import gaussian_ply_fields, write_gaussian_ply


def test_standard_fields_and_values(tmp_path):
    torch.manual_seed(0)
    N, K = 50, 4
    means, sh = torch.randn(N, 3), torch.randn(N, K, 3)
    opa, logs, q = torch.randn(N), torch.randn(N, 3), torch.randn(N, 4)
    p = write_gaussian_ply(tmp_path / "seg.ply", means, sh, opa, logs, q)
    v = PlyData.read(str(p))["vertex"]
    names = [pr.name for pr in v.properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names == gaussian_ply_fields(K - 1) and len([n for n in names if n.startswith("f_rest_")]) == 9
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), means.numpy(), rtol=1e-6)
    # f_rest is channel-major: the red coefficients first
    np.testing.assert_allclose(v["f_rest_0"], sh[:, 1, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(v["f_rest_1"], sh[:, 2, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(v["f_rest_3"], sh[:, 1, 1].numpy(), rtol=1e-6)
    rot = np.stack([v[f"rot_{i}"] for i in range(4)], 1)
    np.testing.assert_allclose(np.linalg.norm(rot, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(v["opacity"], opa.numpy(), rtol=1e-6)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import plyfile

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plyfile.PlyData, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        write_gaussian_ply(tmp_path / "x.ply", torch.zeros(3, 3), torch.zeros(3, 1, 3), torch.zeros(3),
                           torch.zeros(3, 3), torch.ones(3, 4))
    assert list(tmp_path.iterdir()) == []


def test_export_to_the_data_world_frame_moves_means_orientation_and_colour():
    """A Gaussian moved by the inverse of ``align`` renders the same from the moved camera: its mean, covariance
    and view-dependent colour (SH of every band) all follow the frame."""
    from scipy.spatial.transform import Rotation

    from evolsplat_ns.export.world_frame import to_data_world
    from evolsplat_ns.model.rasterize_torch import eval_sh

    torch.manual_seed(0)
    n, degree = 5, 2
    align = np.eye(4)
    align[:3, :3] = Rotation.from_euler("zyx", [30, -50, 20], degrees=True).as_matrix()
    align[:3, 3] = [4.0, -2.0, 7.0]
    g = {"means": torch.randn(n, 3, dtype=torch.float64),
         "quats": torch.nn.functional.normalize(torch.randn(n, 4, dtype=torch.float64), dim=-1),
         "sh": torch.randn(n, (degree + 1) ** 2, 3, dtype=torch.float64),
         "log_scales": torch.randn(n, 3, dtype=torch.float64), "opacity_logit": torch.randn(n, dtype=torch.float64)}
    w = to_data_world(g, align)
    inv = np.linalg.inv(align)
    R = torch.as_tensor(inv[:3, :3])
    torch.testing.assert_close(w["means"], g["means"] @ R.T + torch.as_tensor(inv[:3, 3]))

    def rotmat(q):
        return torch.as_tensor(Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix())

    torch.testing.assert_close(rotmat(w["quats"]), R @ rotmat(g["quats"]))  # orientation (so the covariance) follows
    d = torch.nn.functional.normalize(torch.randn(n, 3, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(eval_sh(degree, d @ R.T, w["sh"]), eval_sh(degree, d, g["sh"]))
    assert torch.equal(w["log_scales"], g["log_scales"]) and torch.equal(w["opacity_logit"], g["opacity_logit"])
