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
