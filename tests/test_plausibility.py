"""Plausibility of input values (issue 18): intrinsics, image bit depth, depth units and bit depth."""

import json

import numpy as np
import pytest
from PIL import Image

from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.data.plausibility import check_intrinsics, image_to_rgb8
from evolsplat_ns.data.views import read_depth, read_image
from evolsplat_ns.errors import DataValidationError
from scene_fixtures import write_scene


@pytest.mark.parametrize("change, field, words", [
    ({"fl_x": 0.8}, "fl_x", "normalised units"),  # a focal length in normalised units
    ({"fl_y": 1e6}, "fl_y", "0.0 degrees"),
    ({"cx": 0.5}, "cx", "normalised"),
    ({"cy": -3.0}, "cy", "inside the image"),
])
def test_implausible_intrinsics_name_field_value_and_meaning(tmp_path, change, field, words):
    scene = write_scene(tmp_path / "s", num_frames=6, num_cams=1, size=(16, 24))
    tf = scene / "transforms.json"
    meta = json.loads(tf.read_text())
    for fr in meta["frames"]:
        fr.update(change)
    meta.update(change)
    tf.write_text(json.dumps(meta))
    with pytest.raises(DataValidationError) as e:
        parse_scene(scene, 0)
    msg = str(e.value)
    assert "transforms.json" in msg and field in msg and words in msg


def test_plausible_intrinsics_pass():
    check_intrinsics(None, "frames[0]", 1000.0, 1000.0, 960.0, 540.0, 1920, 1080)  # 88 degrees
    check_intrinsics(None, "frames[0]", 300.0, 300.0, 200.0, 800.0, 1920, 1080)  # wide; principal point off centre


@pytest.mark.parametrize("mode, value, want", [("I;16", 30000, 117), ("I;16", 65535, 255), ("L", 77, 77)])
def test_greyscale_and_16_bit_images_are_scaled_not_clipped(tmp_path, mode, value, want):
    path = tmp_path / "img.png"
    arr = np.full((6, 8), value, dtype=np.uint16 if mode == "I;16" else np.uint8)
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I") or im.mode == "L"
    rgb = read_image(path)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert int(rgb.min()) == int(rgb.max()) == want  # not 255 (white) for a mid-grey 16-bit image


def test_float_image_out_of_range_is_named():
    im = Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32), mode="F")
    with pytest.raises(DataValidationError, match="values in"):
        image_to_rgb8(im, None)


def test_depth_units_and_bit_depths(tmp_path):
    d = np.full((10, 12), 12.5, dtype=np.float32)
    np.save(tmp_path / "ok.npy", d)
    assert np.allclose(read_depth(tmp_path / "ok.npy"), 12.5)
    Image.fromarray((d * 1000).astype(np.uint16)).save(tmp_path / "ok.png")  # millimetres
    assert np.allclose(read_depth(tmp_path / "ok.png"), 12.5)
    np.save(tmp_path / "mm.npy", d * 1000)  # millimetres in a float .npy
    with pytest.raises(DataValidationError, match="median 1.25e\\+04 m.*millimetres"):
        read_depth(tmp_path / "mm.npy")
    np.save(tmp_path / "int.npy", (d * 1000).astype(np.uint16))  # integers
    with pytest.raises(DataValidationError, match="dtype uint16"):
        read_depth(tmp_path / "int.npy")
    Image.fromarray(d.astype(np.uint16)).save(tmp_path / "metres.png")  # a 16-bit PNG in metres
    with pytest.raises(DataValidationError, match="median 0.012 m.*looks like metres"):
        read_depth(tmp_path / "metres.png")
    Image.fromarray(np.full((10, 12), 40, dtype=np.uint8)).save(tmp_path / "eight.png")  # 8-bit depth
    with pytest.raises(DataValidationError, match="8-bit"):
        read_depth(tmp_path / "eight.png")


def test_depth_unit_is_checked_at_start_up(tmp_path):
    scene = write_scene(tmp_path / "s", num_frames=6, num_cams=1, size=(16, 24))
    depth = next((scene / "depth").glob("*.npy"))
    np.save(depth, np.load(depth) * 1000.0)  # one map in millimetres
    with pytest.raises(DataValidationError) as e:
        parse_scene(scene, 0)
    assert depth.name in str(e.value) and "millimetres" in str(e.value)
