"""The embedded synthetic driving-scene generator (evolsplat_ns.data.synthetic, evolsplat-ns-synth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evolsplat_ns.cameras import opencv_to_opengl, opengl_to_opencv, project_points, unproject_depth
from evolsplat_ns.data.synthetic import CAMERA_NAMES, generate_scenes, make_scene

SEED = 3
NUM_SCENES, FRAMES, CAMS, H, W = 2, 12, 3, 32, 96


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = generate_scenes(root, NUM_SCENES, SEED, H, W, num_frames=FRAMES, num_cameras=CAMS, quiet=True)
    scenes = [make_scene(SEED, i, H, W, FRAMES, CAMS) for i in range(NUM_SCENES)]
    return root, paths, scenes


def _meta(scene_dir: Path) -> dict:
    return json.loads((scene_dir / "transforms.json").read_text())


def _K(meta) -> torch.Tensor:
    return torch.tensor(
        [[meta["fl_x"], 0.0, meta["cx"]], [0.0, meta["fl_y"], meta["cy"]], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def _view(scene_dir: Path, meta: dict, t: int, c: int):
    fr = next(f for f in meta["frames"] if f["timestep"] == t and f["camera"] == c)
    rgb = np.asarray(Image.open(scene_dir / fr["file_path"]).convert("RGB")).astype(np.int64)
    depth = np.load(scene_dir / fr["depth_file_path"])
    sky = np.asarray(Image.open(scene_dir / fr["sky_mask_path"]))
    c2w = opengl_to_opencv(torch.tensor(fr["transform_matrix"], dtype=torch.float64))
    return rgb, depth, sky, c2w


# --------------------------------------------------------------------------------------------------------------


def test_layout_on_disk(data):
    root, paths, _ = data
    assert [p.name for p in paths] == [f"scene_{i:03d}" for i in range(NUM_SCENES)]
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in paths]  # no partial folders left behind
    for p in paths:
        for t in range(FRAMES):
            for c in range(CAMS):
                name = f"{t:03d}_{c}"
                assert (p / "images" / f"{name}.png").is_file()
                assert (p / "depth" / f"{name}.npy").is_file()
                assert (p / "sky_masks" / f"{name}.png").is_file()
        assert (p / "seed.ply").is_file()


def test_transforms_fields_and_rigid_poses(data):
    _, paths, scenes = data
    for p, sc in zip(paths, scenes):
        meta = _meta(p)
        for k in ("fl_x", "fl_y", "cx", "cy", "w", "h", "frames", "camera_names", "ply_file_path"):
            assert k in meta, k
        assert meta["w"] == W and meta["h"] == H
        assert meta["fl_x"] == meta["fl_y"]
        assert meta["cx"] == W / 2 and meta["cy"] == H / 2
        hfov = np.rad2deg(2 * np.arctan(W / 2 / meta["fl_x"]))
        assert 70 <= hfov <= 90
        assert meta["camera_names"] == list(CAMERA_NAMES[:CAMS]) == ["front", "front_left", "front_right"]
        assert meta["ply_file_path"] == "seed.ply"
        assert meta.get("sky_mask_convention", "255_is_sky") == "255_is_sky"
        frames = meta["frames"]
        assert len(frames) == FRAMES * CAMS
        assert {(f["timestep"], f["camera"]) for f in frames} == {(t, c) for t in range(FRAMES) for c in range(CAMS)}
        for f in frames:
            for k in ("file_path", "transform_matrix", "camera", "timestep", "depth_file_path", "sky_mask_path"):
                assert k in f, k
            T = np.asarray(f["transform_matrix"])
            assert T.shape == (4, 4)
            np.testing.assert_allclose(T[3], [0, 0, 0, 1])
            np.testing.assert_allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-9)
            assert np.linalg.det(T[:3, :3]) == pytest.approx(1.0)
            # exactly one convention change: the written matrix is the OpenGL form of the scene's OpenCV pose
            np.testing.assert_allclose(T, opencv_to_opengl(sc.c2w[f["timestep"], f["camera"]]), atol=1e-12)


def test_rig_and_trajectory(data):
    _, paths, scenes = data
    for p, sc in zip(paths, scenes):
        meta = _meta(p)
        poses = {(f["timestep"], f["camera"]): np.asarray(f["transform_matrix"]) for f in meta["frames"]}
        centres = np.stack([poses[(t, 0)][:3, 3] for t in range(FRAMES)])
        # OpenGL: forward is -z, up is +y. World is z up and the street runs along +x.
        fwd0 = -poses[(0, 0)][:3, 2]
        up0 = poses[(0, 0)][:3, 1]
        assert fwd0[0] > 0.9 and up0[2] > 0.99
        assert np.all(np.abs(centres[:, 2] - 1.6) < 0.15)  # camera height ~1.6 m
        step = np.linalg.norm(np.diff(centres[:, :2], axis=0), axis=1)
        assert np.all((step > 0.75) & (step < 1.35))  # ~1 m per frame
        for t in range(FRAMES):
            f = -poses[(t, 0)][:3, 2]
            for c, sign in ((1, 1.0), (2, -1.0)):
                g = -poses[(t, c)][:3, 2]
                yaw = np.rad2deg(np.arctan2(f[0] * g[1] - f[1] * g[0], f[0] * g[0] + f[1] * g[1]))
                assert 45 <= sign * yaw <= 55  # camera 1 turned left, camera 2 right


def test_determinism_same_seed_identical_bytes(data, tmp_path):
    root, paths, _ = data
    again = generate_scenes(tmp_path, 1, SEED, H, W, num_frames=FRAMES, num_cameras=CAMS, quiet=True)[0]
    for sub, pattern in (("images", "*.png"), ("depth", "*.npy"), ("sky_masks", "*.png"), (".", "seed.ply")):
        files = sorted((paths[0] / sub).glob(pattern))
        assert files
        for f in files:
            assert f.read_bytes() == (again / sub / f.name).read_bytes(), f
    assert (paths[0] / "transforms.json").read_bytes() == (again / "transforms.json").read_bytes()


def test_different_seeds_and_scenes_differ(data, tmp_path):
    _, paths, _ = data
    other = generate_scenes(tmp_path, 1, SEED + 1, H, W, num_frames=FRAMES, num_cameras=CAMS, quiet=True)[0]
    for t in (0, FRAMES - 1):
        a = np.asarray(Image.open(paths[0] / "images" / f"{t:03d}_0.png")).astype(int)
        b = np.asarray(Image.open(paths[1] / "images" / f"{t:03d}_0.png")).astype(int)
        c = np.asarray(Image.open(other / "images" / f"{t:03d}_0.png")).astype(int)
        assert np.abs(a - b).mean() > 10
        assert np.abs(a - c).mean() > 10
    m0, m1 = _meta(paths[0]), _meta(paths[1])
    assert m0["frames"][-1]["transform_matrix"] != m1["frames"][-1]["transform_matrix"]


def test_depth_is_z_depth_on_surfaces_and_sky_is_empty(data):
    _, paths, scenes = data
    for p, sc in zip(paths, scenes):
        meta = _meta(p)
        K = _K(meta)
        for t in (0, FRAMES // 2, FRAMES - 1):
            for c in range(CAMS):
                rgb, depth, sky, c2w = _view(p, meta, t, c)
                assert depth.dtype == np.float32 and depth.shape == (H, W)
                assert sky.dtype == np.uint8 and set(np.unique(sky)) <= {0, 255}
                assert np.all((sky == 255) == (depth == 0))
                assert np.all(depth >= 0) and (depth > 0).mean() > 0.5
                pts = unproject_depth(torch.from_numpy(depth).double(), c2w, K)[torch.from_numpy(depth > 0)]
                dist = sc.distance_to_surface(pts.numpy())
                assert dist.max() < 1e-3, (p.name, t, c, dist.max())
                # the image really is the scene's rendering of that camera
                r = sc.render(t, c)
                np.testing.assert_array_equal(r.rgb, rgb)
                np.testing.assert_array_equal(r.depth, depth)


def test_depth_is_along_optical_axis_not_ray_length(data):
    """Off-centre pixels: the ray length from the camera centre is longer than the stored depth, by 1/cos."""
    _, paths, sc_list = data
    sc = sc_list[0]
    r = sc.render(0, 0)
    v, u = np.nonzero(r.depth > 0)
    K = sc.K
    x = (u + 0.5 - K[0, 2]) / K[0, 0]
    y = (v + 0.5 - K[1, 2]) / K[1, 1]
    dirs = np.stack([x, y, np.ones_like(x)], -1) @ sc.c2w[0, 0, :3, :3].T
    t, ids, _ = sc.raycast(sc.c2w[0, 0, :3, 3], dirs / np.linalg.norm(dirs, axis=-1, keepdims=True))
    np.testing.assert_allclose(t, r.depth[v, u] * np.sqrt(1 + x**2 + y**2), rtol=1e-5)
    assert np.all(ids == r.prim_id[v, u])


def test_multi_view_consistency(data):
    """Depth unprojected from one camera and projected into another lands on a pixel of the same colour."""
    _, paths, _ = data
    for p in paths:
        meta = _meta(p)
        K = _K(meta)
        pairs = [((3, 0), (3, 1)), ((3, 0), (3, 2)), ((3, 0), (4, 0)), ((5, 1), (6, 1)), ((8, 2), (9, 2))]
        for a, b in pairs:
            ra, da, _, ca = _view(p, meta, *a)
            rb, db, _, cb = _view(p, meta, *b)
            m = da > 0
            pts = unproject_depth(torch.from_numpy(da).double(), ca, K)[torch.from_numpy(m)]
            uv, z = project_points(pts, cb[None], K[None])
            uv, z = uv[0].numpy(), z[0].numpy()
            inside = (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
            ub, vb = np.floor(uv[inside, 0]).astype(int), np.floor(uv[inside, 1]).astype(int)
            visible = np.abs(db[vb, ub] - z[inside]) < 0.02 * z[inside] + 0.05
            assert visible.sum() > 300, (p.name, a, b, visible.sum())
            assert visible.mean() > 0.6
            diff = np.abs(ra[m][inside][visible] - rb[vb[visible], ub[visible]]).max(axis=-1)
            assert np.median(diff) <= 8, (p.name, a, b)
            assert (diff <= 24).mean() > 0.65, (p.name, a, b, (diff <= 24).mean())


def test_shading_is_view_independent(data):
    """The exact surface point seen from another camera has the same colour (sub-pixel exact re-cast)."""
    _, _, scenes = data
    sc = scenes[0]
    ra = sc.render(2, 0)
    v, u = np.nonzero(ra.depth > 0)
    K = sc.K
    x = (u + 0.5 - K[0, 2]) / K[0, 0]
    y = (v + 0.5 - K[1, 2]) / K[1, 1]
    c2w = sc.c2w[2, 0]
    P = (np.stack([x, y, np.ones_like(x)], -1) * ra.depth[v, u, None].astype(np.float64)) @ c2w[:3, :3].T + c2w[:3, 3]
    ob = sc.c2w[3, 1, :3, 3]  # another camera, next frame
    t, ids, rgb = sc.raycast(ob, P - ob)
    seen = np.abs(t - 1.0) < 1e-3  # the point itself is the first hit from there
    assert seen.mean() > 0.3
    rgb8 = np.round(rgb[seen] * 255).astype(int)
    assert (np.abs(rgb8 - ra.rgb[v, u][seen].astype(int)).max(axis=-1) <= 2).mean() > 0.97


def test_seed_ply(data):
    from plyfile import PlyData

    _, paths, scenes = data
    for p, sc in zip(paths, scenes):
        raw = (p / "seed.ply").read_bytes()
        assert b"format binary_little_endian 1.0" in raw[:200]
        ply = PlyData.read(str(p / "seed.ply"))
        v = ply["vertex"].data
        names = v.dtype.names
        assert names == ("x", "y", "z", "red", "green", "blue")
        assert v["x"].dtype == np.float32 and v["red"].dtype == np.uint8
        assert 1000 < len(v) <= 40000
        xyz = np.stack([v["x"], v["y"], v["z"]], -1).astype(np.float64)
        assert sc.distance_to_surface(xyz).max() < 1e-3
        rgb = np.stack([v["red"], v["green"], v["blue"]], -1)
        assert rgb.std() > 10  # coloured, not constant
        # the points are around the trajectory
        centres = sc.c2w[:, 0, :3, 3]
        horiz = np.linalg.norm(xyz[:, None, :2] - centres[None, :, :2], axis=-1).min(axis=1)
        assert np.median(horiz) < 40


def test_distance_to_surface_and_raycast_agree():
    sc = make_scene(5, 0, 24, 72, 6, 3)
    rng = np.random.default_rng(0)
    o = sc.c2w[0, 0, :3, 3]
    dirs = rng.normal(size=(500, 3))
    dirs[:, 2] = -np.abs(dirs[:, 2])  # downwards: always hits the ground or something above it
    t, ids, rgb = sc.raycast(o, dirs)
    assert np.all(ids >= 0) and np.all(np.isfinite(t))
    P = o + t[:, None] * dirs
    assert sc.distance_to_surface(P).max() < 1e-6
    # points slightly in front of the hit are free space, off the surface
    assert np.all(sc.distance_to_surface(o + (t[:, None] - 0.05) * dirs) > 1e-3)
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # upwards above the skyline: sky
    t2, ids2, _ = sc.raycast(np.array([o[0], o[1], 500.0]), np.array([[0.0, 0.0, 1.0]]))
    assert ids2[0] == -1 and np.isinf(t2[0])


def test_parsed_by_the_dataparser(data):
    from evolsplat_ns.data.dataparser import load_scenes

    root, _, _ = data
    recs = load_scenes(root)
    assert len(recs) == NUM_SCENES
    for r in recs:
        assert r.num_frames == FRAMES and r.camera_ids == list(range(CAMS))
        assert r.seed_ply_path is not None and r.seed_ply_path.exists()
        np.testing.assert_allclose(r.image(0, 0).c2w, np.eye(4), atol=1e-9)


def test_cli_main(tmp_path):
    from evolsplat_ns.cli.synth import main

    out = tmp_path / "out"
    paths = main(["--out", str(out), "--num-scenes", "1", "--seed", "2", "--height", "16", "--width", "48",
                  "--frames", "2", "--cameras", "2", "--quiet"])
    assert [p.name for p in paths] == ["scene_000"]
    meta = _meta(out / "scene_000")
    assert len(meta["frames"]) == 4 and meta["camera_names"] == ["front", "front_left"]
    assert Image.open(out / "scene_000" / "images" / "001_1.png").size == (48, 16)
    # a second run over the same folder replaces the scene in place
    main(["--out", str(out), "--num-scenes", "1", "--seed", "2", "--height", "16", "--width", "48",
          "--frames", "2", "--cameras", "2", "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["scene_000"]


def test_cli_subprocess(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "evolsplat_ns.cli.synth", "--out", str(out), "--num-scenes", "2", "--height", "16",
           "--width", "48", "--frames", "3", "--cameras", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "scene_001" in res.stdout
    assert (out / "scene_001" / "transforms.json").exists()
    bad = subprocess.run(cmd[:3] + ["--out", str(out), "--height", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_parallel_generation_is_identical(tmp_path):
    a = generate_scenes(tmp_path / "a", 2, 9, 16, 48, num_frames=4, num_cameras=2, quiet=True, workers=1)
    b = generate_scenes(tmp_path / "b", 2, 9, 16, 48, num_frames=4, num_cameras=2, quiet=True, workers=2)
    for pa, pb in zip(a, b):
        files = sorted(p.relative_to(pa) for p in pa.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(pb) for p in pb.rglob("*") if p.is_file())
        for f in files:
            assert (pa / f).read_bytes() == (pb / f).read_bytes(), f
