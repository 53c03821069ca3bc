"""Real-data layouts on fixture scenes written in each dataset's own layout (tests/layout_fixtures.py).

Geometry is checked end to end: a LiDAR marker lands on the pixel the fixture painted for it in every camera that
sees it; LiDAR-derived (and file) depth of consecutive frames agrees after reprojection; camera centres follow the
recorded trajectory; sky conventions; a missing sweep is tolerated; the CLIs work on every layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evolsplat_ns.cameras import (
    WAYMO_CAMERA_TO_OPENCV,
    matrix_to_quaternion_wxyz,
    project_points,
    quaternion_wxyz_to_matrix,
    rigid_inverse,
    unproject_depth,
)
from evolsplat_ns.errors import ConfigError, DataValidationError
from evolsplat_ns.data.layouts import (
    LayoutOptions,
    detect_layout,
    find_layout_scenes,
    load_layout_scenes,
    protocol_input_frames,
)
from evolsplat_ns.data.records import DEPTH_PROVIDER_KEY, SKY_255_IS_SKY
from evolsplat_ns.data.views import SceneCache, fit_to_record, read_depth, read_image
from layout_fixtures import (
    MARKER_RGB,
    MARKERS,
    write_drivestudio,
    write_kitti_calib,
    write_kitti_drive,
    write_pandaset,
    write_reference,
)
from scene_fixtures import write_scene

NM = len(MARKERS)


def load_one(path: Path, **kw):
    scenes = load_layout_scenes(path, LayoutOptions(**kw))
    assert len(scenes) == 1
    return scenes[0]


def to_data_world(scene, rec) -> np.ndarray:
    """The record's pose back in the data's own world frame."""
    return rigid_inverse(np.asarray(scene.align)) @ rec.c2w


def check_truth(scene, truth, atol_t=1e-5, atol_r=1e-5):
    """Poses (data world) and intrinsics equal the fixture's ground truth; project frame starts at identity."""
    np.testing.assert_allclose(scene.images[0].c2w, np.eye(4), atol=1e-9)
    assert scene.num_frames == truth.num_frames and scene.camera_ids == sorted(truth.cameras)
    for rec in scene.images:
        T = truth.c2w[(rec.frame_index, rec.camera_id)]
        got = to_data_world(scene, rec)
        np.testing.assert_allclose(got[:3, 3], T[:3, 3], atol=atol_t)
        np.testing.assert_allclose(got[:3, :3], T[:3, :3], atol=atol_r)
        np.testing.assert_allclose(rec.K, truth.K[rec.camera_id], atol=1e-6)
        assert (rec.width, rec.height) == truth.size
    # camera centres move along the recorded trajectory: same steps, same total travel
    front = scene.front_camera_id
    got = scene.front_centers()
    want = truth.front_centers(front)
    np.testing.assert_allclose(np.linalg.norm(np.diff(got, axis=0), axis=1),
                               np.linalg.norm(np.diff(want, axis=0), axis=1), atol=1e-5)


def check_markers(scene, min_hits=10, tol=50):
    """Every LiDAR marker lands on its painted colour in every camera that sees it. Returns hits per camera."""
    load = scene.metadata["lidar_loader"]
    hits = {c: 0 for c in scene.camera_ids}
    multi = 0
    for t in range(scene.num_frames):
        pts = np.asarray(load(t))[:NM, :3]
        if len(pts) < NM:
            continue
        seen_by = np.zeros(NM, int)
        for rec in scene.frame_images(t):
            img = fit_to_record(read_image(rec.image_path), rec)
            uv, z = project_points(torch.as_tensor(pts), torch.as_tensor(rec.c2w)[None], torch.as_tensor(rec.K)[None])
            uv, z = uv[0].numpy(), z[0].numpy()
            pix = np.floor(uv)
            for i in range(NM):
                u, v = pix[i]
                if z[i] <= 0.1 or not (0 <= u < rec.width and 0 <= v < rec.height):
                    continue
                # the fixture paints 5x5 blocks far to near: skip a marker under a nearer marker's block
                if any(z[j] > 0.1 and z[j] < z[i] and np.abs(pix[j] - pix[i]).max() <= 2 for j in range(NM) if j != i):
                    continue
                got = img[int(v), int(u)].astype(int)
                assert np.abs(got - MARKER_RGB[i].astype(int)).max() <= tol, \
                    f"marker {i} frame {t} camera {rec.camera_id}: pixel ({v}, {u}) is {got}, painted {MARKER_RGB[i]}"
                hits[rec.camera_id] += 1
                seen_by[i] += 1
        multi += int((seen_by >= 2).sum())
    assert sum(hits.values()) >= min_hits, hits
    if scene.num_cameras > 1:
        assert multi > 0, "no marker seen by two cameras at once"
    return hits


def check_marker_depth(scene):
    """LiDAR depth: the nearest return at a marker's pixel is the marker itself."""
    provider = scene.metadata[DEPTH_PROVIDER_KEY]
    n = 0
    for t in range(0, scene.num_frames, 3):
        pts = np.asarray(scene.metadata["lidar_loader"](t))[:NM, :3]
        for rec in scene.frame_images(t):
            d = provider(rec)
            assert d.shape == (rec.height, rec.width) and d.dtype == np.float32
            uv, z = project_points(torch.as_tensor(pts), torch.as_tensor(rec.c2w)[None], torch.as_tensor(rec.K)[None])
            for i in range(NM):
                u, v = np.floor(uv[0, i].numpy())
                if z[0, i] > 0.1 and 0 <= u < rec.width and 0 <= v < rec.height:
                    assert d[int(v), int(u)] == pytest.approx(float(z[0, i]), rel=1e-4)
                    n += 1
    assert n > 0


def check_consecutive_depth(scene, depth_of, cam=None, min_pairs=100):
    """Depth of frame t, unprojected and projected into frame t+1 of the same camera, agrees with t+1's depth."""
    cam = scene.front_camera_id if cam is None else cam
    rels = []
    for t in range(scene.num_frames - 1):
        a, b = scene.image(t, cam), scene.image(t + 1, cam)
        da, db = depth_of(a), depth_of(b)
        world = unproject_depth(torch.as_tensor(da, dtype=torch.float64), torch.as_tensor(a.c2w),
                                torch.as_tensor(a.K)).numpy()[da > 0]
        uv, z = project_points(torch.as_tensor(world), torch.as_tensor(b.c2w)[None], torch.as_tensor(b.K)[None])
        uv, z = uv[0].numpy(), z[0].numpy()
        col, row = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        ok = (z > 0.5) & (col >= 0) & (col < b.width) & (row >= 0) & (row < b.height)
        ref = db[row[ok].astype(int), col[ok].astype(int)]
        good = ref > 0
        rels.append(np.abs(z[ok][good] - ref[good]) / ref[good])
    rel = np.concatenate(rels)
    assert len(rel) >= min_pairs
    assert np.median(rel) < 0.03 and np.mean(rel < 0.1) > 0.8, (np.median(rel), np.mean(rel < 0.1))


# ----------------------------------------------------------------------------------------------------------------
# conventions
# ----------------------------------------------------------------------------------------------------------------


def test_convention_helpers():
    from scipy.spatial.transform import Rotation

    R = Rotation.from_euler("zyx", [0.7, -0.2, 0.1]).as_matrix()
    x, y, z, w = Rotation.from_matrix(R).as_quat()
    np.testing.assert_allclose(quaternion_wxyz_to_matrix(w, x, y, z), R, atol=1e-12)
    np.testing.assert_allclose(quaternion_wxyz_to_matrix(*matrix_to_quaternion_wxyz(R)), R, atol=1e-12)
    # Waymo camera axes: the OpenCV forward (z) axis is Waymo's x, OpenCV right (x) is Waymo's -y
    np.testing.assert_allclose(WAYMO_CAMERA_TO_OPENCV[:3, 2], [1, 0, 0])
    np.testing.assert_allclose(WAYMO_CAMERA_TO_OPENCV[:3, 0], [0, -1, 0])
    np.testing.assert_allclose(WAYMO_CAMERA_TO_OPENCV[:3, 1], [0, 0, -1])


def test_sparse_depth_keeps_the_nearest_return_per_pixel():
    from evolsplat_ns.data.layouts.lidar import sparse_depth_map

    K = np.array([[10.0, 0, 5.0], [0, 10.0, 5.0], [0, 0, 1.0]])
    pts = np.array([[0, 0, 5.0], [0, 0, 2.0], [0, 0, 9.0], [0.01, 0.01, 3.0], [0, 0, -1.0], [0.8, 0, 2.0],
                    [1.0, 0, 2.0]])
    d = sparse_depth_map(pts, K, 10, 10)
    assert d.dtype == np.float32 and d.shape == (10, 10)
    assert d[5, 5] == 2.0  # four returns land in pixel (5, 5) (u, v in [5, 6)): the nearest wins; behind: none
    assert d[5, 9] == 2.0  # u = 9.0: the pixel whose left edge it is
    assert (d > 0).sum() == 2  # u = 10.0 is outside a 10-pixel-wide image


def test_drop_n_protocol():
    assert protocol_input_frames(8, "odd") == {0, 2, 4, 6} == protocol_input_frames(8, "Drop50")
    assert protocol_input_frames(8, "Drop25") == {0, 1, 3, 4, 5, 7}
    assert protocol_input_frames(11, "Drop80") == {0, 5, 10}
    assert protocol_input_frames(21, "Drop90") == {0, 10, 20}
    assert protocol_input_frames(5, "none") is None
    with pytest.raises(ConfigError):
        protocol_input_frames(5, "Drop33")


def test_detect_layout(tmp_path):
    write_drivestudio(tmp_path / "ds" / "000", num_frames=2)
    write_pandaset(tmp_path / "pd" / "001", num_frames=2, cams=["front"])
    write_kitti_calib(tmp_path / "2011_09_26")
    write_kitti_drive(tmp_path / "2011_09_26", num_frames=2)
    write_reference(tmp_path / "ref" / "seq_00", num_frames=2)
    write_scene(tmp_path / "ms" / "scene_000", num_frames=2, num_cams=1)
    assert detect_layout(tmp_path / "ds" / "000") == "drivestudio"
    assert detect_layout(tmp_path / "pd" / "001") == "pandaset"
    assert detect_layout(tmp_path / "2011_09_26" / "2011_09_26_drive_0001_sync") == "kitti-raw"
    assert detect_layout(tmp_path / "ref" / "seq_00") == "reference"
    assert detect_layout(tmp_path / "ms" / "scene_000") == "multiscene"
    assert detect_layout(tmp_path) is None
    assert find_layout_scenes(tmp_path / "2011_09_26") == [
        (tmp_path / "2011_09_26" / "2011_09_26_drive_0001_sync", "kitti-raw")]
    with pytest.raises(DataValidationError, match="pandaset"):
        find_layout_scenes(tmp_path / "ds", "pandaset")
    with pytest.raises(DataValidationError, match="transforms.json"):
        find_layout_scenes(tmp_path / "2011_09_26" / "2011_09_26_drive_0001_sync" / "oxts")


# ----------------------------------------------------------------------------------------------------------------
# DriveStudio
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drivestudio_waymo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_waymo")
    truth = write_drivestudio(root / "000", num_frames=12, cams=(0, 1, 2), depth=True)
    return root, truth


def test_drivestudio_waymo_geometry(drivestudio_waymo):
    root, truth = drivestudio_waymo
    scene = load_one(root, depth_source="lidar")
    assert scene.metadata["layout"] == "drivestudio" and scene.metadata["drivestudio_style"] == "waymo"
    assert scene.metadata["camera_names"] == ["front", "front_left", "front_right"]
    check_truth(scene, truth)
    hits = check_markers(scene)
    assert all(h > 0 for h in hits.values()), hits  # every camera sees some marker
    check_marker_depth(scene)
    check_consecutive_depth(scene, scene.metadata[DEPTH_PROVIDER_KEY])
    assert all(r.depth_path is None for r in scene.images)  # depth_source=lidar ignores the files


def test_drivestudio_depth_files_and_sky(drivestudio_waymo):
    from evolsplat_ns.pointcloud.filters import read_mask, sky_from_mask

    root, _ = drivestudio_waymo
    scene = load_one(root)  # auto: the .npy depth files where present
    assert all(r.depth_path is not None and r.depth_path.suffix == ".npy" for r in scene.images)
    check_consecutive_depth(scene, lambda r: read_depth(r.depth_path), min_pairs=1000)
    assert scene.sky_mask_convention == SKY_255_IS_SKY
    provider = scene.metadata[DEPTH_PROVIDER_KEY]
    for rec in scene.frame_images(4):
        sky = sky_from_mask(read_mask(rec.sky_mask_path), scene.sky_mask_convention)
        assert 0 < sky.mean() < 0.9
        assert (read_depth(rec.depth_path)[sky] == 0).all()  # nothing at depth in the sky
        # no LiDAR return in the sky, but for floating markers and wall tops straddling a pixel's edge
        from scipy.ndimage import binary_dilation

        deep_sky = sky & ~binary_dilation(~sky, iterations=1)
        assert (provider(rec)[deep_sky] > 0).sum() <= NM
        img = read_image(rec.image_path).astype(int)
        assert np.abs(img[sky] - np.array([135, 206, 235])).max(axis=1).mean() < 20  # sky pixels are sky blue


@pytest.mark.parametrize("style", ["nuscenes", "pandaset"])
def test_drivestudio_per_frame_extrinsics_styles(tmp_path, style):
    truth = write_drivestudio(tmp_path / "003", num_frames=6, cams=(0, 1), style=style, sky=False)
    scene = load_one(tmp_path / "003")
    assert scene.metadata["drivestudio_style"] == style
    check_truth(scene, truth)
    check_markers(scene, min_hits=5)
    assert all(r.sky_mask_path is None for r in scene.images)
    (tmp_path / "003" / "lidar" / "002.bin").unlink()  # a missing sweep: warned, the other frames keep theirs
    scene = load_one(tmp_path / "003")
    assert scene.lidar_paths[2] is None and len(scene.metadata["lidar_loader"](2)) == 0
    assert not scene.metadata[DEPTH_PROVIDER_KEY](scene.image(2, 0)).any()
    assert scene.metadata[DEPTH_PROVIDER_KEY](scene.image(1, 0)).any()


def test_drivestudio_bad_input_named(tmp_path):
    write_drivestudio(tmp_path / "000", num_frames=3, cams=(0, 1))
    (tmp_path / "000" / "intrinsics" / "1.txt").write_text("1 2\n")
    with pytest.raises(DataValidationError, match=r"intrinsics/1.txt.*fx fy cx cy"):
        load_one(tmp_path)
    write_drivestudio(tmp_path / "001", num_frames=3, cams=(0,))
    with open(tmp_path / "001" / "lidar" / "002.bin", "ab") as f:
        f.write(b"\0" * 8)  # a truncated / foreign sweep: not whole 14-column rows
    with pytest.raises(DataValidationError, match=r"002.bin.*14 values"):
        load_one(tmp_path / "001")
    with pytest.raises(DataValidationError, match=r"cameras.*0=front"):
        load_one(tmp_path / "001", cameras=("back",))
    write_drivestudio(tmp_path / "002", num_frames=2, cams=(0, 3))
    for p in [*(tmp_path / "002").glob("images/*_3.jpg"), *(tmp_path / "002").glob("sky_masks/*_3.png")]:
        Image.open(p).resize((64, 30)).save(p)  # as Waymo's side cameras: 1920x886, the front ones 1920x1280
    with pytest.raises(DataValidationError, match=r"one image size.*64x30: left; 64x40: front"):
        load_one(tmp_path / "002")
    assert load_one(tmp_path / "002", cameras=("front",)).camera_ids == [0]


# ----------------------------------------------------------------------------------------------------------------
# PandaSet
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pandaset_seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("pandaset")
    truth = write_pandaset(root / "001", num_frames=10)
    return root, truth


def test_pandaset_geometry(pandaset_seq):
    root, truth = pandaset_seq
    scene = load_one(root, lidar_cache_dir=root / "cache")
    assert scene.metadata["camera_names"] == ["front", "front_left", "front_right", "left", "right", "back"]
    assert scene.sky_mask_convention == SKY_255_IS_SKY and all(r.sky_mask_path is None for r in scene.images)
    check_truth(scene, truth)
    hits = check_markers(scene)
    assert hits[5] > 0 and hits[0] > 0  # back and front cameras both see markers
    check_marker_depth(scene)
    check_consecutive_depth(scene, scene.metadata[DEPTH_PROVIDER_KEY])
    # LiDAR depth maps were cached (atomic writes; a second read comes from the cache and is identical)
    rec = scene.image(2, 0)
    d1 = scene.metadata[DEPTH_PROVIDER_KEY](rec)
    files = list((root / "cache").rglob("*.npz"))
    assert files and not list((root / "cache").rglob(".tmp-*"))
    again = load_one(root, lidar_cache_dir=root / "cache")
    np.testing.assert_array_equal(again.metadata[DEPTH_PROVIDER_KEY](again.image(2, 0)), d1)


def test_pandaset_time_alignment_and_sensor(pandaset_seq):
    root, _ = pandaset_seq
    scene = load_one(root, cameras=("front", "back"))
    assert scene.camera_ids == [0, 5]
    src = scene.metadata["lidar_source"]
    for t in range(scene.num_frames):
        for c in (0, 5):
            assert src.sweep_for(t, c) == t  # camera t fires within a few ms of sweep t
    tight = load_one(root, cameras=("back",), lidar_max_time_offset=0.001)  # back camera is 20 ms off
    assert tight.metadata["lidar_source"].sweep_for(3, 5) is None
    assert not tight.metadata[DEPTH_PROVIDER_KEY](tight.image(3, 5)).any()
    spin = load_one(root, cameras=("front",), pandaset_lidar="spinning")
    assert len(spin.metadata["lidar_loader"](0)) < len(scene.metadata["lidar_loader"](0))
    assert np.allclose(spin.metadata["lidar_loader"](0)[:NM], scene.metadata["lidar_loader"](0)[:NM])


def test_pandaset_missing_sweep_is_tolerated(tmp_path, caplog):
    from evolsplat_ns.data.scene_index import Segment
    from evolsplat_ns.pointcloud.generators import LidarRGBPointCloudGenerator

    write_pandaset(tmp_path / "002", num_frames=6, cams=["front", "front_left"], missing_sweeps=(3,))
    with caplog.at_level(logging.WARNING):
        scene = load_one(tmp_path)
    assert "missing" in caplog.text and "frames [3]" in caplog.text
    assert scene.lidar_paths[3] is None and len(scene.metadata["lidar_loader"](3)) == 0
    assert not scene.metadata[DEPTH_PROVIDER_KEY](scene.image(3, 0)).any()  # nearest sweeps are 0.1 s away
    assert scene.metadata[DEPTH_PROVIDER_KEY](scene.image(2, 0)).any()
    seg = Segment(scene_id=0, segment_id=0, keyframe_indices=(0,), frame_indices=tuple(range(6)),
                  aabb=((-40.0, -20.0, -40.0), (40.0, 20.0, 60.0)))
    gen = LidarRGBPointCloudGenerator(outlier_removal=False, use_bbx=False, filter_sky=False)
    pts, cols = gen.generate_pointcloud(scene, seg)
    assert len(pts) > 1000 and cols.shape == pts.shape
    # a cache with the whole scene decoded still works (missing sweep -> zeros for that frame's depth)
    arrays = SceneCache(1).get(scene)
    assert arrays.depth is not None and not arrays.depth[3].any() and arrays.depth[2].any()


# ----------------------------------------------------------------------------------------------------------------
# KITTI raw
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kitti_date(tmp_path_factory):
    date = tmp_path_factory.mktemp("kitti") / "2011_09_26"
    write_kitti_calib(date)
    truth = write_kitti_drive(date, num_frames=12)
    return date, truth


def test_kitti_raw_geometry(kitti_date):
    date, truth = kitti_date
    scene = load_one(date)
    assert scene.camera_ids == [2, 3] and scene.front_camera_id == 2
    assert scene.metadata["camera_names"] == ["image_02", "image_03"]
    check_truth(scene, truth, atol_t=1e-4, atol_r=1e-5)
    hits = check_markers(scene)
    assert hits[2] > 0 and hits[3] > 0
    check_marker_depth(scene)
    check_consecutive_depth(scene, scene.metadata[DEPTH_PROVIDER_KEY])
    # the right camera is ~0.54 m to the right of the left one (stereo baseline), same orientation
    r = np.linalg.inv(scene.image(0, 2).c2w) @ scene.image(0, 3).c2w
    assert r[0, 3] == pytest.approx(0.537, abs=0.01) and abs(r[1, 3]) < 0.01 and abs(r[2, 3]) < 0.01


def test_kitti_raw_without_timestamps_and_camera_choice(tmp_path):
    date = tmp_path / "2011_09_28"
    write_kitti_calib(date)
    write_kitti_drive(date, drive="0002", num_frames=3, timestamps=False)
    scene = load_one(date, cameras=("image_03",))
    assert scene.camera_ids == [3] and scene.front_camera_id == 3
    np.testing.assert_allclose(scene.image(0, 3).c2w, np.eye(4), atol=1e-9)
    assert scene.metadata[DEPTH_PROVIDER_KEY](scene.image(1, 3)).any()  # paired by index
    (date / "calib_velo_to_cam.txt").write_text("calib_time: x\nR: 1 0 0\nT: 0 0 0\n")
    with pytest.raises(DataValidationError, match=r"calib_velo_to_cam.txt.*'R'.*9 numbers"):
        load_one(date)


# ----------------------------------------------------------------------------------------------------------------
# the reference's preprocessed scenes
# ----------------------------------------------------------------------------------------------------------------


def test_reference_kitti360_scene(tmp_path):
    from evolsplat_ns.pointcloud.plyio import read_ply

    truth = write_reference(tmp_path / "seq_00_nerfacto_0094_12", first_frame=94, num_frames=12)
    scene = load_one(tmp_path)
    assert scene.metadata["layout"] == "reference" and scene.camera_ids == [0, 1]
    assert [r.timestep for r in scene.images[::2]] == list(range(94, 106))  # time order, not name order
    # poses: back in the dataset's original world through inv_pose
    orig = scene.metadata["original_world_from_data"]
    for rec in scene.images:
        np.testing.assert_allclose(orig @ to_data_world(scene, rec), truth.c2w[(rec.frame_index, rec.camera_id)],
                                   atol=1e-6)
    assert all(r.depth_path.stem == r.image_path.stem for r in scene.images)
    # sky: the reference's label maps, 10 = sky, exactly where the depth is empty
    from evolsplat_ns.pointcloud.filters import read_mask, sky_from_mask

    assert scene.sky_mask_convention == "label_10_is_sky"
    for rec in scene.frame_images(3):
        sky = sky_from_mask(read_mask(rec.sky_mask_path), scene.sky_mask_convention)
        assert sky.any() and (sky == (read_depth(rec.depth_path) == 0)).all()
    check_consecutive_depth(scene, lambda r: read_depth(r.depth_path), min_pairs=500)
    # the seed cloud (normalised frame) lands on the painted markers through align
    assert scene.seed_ply_path.name == "94.ply" and scene.seed_ply_path.parent.name == "Drop50"
    pts, _ = read_ply(scene.seed_ply_path)
    A = np.asarray(scene.align)
    markers = pts[:NM].astype(np.float64) @ A[:3, :3].T + A[:3, 3]
    scene.metadata["lidar_loader"] = lambda t: markers  # reuse the marker check on the seed cloud
    check_markers(scene, min_hits=5, tol=10)


def test_reference_waymo_scene_and_drop50(tmp_path):
    from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig

    write_reference(tmp_path / "a", first_frame=80, num_frames=6, two_cameras=False)
    write_reference(tmp_path / "b", first_frame=80, num_frames=6, two_cameras=False)
    cfg = EvolSplatDataParserConfig(data=tmp_path)
    parser = cfg.setup()
    scenes = parser.scenes()
    assert [s.camera_ids for s in scenes] == [[0], [0]] and scenes[1].images[0].timestep == 80
    assert parser.split() == ([0], [1])
    assert parser.input_frames(scenes[1]) == {0, 2, 4}  # Drop50: even timesteps in, odd ones tested
    assert parser.input_frames(scenes[0]) is None
    cfg2 = EvolSplatDataParserConfig(data=tmp_path, eval_holdout="Drop80", layout="reference")
    assert cfg2.setup().input_frames(scenes[1]) == {0, 5}


# ----------------------------------------------------------------------------------------------------------------
# every layout: down-scaling, camera choice, multiscene options
# ----------------------------------------------------------------------------------------------------------------


def test_downscale_on_load(pandaset_seq):
    root, truth = pandaset_seq
    full = load_one(root, cameras=("front", "front_left"))
    half = load_one(root, cameras=("front", "front_left"), downscale=2)
    for a, b in zip(full.images, half.images):
        assert (b.width, b.height) == (48, 27) and b.native_size == (96, 54)
        np.testing.assert_allclose(b.K[:2], a.K[:2] * np.array([[0.5], [0.5]]), atol=1e-12)
        np.testing.assert_allclose(b.c2w, a.c2w)
    arrays = SceneCache(1).get(half)
    assert tuple(arrays.images.shape) == (half.num_frames, 2, 27, 48, 3)
    assert tuple(arrays.depth.shape) == (half.num_frames, 2, 27, 48)
    check_markers(half)
    check_marker_depth(half)
    with pytest.raises(ConfigError, match="downscale"):
        load_one(root, downscale=0.5)


def test_multiscene_layout_camera_choice_and_downscale(tmp_path):
    write_scene(tmp_path / "scene_000", num_frames=4, num_cams=3, size=(16, 24))
    sc = load_one(tmp_path, cameras=("1", "2"))
    assert sc.camera_ids == [1, 2] and sc.front_camera_id == 1
    np.testing.assert_allclose(sc.image(0, 1).c2w, np.eye(4), atol=1e-12)  # project frame moved to camera 1
    small = load_one(tmp_path, downscale=2)
    arrays = SceneCache(1).get(small)
    assert tuple(arrays.images.shape[2:]) == (8, 12, 3) and tuple(arrays.depth.shape[2:]) == (8, 12)
    assert float(arrays.depth[0, 1].mean()) == pytest.approx(6.0)  # depth resized, not mixed


# ----------------------------------------------------------------------------------------------------------------
# CLIs
# ----------------------------------------------------------------------------------------------------------------


def _dm_config(layout="auto", **kw):
    from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig

    cfg = EvolSplatDataManagerConfig(keyframe_min_length=1.0, min_keyframes_per_scene=6, keyframes_per_segment=6,
                                     min_keyframes_per_segment=6, num_source_keyframes=2, num_target_keyframes=2)
    cfg.dataparser.layout = layout
    for k, v in kw.items():
        setattr(cfg.dataparser, k, v)
    return cfg


@pytest.mark.parametrize("which", ["drivestudio", "pandaset", "kitti-raw", "reference"])
def test_inspect_and_pointcloud_cli_on_every_layout(which, tmp_path, drivestudio_waymo, pandaset_seq, kitti_date):
    from evolsplat_ns.cli.inspect import InspectArgs, inspect_data
    from evolsplat_ns.cli.pointcloud import PointCloudArgs, run
    from evolsplat_ns.pointcloud.options import PointCloudOptions

    if which == "drivestudio":
        data, extra = drivestudio_waymo[0], {}
    elif which == "pandaset":
        data, extra = pandaset_seq[0], {"cameras": ("front", "front_left", "front_right")}
    elif which == "kitti-raw":
        data, extra = kitti_date[0], {}
    else:
        write_reference(tmp_path / "ref" / "seq_00", num_frames=12)
        data, extra = tmp_path / "ref", {}
    summary = inspect_data(InspectArgs(data=data, datamanager=_dm_config(which, **extra)))
    assert summary["scenes"][0]["role"] == "train" and summary["scenes"][0]["segments"]
    assert summary["scenes"][0]["layout"] == which and summary["scenes"][0]["lidar"] == (which != "reference")
    b = summary["sample_batch"]
    assert b["source"]["image"][0] == 2 * summary["scenes"][0]["num_cameras"]
    generators = ["depth"] if which == "reference" else ["lidar", "depth"]
    for gen in generators:
        out = tmp_path / f"{gen}.ply"
        res = run(PointCloudArgs(data=data, scene=0, segment=0, out=out, quiet=True, cache_dir=tmp_path / "pc",
                                 pointcloud=PointCloudOptions(generator=gen, downscale=1),
                                 datamanager=_dm_config(which, **extra)))
        assert out.exists() and res[0]["points"] > 100, (gen, res)


def test_kitti_raw_crop_keeps_each_frame_its_own_timestamp(tmp_path):
    """A crop of a drive (frames 2-4 kept, timestamps.txt whole, as KITTI ships it): frame k takes line k of
    timestamps.txt, not the k-th line among the kept files (which would shift every time by two frames)."""
    from evolsplat_ns.data.layouts.kitti_raw import read_timestamps

    date = tmp_path / "2011_09_26"
    write_kitti_calib(date)
    write_kitti_drive(date, num_frames=5)
    d = date / "2011_09_26_drive_0001_sync"
    for f in d.glob("*/data/000000000[01].*"):
        f.unlink()
    scene = load_one(date)
    every = read_timestamps(d / "image_02" / "timestamps.txt", range(5))
    kept = [scene.metadata["timestamps"][(t, 2)] for t in range(3)]
    assert kept == every[2:] and kept != every[:3]
    missing = d / "image_03" / "timestamps.txt"
    missing.write_text("\n".join(missing.read_text().splitlines()[:4]) + "\n")  # no line for frame 4
    with pytest.raises(DataValidationError, match="up to frame 4"):
        load_one(date)
