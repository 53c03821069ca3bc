"""Dataparser: parsing, the camera convention at the boundary, and validation errors that name file + field."""

import json

import numpy as np
import pytest
from PIL import Image

from evolsplat_ns.cameras import opencv_to_opengl, opengl_to_opencv
from evolsplat_ns.data.dataparser import find_scene_dirs, load_scenes, parse_scene, split_scene_ids
from evolsplat_ns.errors import DataValidationError
from scene_fixtures import camera_pose, write_root, write_scene


def test_parse_scene_grid_and_relative_opencv_poses(tmp_path):
    d = write_scene(tmp_path / "s", num_frames=5, num_cams=3)
    sc = parse_scene(d, 7)
    assert sc.scene_id == 7 and sc.num_frames == 5 and sc.camera_ids == [0, 1, 2]
    assert len(sc.images) == 15
    assert [(r.frame_index, r.camera_id) for r in sc.images[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    first = sc.image(0, 0)
    np.testing.assert_allclose(first.c2w, np.eye(4), atol=1e-12)  # relative to the first front camera
    # Frame 3 front camera is 3 m ahead: in the first camera's OpenCV frame that is +z.
    np.testing.assert_allclose(sc.image(3, 0).c2w[:3, 3], [0, 0, 3.0], atol=1e-9)
    # Relative rotation of the left camera: yawed 50 deg left -> its forward axis has negative x in cam-0 frame.
    fwd = sc.image(0, 1).c2w[:3, 2]
    assert fwd[0] < -0.7 and abs(fwd[1]) < 1e-9
    # align maps data-world points to the project frame, consistently with the poses.
    T0 = camera_pose(0.0)
    np.testing.assert_allclose(sc.align @ T0, np.eye(4), atol=1e-12)
    assert first.K[0, 0] == pytest.approx(24 * 0.8) and first.width == 24 and first.height == 16


def test_gl_cv_conversion_is_an_involution():
    T = camera_pose(2.0, 30.0)
    np.testing.assert_allclose(opengl_to_opencv(opencv_to_opengl(T)), T)
    # OpenGL camera looks down its -z axis; OpenCV down +z.
    np.testing.assert_allclose(opencv_to_opengl(T)[:3, 2], -T[:3, 2])


def test_root_of_scenes_and_single_scene(tmp_path):
    write_root(tmp_path / "root", num_scenes=3, num_frames=3)
    assert [p.name for p in find_scene_dirs(tmp_path / "root")] == ["scene_000", "scene_001", "scene_002"]
    assert len(find_scene_dirs(tmp_path / "root" / "scene_001")) == 1
    scenes = load_scenes(tmp_path / "root", scene_ids=[2])
    assert scenes[0].scene_id == 2 and scenes[0].name == "scene_002"


def test_split_defaults_and_range(tmp_path):
    assert split_scene_ids(4, None, None, tmp_path) == ([0, 1, 2], [3])
    assert split_scene_ids(1, None, None, tmp_path) == ([0], [])
    assert split_scene_ids(4, (0, 1), (2,), tmp_path) == ([0, 1], [2])
    with pytest.raises(DataValidationError, match="eval_scene_ids.*\\[0, 3\\]"):
        split_scene_ids(4, None, (9,), tmp_path)


def _err(tmp_path, mutate=None, after=None, **kw):
    d = write_scene(tmp_path / "s", num_frames=3, num_cams=2, mutate=mutate, **kw)
    if after:
        after(d)
    with pytest.raises(DataValidationError) as ei:
        parse_scene(d, 0)
    return str(ei.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataValidationError, match="existing data folder"):
        find_scene_dirs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="empty folder"):
        find_scene_dirs(tmp_path / "empty")
    (tmp_path / "noscenes" / "a").mkdir(parents=True)
    with pytest.raises(DataValidationError, match="transforms.json"):
        find_scene_dirs(tmp_path / "noscenes")


def test_malformed_json(tmp_path):
    msg = _err(tmp_path, after=lambda d: (d / "transforms.json").write_text("{ not json"))
    assert "transforms.json" in msg and "valid JSON" in msg and "line 1" in msg


def test_missing_image_names_file_and_field(tmp_path):
    msg = _err(tmp_path, after=lambda d: (d / "images" / "001_1.png").unlink())
    assert "001_1.png" in msg and "frames[3].file_path" in msg and "missing" in msg


def test_unreadable_image(tmp_path):
    msg = _err(tmp_path, after=lambda d: (d / "images" / "000_0.png").write_bytes(b"garbage"))
    assert "000_0.png" in msg and "readable image" in msg


def test_image_size_mismatch(tmp_path):
    msg = _err(tmp_path, after=lambda d: Image.new("RGB", (30, 16)).save(d / "images" / "002_0.png"))
    assert "002_0.png" in msg and "24x16" in msg and "30x16" in msg


def test_missing_intrinsics(tmp_path):
    msg = _err(tmp_path, mutate=lambda m: m.pop("fl_x"))
    assert "frames[0].fl_x" in msg


def test_non_finite_and_non_rigid_pose(tmp_path):
    def nan(m):
        m["frames"][2]["transform_matrix"][0][3] = float("nan")

    assert "frames[2].transform_matrix" in _err(tmp_path / "a", mutate=nan)

    def skew(m):
        m["frames"][1]["transform_matrix"][0][0] = 3.0

    msg = _err(tmp_path / "b", mutate=skew)
    assert "frames[1].transform_matrix" in msg and "rigid" in msg


def test_depth_and_sky_shape(tmp_path):
    msg = _err(tmp_path / "a", after=lambda d: np.save(d / "depth" / "001_0.npy", np.zeros((5, 5), np.float32)))
    assert "001_0.npy" in msg and "depth_file_path" in msg
    msg = _err(tmp_path / "b", after=lambda d: Image.new("L", (3, 3)).save(d / "sky_masks" / "000_1.png"))
    assert "000_1.png" in msg and "sky_mask_path" in msg


def test_missing_camera_at_a_timestep(tmp_path):
    def drop(m):
        m["frames"] = [f for f in m["frames"] if not (f["timestep"] == 1 and f["camera"] == 1)]

    msg = _err(tmp_path, mutate=drop)
    assert "camera 1 at timestep 1" in msg


def test_timestep_required_with_several_cameras(tmp_path):
    def drop_ts(m):
        del m["frames"][0]["timestep"]

    assert "frames[0].timestep" in _err(tmp_path, mutate=drop_ts)


def test_missing_transforms(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataValidationError, match="transforms.json"):
        parse_scene(tmp_path / "x", 0)


def test_bad_sky_convention(tmp_path):
    msg = _err(tmp_path, mutate=lambda m: m.update(sky_mask_convention="white"))
    assert "sky_mask_convention" in msg


def test_per_frame_intrinsics_override(tmp_path):
    def per_frame(m):
        m["frames"][0]["fl_x"] = 99.0

    d = write_scene(tmp_path / "s", num_frames=2, num_cams=1, mutate=per_frame)
    sc = parse_scene(d, 0)
    assert sc.image(0, 0).K[0, 0] == 99.0 and sc.image(1, 0).K[0, 0] == pytest.approx(24 * 0.8)
