"""Segment point clouds (generators, filters, cache, CLI) and the hybrid Gaussian initialisation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evolsplat_ns.cameras import opencv_to_opengl
from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.errors import ConfigError
from evolsplat_ns.data.records import SKY_0_IS_SKY, SKY_255_IS_SKY
from evolsplat_ns.data.scene_index import Segment
from evolsplat_ns.pointcloud import filters, plyio
from evolsplat_ns.pointcloud.cache import PointCloudCache, config_hash, segment_pointcloud
from evolsplat_ns.pointcloud.generators import (
    EmptyPointCloudError,
    LidarRGBPointCloudGenerator,
    MonocularRGBPointCloudGenerator,
    SeedPlySource,
    make_generator,
)
from evolsplat_ns.pointcloud.init import SH_C0, init_gaussians, knn_mean_distance, random_unit_quaternions, sh_to_rgb
from evolsplat_ns.pointcloud.options import (
    SPARSITY_MODES,
    PointCloudOptions,
    default_boxes,
    segment_input_frames,
    select_sparsity,
)

# ----------------------------------------------------------------------------------------------------------------
# a small analytic street: ground plane y = +1.5 (project frame, y down), a wall at z = 25, sky above
# ----------------------------------------------------------------------------------------------------------------

H, W, F = 30, 40, 24.0
K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])
GROUND_Y, WALL_Z, WALL_TOP = 1.5, 25.0, -4.0
SKY_DEPTH = 80.0  # what a monocular network predicts for the sky: far, but not zero
OBJECT_DEPTH = 4.0
RED = np.array([255, 0, 0], np.uint8)


def _yaw(deg: float) -> np.ndarray:
    a = math.radians(deg)
    R = np.eye(4)
    R[0, 0], R[0, 2], R[2, 0], R[2, 2] = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
    return R


def project_pose(t: int, cam: int) -> np.ndarray:
    """OpenCV c2w in the project frame: forward along z, 1 m per frame; camera 1 turned 30 degrees right."""
    T = _yaw(30.0 * cam)
    T[2, 3] = float(t)
    return T


def render(c2w: np.ndarray):
    """(depth [H, W], rgb [H, W, 3] uint8, sky [H, W] bool) of the analytic street."""
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    d = d_cam @ c2w[:3, :3].T
    o = c2w[:3, 3]
    s = np.full((H, W), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        sg = np.where(d[..., 1] > 1e-9, (GROUND_Y - o[1]) / d[..., 1], np.inf)
        sw = np.where(d[..., 2] > 1e-9, (WALL_Z - o[2]) / d[..., 2], np.inf)
    yw = o[1] + sw * d[..., 1]
    sw = np.where((yw >= WALL_TOP) & (yw <= GROUND_Y), sw, np.inf)
    s = np.minimum(sg, sw)
    sky = ~np.isfinite(s)
    P = o + np.where(sky, 0, s)[..., None] * d
    rgb = np.stack([0.2 + 0.3 * (np.floor(P[..., 0]) % 2), 0.3 + 0.6 * ((P[..., 2] * 0.37) % 1.0),
                    0.4 + 0.5 * ((P[..., 1] * 0.5 + P[..., 0] * 0.13) % 1.0)], -1)
    rgb[sky] = [0.45, 0.6, 0.95]
    depth = np.where(sky, SKY_DEPTH, s).astype(np.float32)
    return depth, (rgb * 255).round().astype(np.uint8), sky


WORLD = np.array([[0.0, 0.0, 1.0, 10.0], [-1.0, 0.0, 0.0, 5.0], [0.0, -1.0, 0.0, 1.6], [0, 0, 0, 1.0]])
"""Data world frame of the written scenes (z up): world = WORLD @ project."""


def write_analytic_scene(folder: Path, num_frames=8, cams=(0, 1), convention=SKY_255_IS_SKY, moving=None,
                         seed_ply=False) -> Path:
    """Write the street in the multi-scene root format. ``moving = (frame, camera)``: a red object at 4 m."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "depth", "sky_masks"):
        (folder / sub).mkdir(exist_ok=True)
    frames = []
    for t in range(num_frames):
        for c in cams:
            depth, rgb, sky = render(project_pose(t, c))
            if moving is not None and (t, c) == tuple(moving):
                depth[8:15, 14:22] = OBJECT_DEPTH
                rgb[8:15, 14:22] = RED
                sky[8:15, 14:22] = False
            name = f"{t:03d}_{c}"
            Image.fromarray(rgb).save(folder / "images" / f"{name}.png")
            np.save(folder / "depth" / f"{name}.npy", depth)
            mask = sky if convention == SKY_255_IS_SKY else ~sky
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(folder / "sky_masks" / f"{name}.png")
            frames.append({"file_path": f"images/{name}.png", "camera": c, "timestep": t,
                           "transform_matrix": opencv_to_opengl(WORLD @ project_pose(t, c)).tolist(),
                           "depth_file_path": f"depth/{name}.npy", "sky_mask_path": f"sky_masks/{name}.png"})
    meta = {"fl_x": F, "fl_y": F, "cx": W / 2, "cy": H / 2, "w": W, "h": H, "sky_mask_convention": convention,
            "frames": frames}
    if seed_ply:
        meta["ply_file_path"] = "seed.ply"
    (folder / "transforms.json").write_text(json.dumps(meta))
    return folder


BIG_BOX = ((-300.0, -12.0, -300.0), (300.0, 5.0, 300.0))


def segment_of(scene, frames=None, aabb=BIG_BOX, segment_id=0) -> Segment:
    frames = tuple(range(scene.num_frames)) if frames is None else tuple(frames)
    return Segment(scene.scene_id, segment_id, tuple(range(len(frames))), frames, aabb)


def on_surface(points: np.ndarray, tol=1e-3) -> np.ndarray:
    """Points on the ground plane or on the wall (project frame)."""
    return (np.abs(points[:, 1] - GROUND_Y) < tol) | (np.abs(points[:, 2] - WALL_Z) < tol)


PLAIN = dict(outlier_removal=False, every_k_inside=1, every_k_outside=1)


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    root = tmp_path_factory.mktemp("street")
    return parse_scene(write_analytic_scene(root / "scene_000"), 0)


# ----------------------------------------------------------------------------------------------------------------
# frame selection
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,kept", [
    ("full", list(range(20))),
    ("Drop25", [p for p in range(20) if p % 4 != 2]),
    ("Drop50", [0, 1, 4, 5, 8, 9, 12, 13, 16, 17]),
    ("Drop80", [0, 5, 10, 15]),
    ("Drop90", [0, 10]),
])
def test_sparsity_selects_frames_by_position(mode, kept):
    frames = list(range(100, 120))  # positions, not frame numbers, decide
    assert select_sparsity(frames, mode) == [100 + p for p in kept]
    assert set(SPARSITY_MODES) == {"full", "Drop25", "Drop50", "Drop80", "Drop90"}


def test_input_restriction_applies_after_sparsity():
    seg_frames = list(range(6, 18))
    even = {t for t in range(40) if t % 2 == 0}
    assert segment_input_frames(seg_frames, "Drop50", even) == [6, 10, 14]  # positions 0,1,4,5,8,9 -> 6,7,10,11,...
    assert segment_input_frames(seg_frames, "full", lambda t: t % 2 == 0) == [6, 8, 10, 12, 14, 16]
    assert segment_input_frames(seg_frames, "full", None) == seg_frames
    with pytest.raises(ConfigError):
        PointCloudOptions(sparsity="Drop33").validate()  # type: ignore[arg-type]


def test_generator_reads_only_allowed_frames(tmp_path, monkeypatch):
    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=6), 0)
    for t in (1, 3, 5):  # the held-out frames' files are gone: touching them would fail
        for c in (0, 1):
            (tmp_path / "s" / "depth" / f"{t:03d}_{c}.npy").unlink()
            (tmp_path / "s" / "images" / f"{t:03d}_{c}.png").unlink()
    import evolsplat_ns.pointcloud.generators as gen_mod

    read = []
    orig_depth, orig_rgb = gen_mod._read_depth, gen_mod._read_rgb
    monkeypatch.setattr(gen_mod, "_read_depth", lambda p: read.append(p) or orig_depth(p))
    monkeypatch.setattr(gen_mod, "_read_rgb", lambda p: read.append(p) or orig_rgb(p))
    g = MonocularRGBPointCloudGenerator(PointCloudOptions(**PLAIN))
    pts, _ = g.generate_pointcloud(scene, segment_of(scene), input_frames={0, 2, 4})
    assert len(pts) > 0 and g.last_report.frames == [0, 2, 4]
    assert read and all(int(Path(p).name[:3]) % 2 == 0 for p in read)
    # the fallback stages never widen the restriction either: a segment whose allowed frames are all sky
    monkeypatch.setattr(gen_mod, "_read_depth", lambda p: np.zeros((H, W), np.float32))
    with pytest.raises(EmptyPointCloudError, match=r"scene 0 \(s\) segment 0"):
        g.generate_pointcloud(scene, segment_of(scene), input_frames={0, 2, 4})


# ----------------------------------------------------------------------------------------------------------------
# depth generator
# ----------------------------------------------------------------------------------------------------------------


def test_depth_points_lie_on_the_surfaces_with_image_colours(street):
    g = MonocularRGBPointCloudGenerator(PointCloudOptions(downscale=1, depth_consistency=False, use_bbx=False, **PLAIN))
    pts, cols = g.generate_pointcloud(street, segment_of(street, frames=[2]))
    assert pts.dtype == np.float32 and cols.dtype == np.float32 and pts.shape == cols.shape
    assert on_surface(pts).all()
    # one image pair, no filter but the sky: exactly the non-sky pixels of both cameras, coloured by them
    n_expected = sum(int((~render(project_pose(2, c))[2]).sum()) for c in (0, 1))
    assert len(pts) == n_expected
    _, rgb0, sky0 = render(project_pose(2, 0))
    np.testing.assert_allclose(cols[: int((~sky0).sum())], rgb0[~sky0] / 255.0, atol=1e-6)
    # pixel grid subsampling [::2, ::2]
    g2 = MonocularRGBPointCloudGenerator(PointCloudOptions(downscale=2, depth_consistency=False, **PLAIN))
    pts2, _ = g2.generate_pointcloud(street, segment_of(street, frames=[2]))
    assert len(pts2) == sum(int((~render(project_pose(2, c))[2][::2, ::2]).sum()) for c in (0, 1))


@pytest.mark.parametrize("convention", [SKY_255_IS_SKY, SKY_0_IS_SKY])
def test_sky_mask_convention(tmp_path, convention):
    mask = np.array([[0, 255], [255, 0]], np.uint8)
    sky = filters.sky_from_mask(mask, convention)
    assert (sky == ((mask == 255) if convention == SKY_255_IS_SKY else (mask == 0))).all()
    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=3, convention=convention), 0)
    assert scene.sky_mask_convention == convention
    seg = segment_of(scene)
    kept, _ = make_generator(PointCloudOptions(depth_consistency=False, **PLAIN)).generate_pointcloud(scene, seg)
    raw, _ = make_generator(PointCloudOptions(depth_consistency=False, filter_sky=False, **PLAIN)).generate_pointcloud(
        scene, seg)
    sky_pts = raw[~on_surface(raw)]
    assert len(sky_pts) > 0 and np.all(np.linalg.norm(sky_pts, axis=1) > 0.9 * SKY_DEPTH - 5)
    assert on_surface(kept).all() and len(kept) == len(raw) - len(sky_pts)
    with pytest.raises(ValueError, match="convention"):
        filters.sky_from_mask(mask, "1_is_sky")


@pytest.mark.parametrize("frame", [3, 0])
def test_depth_consistency_removes_a_moving_object(tmp_path, frame):
    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=6, moving=(frame, 0)), 0)
    seg = segment_of(scene)
    is_red = lambda c: np.all(np.abs(c - RED / 255.0) < 1e-6, axis=1)  # noqa: E731
    _, cols = make_generator(PointCloudOptions(depth_consistency=False, **PLAIN)).generate_pointcloud(scene, seg)
    assert is_red(cols).sum() == 16  # the object (7 x 8 pixels, grid [::2, ::2]) is there without the check
    pts, cols = make_generator(PointCloudOptions(depth_consistency=True, **PLAIN)).generate_pointcloud(scene, seg)
    assert is_red(cols).sum() == 0
    assert len(pts) > 0.3 * len(cols) and on_surface(pts).mean() == 1.0


def test_depth_consistency_mask_unit():
    c2w = project_pose(0, 0)
    depth, _, _ = render(c2w)
    # points on the surface agree, a point floating in front does not; a point outside the view is kept
    good = np.array([[0.0, GROUND_Y, 10.0], [1.0, 0.0, WALL_Z]])
    bad = np.array([[0.0, 0.0, 5.0]])
    unseen = np.array([[0.0, 0.0, -3.0]])
    keep = filters.depth_consistency_mask(np.concatenate([good, bad, unseen]), depth, c2w, K)
    assert keep.tolist() == [True, True, False, True]


# ----------------------------------------------------------------------------------------------------------------
# boxes, outliers, down-sampling
# ----------------------------------------------------------------------------------------------------------------


def test_crop_and_split_counts():
    rng = np.random.default_rng(0)
    inner = rng.uniform(-5, 5, (1001, 3))
    between = rng.uniform(6, 9, (503, 3))  # inside the crop box, outside the inner box
    outside = rng.uniform(20, 30, (77, 3))
    pts = np.concatenate([inner, between, outside])
    cols = rng.uniform(0, 1, pts.shape)
    crop, inner_box = np.array([[-10.0] * 3, [10.0] * 3]), np.array([[-5.0] * 3, [5.0] * 3])
    opts = PointCloudOptions(outlier_removal=False)  # every 2nd inside, every 5th outside
    p, c = filters.postprocess(pts, cols, opts, crop, inner_box)
    assert len(p) == math.ceil(1001 / 2) + math.ceil(503 / 5)
    np.testing.assert_array_equal(p[:501], inner[::2])
    np.testing.assert_array_equal(p[501:], between[::5])
    np.testing.assert_array_equal(c[:501], cols[:1001][::2])
    # without boxes: no crop, the inside treatment for everything
    p, _ = filters.postprocess(pts, cols, opts.replace(use_bbx=False), crop, inner_box)
    assert len(p) == math.ceil(len(pts) / 2)


def test_default_boxes_follow_the_segment():
    opts = PointCloudOptions(inner_margin=10.0)
    seg_box = ((-50.0, -9.0, -5.0), (50.0, 3.8, 80.0))
    crop, inner = default_boxes(seg_box, np.array([[0.0, 0.0, 0.0], [1.0, 0.2, 30.0]]), opts)
    np.testing.assert_allclose(crop, np.array(seg_box))
    np.testing.assert_allclose(inner, [[-10.0, -9.0, -5.0], [11.0, 3.8, 40.0]])
    crop2, inner2 = default_boxes(seg_box, np.zeros((1, 3)), opts.replace(crop_aabb=(0, 0, 0, 1, 1, 1),
                                                                            input_aabb=(0, 0, 0, 0.5, 0.5, 0.5)))
    np.testing.assert_allclose(crop2, [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(inner2, [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_planted_outliers_are_removed():
    rng = np.random.default_rng(1)
    cluster_in = rng.normal(0, 0.5, (800, 3))
    cluster_out = rng.normal(0, 0.5, (600, 3)) + [7.0, 0.0, 0.0]
    out_in = np.array([[3.5, 3.5, 3.5], [-3.8, 3.0, -3.9], [3.9, -3.9, 0.0]])  # isolated, in the inner box
    out_out = np.array([[9.5, 9.0, 9.0], [5.0, -9.0, 9.0]])  # isolated, between inner and crop box
    pts = np.concatenate([cluster_in, out_in, cluster_out, out_out])
    cols = np.zeros_like(pts)
    opts = PointCloudOptions(every_k_inside=1, every_k_outside=1)
    p, _ = filters.postprocess(pts, cols, opts, np.array([[-10.0] * 3, [10.0] * 3]), np.array([[-4.0] * 3, [4.0] * 3]))
    remaining = {tuple(x) for x in p}
    assert not any(tuple(x) in remaining for x in np.concatenate([out_in, out_out]))
    assert len(p) > 0.95 * (len(cluster_in) + len(cluster_out))


def test_uniform_every_k_matches_open3d():
    """The uniform down-sampling keeps open3d's points (the outlier filter's backends: tests/test_knn.py)."""
    o3d = plyio.open3d_module()
    if o3d is None:
        pytest.skip("open3d not installed")
    pts = np.random.default_rng(2).normal(size=(1500, 3))
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    for k in (2, 5):
        np.testing.assert_array_equal(np.asarray(pc.uniform_down_sample(k).points),
                                      pts[filters.uniform_every_k(len(pts), k)])


def test_max_points_is_a_seeded_subsample(street):
    seg = segment_of(street, frames=[1, 2])
    a, ca = make_generator(max_points=300, seed=3, **PLAIN).generate_pointcloud(street, seg)
    b, _ = make_generator(max_points=300, seed=3, **PLAIN).generate_pointcloud(street, seg)
    c, _ = make_generator(max_points=300, seed=4, **PLAIN).generate_pointcloud(street, seg)
    full, _ = make_generator(**PLAIN).generate_pointcloud(street, seg)
    assert len(full) > 400
    assert len(a) == 300 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert {tuple(x) for x in a} <= {tuple(x) for x in full}


def test_empty_cloud_falls_back_then_names_scene_and_segment(tmp_path):
    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=2), 0)
    far_box = ((500.0, 500.0, 500.0), (501.0, 501.0, 501.0))  # nothing in it: the box stage drops everything
    g = MonocularRGBPointCloudGenerator(PointCloudOptions(**PLAIN))
    pts, _ = g.generate_pointcloud(scene, segment_of(scene, aabb=far_box))
    assert len(pts) > 0 and g.last_report.stage == "without boxes"
    assert g.last_report.fallbacks == ["as configured", "without depth consistency", "without sky filter"]
    with pytest.raises(EmptyPointCloudError, match=r"scene 0 \(s\) segment 7"):
        g.generate_pointcloud(scene, segment_of(scene, aabb=far_box, segment_id=7), input_frames=set())


# ----------------------------------------------------------------------------------------------------------------
# LiDAR and seed PLY
# ----------------------------------------------------------------------------------------------------------------


def test_lidar_points_take_the_nearest_seeing_camera(tmp_path):
    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=2), 0)
    ground = np.array([[0.0, GROUND_Y, 8.0], [1.0, GROUND_Y, 12.0]])  # seen by camera 0 only (1 looks right)
    right = np.array([[8.0, GROUND_Y, 8.0]])  # seen by camera 1 (30 deg right); camera 0 too? check below
    behind = np.array([[0.0, 0.0, -5.0], [0.0, -30.0, 3.0]])  # seen by nobody
    sweeps = {0: np.concatenate([ground, right, behind]), 1: ground + [0.0, 0.0, 1.0]}
    scene.metadata["lidar_loader"] = lambda t: sweeps[t]
    g = LidarRGBPointCloudGenerator(PointCloudOptions(**PLAIN))
    pts, cols = g.generate_pointcloud(scene, segment_of(scene))
    assert len(pts) == 3 + 2
    import torch as _t
    from evolsplat_ns.cameras import project_points

    for p, c in zip(pts, cols):
        t = 0 if any(np.allclose(p, q) for q in sweeps[0]) else 1
        recs = [scene.image(t, cam) for cam in (0, 1)]
        seen = []
        for r in recs:
            uv, z = project_points(_t.tensor(p[None], dtype=_t.float64), _t.tensor(r.c2w)[None], _t.tensor(r.K)[None])
            u, v = uv[0, 0].numpy()
            if z[0, 0] > 0 and 0 <= u < W and 0 <= v < H:
                seen.append((np.linalg.norm(p - r.center), r, int(v), int(u)))
        _, r, v, u = min(seen, key=lambda s: s[0])
        img = np.asarray(Image.open(r.image_path).convert("RGB"))
        np.testing.assert_allclose(c, img[v, u] / 255.0, atol=1e-6)
    with pytest.raises(ConfigError, match="lidar_loader"):
        LidarRGBPointCloudGenerator().generate_pointcloud(parse_scene(tmp_path / "s", 0), segment_of(scene))


def _ground_grid(step=0.25):
    x, z = np.meshgrid(np.arange(-6.0, 6.0, step), np.arange(3.0, 40.0, step))
    return np.stack([x.ravel(), np.full(x.size, GROUND_Y), z.ravel()], 1)


def test_lidar_cloud_drops_what_passes_and_keeps_what_stays(tmp_path):
    """Accumulated sweeps with ``lidar_free_space``: an object present in one frame of three (a passing car) is
    dropped, since the other frames see the ground through it; one present in two of three frames stays (majority),
    the ground stays; without the option (the default) everything stays."""
    scene = parse_scene(write_analytic_scene(tmp_path / "s", num_frames=3), 0)
    xs, ys = np.meshgrid(np.linspace(-0.5, 0.5, 5), np.linspace(0.2, 0.8, 4))
    passing = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 7.0)], 1)
    staying = passing + [2.0, 0.0, 3.0]
    ground = _ground_grid()
    sweeps = {0: np.concatenate([ground, passing, staying]), 1: np.concatenate([ground, staying]), 2: ground}
    scene.metadata["lidar_loader"] = lambda t: sweeps[t]

    def has(pts, obj):
        return np.array([np.abs(pts - q).max(1).min() < 1e-4 for q in obj])

    seg = segment_of(scene, aabb=BIG_BOX)
    pts, _ = LidarRGBPointCloudGenerator(PointCloudOptions(use_bbx=False, lidar_free_space=True, **PLAIN)
                                         ).generate_pointcloud(scene, seg)
    raw, _ = LidarRGBPointCloudGenerator(PointCloudOptions(use_bbx=False, **PLAIN)).generate_pointcloud(scene, seg)
    assert has(raw, passing).all() and has(raw, staying).all()
    assert not has(pts, passing).any()
    assert has(pts, staying).all()
    assert has(pts, ground[::50]).sum() == has(raw, ground[::50]).sum()  # the ground the cameras see stays


def test_transient_mask_keeps_what_no_other_frame_observes():
    """A point where the other frames have no depth at all (no return there: the sky, beyond range) is kept; a point
    behind a nearer surface of another frame is occluded there, not seen through, and is kept."""
    from types import SimpleNamespace

    from evolsplat_ns.pointcloud.filters import transient_mask

    K = np.array([[50.0, 0, 50], [0, 50.0, 25], [0, 0, 1]])
    cams = [[SimpleNamespace(c2w=np.eye(4), K=K, width=100, height=50)] for _ in range(3)]
    wall = np.stack(np.meshgrid(np.linspace(-4, 4, 81), np.linspace(-1, 1, 21), [20.0]), -1).reshape(-1, 3)
    lone = np.array([[0.0, -8.0, 20.0]])  # above the wall: nobody else has depth there
    hidden = np.array([[0.0, 0.0, 30.0]])  # behind the wall
    frames = [np.concatenate([wall, lone, hidden]), wall, wall]
    keep = transient_mask([torch.as_tensor(f, dtype=torch.float64) for f in frames], cams)
    assert keep[0].all() and keep[1].all() and keep[2].all()
    passing = np.array([[0.0, 0.0, 10.0]])
    keep = transient_mask([torch.as_tensor(f, dtype=torch.float64) for f in (np.concatenate([wall, passing]), wall,
                                                                              wall)], cams)
    assert not keep[0][-1] and keep[0][:-1].all()


def test_seed_ply_source_moves_to_the_project_frame_and_crops(tmp_path):
    folder = write_analytic_scene(tmp_path / "s", num_frames=2, seed_ply=True)
    rng = np.random.default_rng(0)
    proj = rng.uniform(-20, 20, (400, 3))
    world = proj @ WORLD[:3, :3].T + WORLD[:3, 3]
    cols = rng.integers(0, 256, (400, 3)) / 255.0
    plyio.write_ply(folder / "seed.ply", world, cols)
    scene = parse_scene(folder, 0)
    box = ((-10.0, -10.0, -10.0), (10.0, 10.0, 10.0))
    pts, c = SeedPlySource().generate_pointcloud(scene, segment_of(scene, aabb=box))
    inside = np.all(np.abs(proj) <= 10.0, axis=1)
    np.testing.assert_allclose(pts, proj[inside], atol=1e-4)
    np.testing.assert_allclose(c, cols[inside], atol=1e-6)
    with pytest.raises(ConfigError, match="holds out"):
        SeedPlySource().generate_pointcloud(scene, segment_of(scene, aabb=box), input_frames={0})
    assert len(SeedPlySource(seed_ply_ignores_holdout=True).generate_pointcloud(
        scene, segment_of(scene, aabb=box), input_frames={0})[0]) == inside.sum()


def test_ply_io_round_trip_with_and_without_open3d(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    cols = (rng.integers(0, 256, (50, 3)) / 255.0).astype(np.float32)
    plyio.write_ply(tmp_path / "a.ply", pts, cols)
    monkeypatch.setattr(plyio, "open3d_module", lambda: None)
    plyio.write_ply(tmp_path / "b.ply", pts, cols)
    for name in ("a.ply", "b.ply"):
        p, c = plyio.read_ply(tmp_path / name)
        np.testing.assert_array_equal(p, pts)
        np.testing.assert_array_equal(c, plyio.quantise_colours(cols))
    monkeypatch.undo()
    p, c = plyio.read_ply(tmp_path / "b.ply")  # each reader reads the other's files
    np.testing.assert_array_equal(p, pts)


# ----------------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------------


class CountingGenerator(MonocularRGBPointCloudGenerator):
    calls = 0

    def _raw(self, *a, **kw):
        type(self).calls += 1
        return super()._raw(*a, **kw)


def test_cache_reuses_and_invalidates(tmp_path, street):
    seg = segment_of(street, frames=[0, 1, 2, 3])
    CountingGenerator.calls = 0
    cache = PointCloudCache(tmp_path / "cache")
    first = cache.get(CountingGenerator(), street, seg)
    assert CountingGenerator.calls == 1 and not first.from_cache
    assert first.path.parent == tmp_path / "cache" / street.name and first.path.name.startswith("0-")
    # a new run (new cache and generator objects): read back, nothing recomputed, identical arrays
    again = PointCloudCache(tmp_path / "cache").get(CountingGenerator(), street, seg)
    assert CountingGenerator.calls == 1 and again.from_cache and again.path == first.path
    np.testing.assert_array_equal(again.points, first.points)
    np.testing.assert_array_equal(again.colours, first.colours)
    # any option, or the input frames, changes the entry
    changed = cache.get(CountingGenerator(downscale=3), street, seg)
    assert CountingGenerator.calls == 2 and changed.path != first.path
    restricted = cache.get(CountingGenerator(), street, seg, input_frames={0, 2})
    assert CountingGenerator.calls == 3 and restricted.path not in (first.path, changed.path)
    assert cache.get(CountingGenerator(), street, seg).from_cache and CountingGenerator.calls == 3
    assert len(list((tmp_path / "cache" / street.name).glob("*.ply"))) == 3
    # default location: <data root>/.evolsplat_cache
    res = segment_pointcloud(street, seg, PointCloudOptions(), data_root=tmp_path / "root")
    assert res.path.parent == tmp_path / "root" / ".evolsplat_cache" / street.name
    h1 = config_hash(CountingGenerator().cache_key(street, seg))
    assert h1 == config_hash(CountingGenerator().cache_key(street, seg))
    assert h1 != config_hash(CountingGenerator(filter_sky=False).cache_key(street, seg))
    # the same scene loaded at another size (downscale: sizes and K change) is another cloud: colours are read there
    from evolsplat_ns.data.layouts.common import downscale_scene

    assert h1 != config_hash(CountingGenerator().cache_key(downscale_scene(street, 2.0), seg))


def test_interrupted_write_leaves_no_corrupt_entry(tmp_path, street, monkeypatch):
    from plyfile import PlyData

    seg = segment_of(street, frames=[0, 1])
    cache = PointCloudCache(tmp_path / "cache")
    real = PlyData.write

    def crash(self, stream):
        stream.write(b"ply\nformat binary_little_endian 1.0\nelement vertex 99999\n")  # half a file
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(PlyData, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.get(make_generator(), street, seg)
    folder = tmp_path / "cache" / street.name
    assert list(folder.iterdir()) == []  # neither an entry nor a temporary file
    monkeypatch.setattr(PlyData, "write", real)
    built = cache.get(make_generator(), street, seg)
    assert not built.from_cache and len(built.points) > 0
    # a damaged entry (e.g. copied by hand) is rebuilt, not trusted
    built.path.write_bytes(b"garbage")
    rebuilt = PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg)
    assert not rebuilt.from_cache
    np.testing.assert_array_equal(rebuilt.points, built.points)
    assert PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg).from_cache


@pytest.mark.parametrize("fault", ["disk_full", "silently_short"])
def test_a_failed_cache_write_leaves_no_entry_and_the_run_goes_on(tmp_path, street, monkeypatch, caplog, fault):
    """A full disk (the write raises) or a writer that stops early without an error (open3d's) never puts an entry
    in place: the entry is read back before it is moved there."""
    import errno

    from plyfile import PlyData

    seg = segment_of(street, frames=[0, 1])
    real = PlyData.write

    def broken(self, stream):
        import io

        buf = io.BytesIO()
        real(self, buf)
        stream.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        if fault == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PlyData, "write", broken)
    with caplog.at_level("WARNING"):
        res = PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg)
    assert len(res.points) > 0 and not res.from_cache and res.path is None  # the cloud, uncached
    assert "not cached" in caplog.text
    assert not (tmp_path / "cache" / street.name).exists() or list((tmp_path / "cache" / street.name).iterdir()) == []
    monkeypatch.setattr(PlyData, "write", real)
    again = PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg)
    assert not again.from_cache  # nothing was left to be mistaken for a hit
    np.testing.assert_array_equal(again.points, res.points)
    np.testing.assert_array_equal(again.colours, res.colours)


@pytest.mark.parametrize("damage", ["truncated", "zero_tail", "flipped_byte", "no_digest"])
def test_a_damaged_entry_is_rebuilt_never_padded(tmp_path, street, caplog, damage):
    from evolsplat_ns.pointcloud.cache import read_entry

    seg = segment_of(street, frames=[0, 1])
    built = PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg)
    built.knn_distance()  # the side file of this cloud
    data = bytearray(built.path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "zero_tail":
        data[-300:] = bytes(300)  # same size, zeros at the end: what a crash after preallocation leaves
    elif damage == "flipped_byte":
        data[-7] ^= 0xFF
    else:
        data = data.replace(b"comment evolsplat-cache sha256", b"comment something-else-entirely")
    built.path.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        read_entry(built.path)
    with caplog.at_level("WARNING"):
        res = PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg)
    assert not res.from_cache and "rebuilding" in caplog.text
    np.testing.assert_array_equal(res.points, built.points)
    assert not res.path.with_suffix(".knn.npy").exists()  # the old cloud's scales went with it
    assert PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg).from_cache


def test_cache_entries_get_ordinary_permissions_and_follow_their_input_files(tmp_path, street):
    import os
    import shutil
    import stat

    seg = segment_of(street, frames=[0, 1])
    res = PointCloudCache(tmp_path / "cache").get(make_generator(), street, seg)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(res.path.stat().st_mode) == 0o666 & ~mask  # as any other output, not a temp file's 0600
    (tmp_path / "other").write_bytes(b"x")
    assert stat.S_IMODE(res.path.stat().st_mode) == stat.S_IMODE((tmp_path / "other").stat().st_mode)
    # a changed input file (a depth map rewritten: new size / time) builds a new entry
    depth = street.image(1, 0).depth_path
    assert depth is not None
    before = PointCloudCache(tmp_path / "cache").path_for(make_generator(), street, seg)
    backup = tmp_path / "depth_backup"
    shutil.copy2(depth, backup)
    try:
        with open(depth, "ab") as f:
            f.write(b"\0")
        after = PointCloudCache(tmp_path / "cache").path_for(make_generator(), street, seg)
        assert after != before
    finally:
        shutil.copy2(backup, depth)
    assert PointCloudCache(tmp_path / "cache").path_for(make_generator(), street, seg) == before


# ----------------------------------------------------------------------------------------------------------------
# the synthetic scenes: accuracy against ground truth, and the command line
# ----------------------------------------------------------------------------------------------------------------

SYN = dict(seed=0, height=48, width=144, num_frames=24, num_cameras=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from evolsplat_ns.data.synthetic import generate_scenes, make_scene

    root = tmp_path_factory.mktemp("synth")
    generate_scenes(root, 1, SYN["seed"], SYN["height"], SYN["width"], num_frames=SYN["num_frames"],
                    num_cameras=SYN["num_cameras"], quiet=True)
    return root, make_scene(SYN["seed"], 0, SYN["height"], SYN["width"], SYN["num_frames"], SYN["num_cameras"])


def test_depth_points_are_on_the_true_surface(synth):
    from evolsplat_ns.data.dataparser import load_scenes
    from evolsplat_ns.data.scene_index import IndexOptions, index_scene

    root, truth = synth
    scene = load_scenes(root)[0]
    idx = index_scene(scene, IndexOptions(min_keyframes_per_scene=3, keyframes_per_segment=4,
                                          min_keyframes_per_segment=3))
    seg = idx.segments[0]
    pts, cols = make_generator(PointCloudOptions()).generate_pointcloud(scene, seg)
    assert len(pts) > 1000 and cols.min() >= 0 and cols.max() <= 1
    inv = np.linalg.inv(scene.align)
    dist = truth.distance_to_surface(pts.astype(np.float64) @ inv[:3, :3].T + inv[:3, 3])
    assert (dist < 0.1).mean() >= 0.95


def test_cli_writes_world_frame_ply_and_caches_all(synth, tmp_path, capsys):
    from evolsplat_ns.cli.pointcloud import PointCloudArgs, main
    from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig

    root, truth = synth

    def dm():
        return EvolSplatDataManagerConfig(min_keyframes_per_scene=3, keyframes_per_segment=4,
                                          min_keyframes_per_segment=3, num_source_keyframes=2,
                                          num_target_keyframes=2)

    out = tmp_path / "seg.ply"
    cache_dir = tmp_path / "cache"
    summary = main(PointCloudArgs(data=root, scene=0, segment=1, out=out, cache_dir=cache_dir, datamanager=dm()))
    assert "points in" in capsys.readouterr().out
    pts, cols = plyio.read_ply(out)
    assert len(pts) == summary[0]["points"] > 1000
    assert (truth.distance_to_surface(pts.astype(np.float64)) < 0.1).mean() >= 0.95  # the data's world frame
    summary = main(PointCloudArgs(data=root, all=True, cache_dir=cache_dir, quiet=True, datamanager=dm()))
    assert len(summary) >= 2 and [s["from_cache"] for s in summary if s["segment_id"] == 1] == [True]
    assert all(s["from_cache"] for s in main(PointCloudArgs(data=root, all=True, cache_dir=cache_dir, quiet=True,
                                                            datamanager=dm())))
    with pytest.raises(SystemExit):
        main(PointCloudArgs(data=root, scene=0, datamanager=dm()))  # no --segment / --out


# ----------------------------------------------------------------------------------------------------------------
# Gaussian initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_init_gaussians_values_and_shapes():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 3)).astype(np.float32)
    cols = rng.uniform(0, 1, (300, 3)).astype(np.float32)
    g = init_gaussians(pts, cols, sh_degree=1, seed=5)
    assert set(g) == {"means", "colours", "log_scales", "features_dc", "features_rest", "quats", "opacities", "offset"}
    assert all(v.dtype == torch.float32 for v in g.values())
    assert g["means"].shape == (300, 3) and torch.equal(g["means"], torch.from_numpy(pts))
    assert torch.equal(g["colours"], torch.from_numpy(cols))
    assert g["features_rest"].shape == (300, 3, 3) and not g["features_rest"].any()
    assert init_gaussians(pts, cols, sh_degree=2)["features_rest"].shape == (300, 8, 3)
    torch.testing.assert_close(g["features_dc"], (torch.from_numpy(cols) - 0.5) / SH_C0)
    torch.testing.assert_close(sh_to_rgb(g["features_dc"]), torch.from_numpy(cols))
    assert g["opacities"].shape == (300, 1)
    torch.testing.assert_close(torch.sigmoid(g["opacities"]), torch.full((300, 1), 0.1))
    assert g["offset"].shape == (300, 3) and not g["offset"].any()
    assert g["log_scales"].shape == (300, 3) and torch.equal(g["log_scales"][:, 0], g["log_scales"][:, 2])
    q = g["quats"]
    assert q.shape == (300, 4)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(300))
    assert torch.equal(q, init_gaussians(pts, cols, seed=5)["quats"])
    assert not torch.equal(q, init_gaussians(pts, cols, seed=6)["quats"])
    many = random_unit_quaternions(20000, torch.Generator().manual_seed(0))
    assert many.mean(0).abs().max() < 0.02  # uniform on the sphere: no preferred direction


def test_knn_scale_matches_brute_force():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 2, (200, 3)).astype(np.float32)
    pts[10] = pts[11] = pts[12] = pts[13]  # four coincident points: distance 0 to three neighbours
    d = np.linalg.norm(pts[:, None].astype(np.float64) - pts[None].astype(np.float64), axis=-1)
    np.fill_diagonal(d, np.inf)
    brute = np.sort(d, axis=1)[:, :3].mean(1)
    got = init_gaussians(pts, np.zeros_like(pts))["log_scales"]
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got[:, 0].numpy(), np.log(np.maximum(brute, 1e-4)), rtol=1e-5, atol=1e-5)
    assert got[10, 0].item() == pytest.approx(math.log(1e-4))
    assert knn_mean_distance(pts[:2]).tolist() == pytest.approx([np.linalg.norm(pts[0] - pts[1])] * 2)
    assert np.isfinite(knn_mean_distance(pts[:1])).all() and len(knn_mean_distance(np.zeros((0, 3)))) == 0


def test_generation_without_open3d(street, monkeypatch, tmp_path):
    seg = segment_of(street, frames=[0, 1, 2])
    with_o3d = PointCloudCache(tmp_path / "a").get(make_generator(), street, seg)
    monkeypatch.setattr(plyio, "open3d_module", lambda: None)
    monkeypatch.setattr(filters, "open3d_module", lambda: None)
    without = PointCloudCache(tmp_path / "b").get(make_generator(), street, seg)
    np.testing.assert_array_equal(without.points, with_o3d.points)
    np.testing.assert_array_equal(without.colours, with_o3d.colours)
    assert PointCloudCache(tmp_path / "a").get(make_generator(), street, seg).from_cache  # reads open3d's file


def test_knn_scales_cached_beside_the_cloud(tmp_path, monkeypatch):
    """The initial scales (KNN over the cloud) are computed once per cache entry, then read back; a stale or
    corrupt side file is recomputed, never trusted."""
    from evolsplat_ns.pointcloud import cache as cache_mod
    from evolsplat_ns.pointcloud import init as init_mod

    rng = np.random.default_rng(3)
    pts = rng.uniform(-5, 5, (400, 3)).astype(np.float32)
    entry = tmp_path / "0-abc.ply"
    pc = cache_mod.SegmentPointCloud(0, "s", 0, pts, np.zeros_like(pts), entry, True, 0.0)
    d = pc.knn_distance()
    assert np.allclose(d, knn_mean_distance(pts)) and entry.with_suffix(".knn.npy").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind

    def fail(*a, **k):
        raise AssertionError("KNN recomputed although cached")

    monkeypatch.setattr(init_mod, "knn_mean_distance", fail)
    assert np.array_equal(pc.knn_distance(), d)
    monkeypatch.undo()
    np.save(entry.with_suffix(".knn.npy"), d[:10])  # stale: another cloud's size
    assert np.allclose(pc.knn_distance(), d)
    g = init_gaussians(pts, np.zeros_like(pts), knn_distance=d)
    assert torch.allclose(g["log_scales"], init_gaussians(pts, np.zeros_like(pts))["log_scales"])
