"""Plausibility of input values (issue 18): intrinsics, image bit depth, depth units and bit depth, image size,
timestamps against the poses."""

import json
import logging
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from evolsplat_ns.data import plausibility
from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.data.layouts import LayoutOptions, load_layout_scenes
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


# ------------------------------------------------------------------------------------------------ image size

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=80, **SETTINGS)
@given(h=st.integers(1, 40), w=st.integers(1, 40), downscale=st.sampled_from([1.0, 2.0, 7.5]))
def test_image_size_minimum_is_the_smallest_ssim_window(h, w, downscale):
    from evolsplat_ns.model.evolsplat import _ssim_window

    assert plausibility.ssim_window(h, w) == _ssim_window(h, w)  # the check and the model agree
    if min(h, w) >= plausibility.MIN_IMAGE_SIDE:
        plausibility.check_image_size(None, "image size", w, h, downscale, (w * 8, h * 8))
        assert plausibility.ssim_window(h, w) <= min(h, w)  # the window fits: SSIM is well defined
        return
    with pytest.raises(DataValidationError) as e:
        plausibility.check_image_size(None, "image size", w, h, downscale, (w * 8, h * 8))
    msg = str(e.value)
    assert f"got {w}x{h} px" in msg and "at least 3x3 px" in msg and "the usual SSIM needs 11x11" in msg
    assert (f"after downscale {downscale:g} of {w * 8}x{h * 8}" in msg) == (downscale != 1.0)


def test_images_too_small_after_downscale_are_an_error_at_start_up(tmp_path, caplog):
    scene = write_scene(tmp_path / "s", num_frames=6, num_cams=1, size=(16, 24))
    with pytest.raises(DataValidationError) as e:
        load_layout_scenes(scene, LayoutOptions(downscale=7))  # 24x16 -> 3x2
    msg = str(e.value)
    assert msg.startswith(str(scene / "images")) and "field 'image size'" in msg
    assert "expected an image of at least 3x3 px" in msg and "got 3x2 px after downscale 7 of 24x16" in msg
    with caplog.at_level(logging.WARNING, logger="evolsplat_ns.data.plausibility"):
        load_layout_scenes(scene, LayoutOptions(downscale=2))  # 12x8: trains, with a 7 px SSIM window
    assert "images of 12x8 px" in caplog.text and "use a 7 px window" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evolsplat_ns.data.plausibility"):
        load_layout_scenes(scene, LayoutOptions())
    assert caplog.text == ""  # 24x16: the usual window


# ------------------------------------------------------------------------------------------------ timestamps


@settings(max_examples=150, **SETTINGS)
@given(steps=st.lists(st.floats(1e-3, 5.0), min_size=1, max_size=12), t0=st.floats(0, 2e9),
       fault=st.sampled_from(["none", "nan", "inf", "repeat", "back", "missing", "extra"]), at=st.integers(0, 100))
def test_timestamps_one_per_pose_finite_and_strictly_increasing(steps, t0, fault, at):
    times = [t0]
    for d in steps:
        times.append(times[-1] + d)
    times = [t for i, t in enumerate(times) if i == 0 or t > times[i - 1]]  # steps lost to rounding at large t0
    n = len(times)
    k = at % n
    num_poses = n
    if fault == "nan":
        times[k] = math.nan
    elif fault == "inf":
        times[k] = math.inf
    elif fault in ("repeat", "back"):
        k = max(1, k)
        if n < 2:
            return
        times[k] = times[k - 1] - (0.0 if fault == "repeat" else 0.05)
    elif fault == "missing":
        times[k] = None
    elif fault == "extra":
        num_poses = n + 1

    def field_of(i):
        return f"[{i}]"

    if fault == "none":
        plausibility.check_timestamps(None, field_of, times, num_poses, ", camera front")
        return
    with pytest.raises(DataValidationError) as e:
        plausibility.check_timestamps(None, field_of, times, num_poses, ", camera front")
    msg = str(e.value)
    if fault in ("missing", "extra"):
        assert f"expected one timestamp per pose ({num_poses}, camera front)" in msg
        assert f"got {n - 1 if fault == 'missing' else n}" in msg
    elif fault in ("nan", "inf"):
        assert f"field '[{k}]'" in msg and f"a finite time in seconds (frame {k}, camera front)" in msg
    else:
        assert f"field '[{k}]'" in msg
        assert f"strictly increasing in frame order (frame {k}, camera front: after frame {k - 1} at" in msg


@settings(max_examples=100, **SETTINGS)
@given(speeds=st.lists(st.floats(0.0, plausibility.MAX_VEHICLE_SPEED_MPS * 0.99), min_size=1, max_size=15),
       dts=st.data(), fast_at=st.integers(0, 100), factor=st.sampled_from([1.02, 10.0, 1000.0]))
def test_motion_faster_than_a_vehicle_names_the_frame(speeds, dts, fast_at, factor):
    rng = np.random.default_rng(len(speeds))
    dt = np.array(dts.draw(st.lists(st.floats(0.02, 2.0), min_size=len(speeds), max_size=len(speeds))))
    dirs = rng.normal(size=(len(speeds), 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    start = np.array([5e5, 4e6, 10.0])  # UTM-like
    centers = np.concatenate([start[None], start + np.cumsum(dirs * (np.array(speeds) * dt)[:, None], 0)])
    times = np.concatenate([[1.6e9], 1.6e9 + np.cumsum(dt)])
    assert plausibility.implausible_motion(times, centers) == []
    k = fast_at % len(speeds)
    d = dt[k] * plausibility.MAX_VEHICLE_SPEED_MPS * factor  # one move too fast for its interval
    centers[k + 1:] += dirs[k] * (d - speeds[k] * dt[k])
    (frame, speed, dist, interval), = plausibility.implausible_motion(times, centers)
    # UNIX seconds in float64 carry about 2e-7 s: the interval and the speed to that
    assert frame == k + 1 and speed == pytest.approx(plausibility.MAX_VEHICLE_SPEED_MPS * factor, rel=1e-4)
    assert dist == pytest.approx(d, rel=1e-6) and interval == pytest.approx(dt[k], abs=1e-6)


@pytest.mark.parametrize("median, hint", [(0.1, None), (1 / 30, None), (100.0, "milliseconds"),
                                          (1e5, "microseconds"), (1e8, "nanoseconds"), (1e-4, "larger than seconds")])
def test_frame_interval_hint(median, hint):
    got = plausibility.interval_hint(median)
    assert got is None if hint is None else hint in got


@pytest.fixture(scope="module")
def pandaset_front(tmp_path_factory):
    from layout_fixtures import write_pandaset

    seq = tmp_path_factory.mktemp("pandaset") / "001"
    write_pandaset(seq, num_frames=5, cams=("front",))  # 1.2 m per 0.1 s: 12 m/s
    return seq


def _edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_pandaset_timestamps_checked_against_the_poses(pandaset_front, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="evolsplat_ns.data.plausibility"):
        load_layout_scenes(pandaset_front, LayoutOptions())
    assert caplog.text == ""  # a car at 12 m/s, 10 Hz: nothing to say
    cam = "camera/front_camera"

    out_of_order = shutil.copytree(pandaset_front, tmp_path / "order")
    _edit_json(out_of_order / cam / "timestamps.json", lambda t: t[:2] + [t[3], t[2]] + t[4:])
    with pytest.raises(DataValidationError) as e:
        load_layout_scenes(out_of_order, LayoutOptions())
    msg = str(e.value)
    assert msg.startswith(str(out_of_order / cam / "timestamps.json") + ": field '[3]'")
    assert "strictly increasing in frame order (frame 3, camera front: after frame 2 at 1557539924.3 s)" in msg

    millis = shutil.copytree(pandaset_front, tmp_path / "ms")
    _edit_json(millis / cam / "timestamps.json", lambda t: [x * 1000.0 for x in t])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evolsplat_ns.data.plausibility"):
        load_layout_scenes(millis, LayoutOptions())  # a warning, not an error
    assert str(millis / cam / "timestamps.json") in caplog.text
    assert "median time between frames of camera front is 100 s" in caplog.text and "milliseconds?" in caplog.text

    jump = shutil.copytree(pandaset_front, tmp_path / "jump")

    def teleport(poses):  # frames 3, 4 are 20 m further on: 200 m/s between frames 2 and 3
        for p in poses[3:]:
            p["position"]["x"] += 20.0
        return poses
    _edit_json(jump / cam / "poses.json", teleport)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evolsplat_ns.data.plausibility"):
        load_layout_scenes(jump, LayoutOptions())
    text = caplog.text
    assert str(jump / cam / "timestamps.json") in text and "frame 3 (camera front, 03.jpg)" in text
    assert "implied speed" in text and "m/s" in text and "after frame 2" in text
    assert "expected at most 70 m/s (252 km/h) for a vehicle" in text and "1 frame pair(s) of 1 camera(s)" in text
    speed = float(text.split("implied speed ")[1].split(" m/s")[0])
    assert 150 < speed < 250


def test_kitti_timestamps_named_by_line(tmp_path):
    from layout_fixtures import write_kitti_calib, write_kitti_drive

    date = tmp_path / "2011_09_26"
    write_kitti_calib(date)
    write_kitti_drive(date, num_frames=4)
    stamps = date / "2011_09_26_drive_0001_sync" / "image_03" / "timestamps.txt"
    lines = stamps.read_text().splitlines()
    stamps.write_text("\n".join(lines[:2] + [lines[1]] + lines[3:]) + "\n")  # frame 2 repeats frame 1's time
    with pytest.raises(DataValidationError) as e:
        load_layout_scenes(date, LayoutOptions())
    msg = str(e.value)
    assert msg.startswith(f"{stamps}: field 'line 3': expected timestamps strictly increasing in frame order "
                          "(frame 2, camera image_03: after frame 1 at")
