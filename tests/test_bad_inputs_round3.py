"""Issue 18, round 3: further bad inputs a new user meets (docs/RELIABILITY.md, "Issue 18, round 3" rows).

Each case goes through the entry point a user runs: the dataparser's set-up (``load_layout_scenes``, what
``evolsplat-ff``'s datamanager calls), the datamanager, ``evolsplat-ns-infer`` / ``evolsplat-ns-pointcloud`` (their
``main``: one ``error:`` line, exit code 2) and, once, ``ns-train`` itself in a subprocess. Bad input is a
:class:`DataValidationError` whose one-line message names the file, the field and what was expected; inputs that
are fine (other image modes, a 3x4 pose, a byte-order mark, ...) load and read correctly; what cannot be checked
without decoding every pixel is checked on a sample at start-up and again when decoded. Set-up only, no training.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layout_fixtures import assert_names, error_of, load
from scene_fixtures import write_root, write_scene


# ------------------------------------------------------------------------------------------------ helpers
def _root(tmp: Path, mutate=None, after=None, **kw) -> Path:
    """A data root with one small scene (2 frames, 1 camera, 24x16, depth and sky masks); ``after(scene_dir)``
    edits its files. Returns the root."""
    kw = {"num_frames": 2, "num_cams": 1, **kw}
    d = write_scene(tmp / "root" / "scene_000", mutate=mutate, **kw)
    if after is not None:
        after(d)
    return tmp / "root"


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG of a signature, an IHDR declaring ``w`` x ``h`` RGB and IEND: a tiny file with a huge header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _empty_ply(path: Path) -> None:
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
                     b"property float z\nend_header\n")


def _pose_scaled(meta):
    T = np.array(meta["frames"][1]["transform_matrix"])
    T[:3, :3] *= 2.0
    meta["frames"][1]["transform_matrix"] = T.tolist()


def _pose_mirrored(meta):
    T = np.array(meta["frames"][1]["transform_matrix"])
    T[:3, 0] *= -1.0
    meta["frames"][1]["transform_matrix"] = T.tolist()


def _mask(d: Path, arr: np.ndarray, name: str = "000_0.png") -> None:
    Image.fromarray(arr).save(d / "sky_masks" / name)


def _colour_mask(d: Path) -> None:
    m = np.zeros((16, 24, 3), np.uint8)
    m[:4] = (70, 130, 180)  # Cityscapes' colour of sky
    _mask(d, m)


def _zero_one_mask(d: Path, name: str = "000_0.png") -> None:
    m = np.zeros((16, 24), np.uint8)
    m[:4] = 1
    _mask(d, m, name)


# ------------------------------------------------------------------------------------------ 1. files named at start-up
def _seed(meta):
    meta["ply_file_path"] = "seed.ply"


START_UP_CASES = {
    # case: (mutate transforms.json, edit files, the file named (relative to the scene), words of the message)
    "text file named .png": (None, lambda d: (d / "images" / "000_0.png").write_text("hello, not an image\n"),
                             "images/000_0.png", ("frames[0].file_path", "a readable image",
                                                  "not an image (starting with b'hello")),
    "depth .npz instead of .npy": (
        lambda m: m["frames"][0].update(depth_file_path="depth/000_0.npz"),
        lambda d: np.savez(d / "depth" / "000_0.npz", depth=np.full((16, 24), 5.0, np.float32)),
        "depth/000_0.npz", ("frames[0].depth_file_path", "a .npy array in metres, or a 16-bit PNG", "not an image")),
    "depth .npy of dtype bool": (None, lambda d: np.save(d / "depth" / "000_0.npy", np.ones((16, 24), bool)),
                                 "depth/000_0.npy", ("depth_file_path", "a float .npy in metres", "dtype bool",
                                                     "a validity mask")),
    "pose with a scale": (_pose_scaled, None, "transforms.json",
                          ("frames[1].transform_matrix", "rigid", "columns of length 2, 2, 2", "a scaled pose")),
    "pose with a mirror": (_pose_mirrored, None, "transforms.json",
                           ("frames[1].transform_matrix", "rigid", "det -1", "a mirror")),
    "camera_model OPENCV_FISHEYE": (lambda m: m.update(camera_model="OPENCV_FISHEYE", k1=0.1), None,
                                    "transforms.json", ("field 'camera_model'", "a pinhole camera model",
                                                        "'OPENCV_FISHEYE'", "undistort")),
    "per-frame camera_model EQUIRECTANGULAR": (lambda m: m["frames"][1].update(camera_model="EQUIRECTANGULAR"), None,
                                               "transforms.json", ("frames[1].camera_model", "'EQUIRECTANGULAR'")),
    "one image in two frames": (lambda m: m["frames"][1].update(file_path=m["frames"][0]["file_path"]), None,
                                "transforms.json", ("frames[1].file_path", "each image in one frame only",
                                                    "'images/000_0.png' again (also frames[0].file_path)")),
    "seed PLY of 0 vertices": (_seed, lambda d: _empty_ply(d / "seed.ply"), "seed.ply",
                               ("ply_file_path", "at least one vertex", "0 vertices")),
    "camera_names a string": (lambda m: m.update(camera_names="front"), None, "transforms.json",
                              ("camera_names", "a list of camera names", "'front'")),
    "image header of 100000x100000 px in 45 bytes": (
        None, lambda d: (d / "images" / "000_0.png").write_bytes(_png_header_only(100000, 100000)),
        "images/000_0.png", ("frames[0].file_path", "decompression-bomb limit", "10000000000 pixels",
                             "a file of 45 bytes")),
    "sky mask in colour (RGB)": (None, _colour_mask, "sky_masks/000_0.png",
                                 ("sky_mask_path", "a greyscale sky mask", "a colour image (RGB",
                                  "RGB (70, 130, 180)", "colour-coded segmentation")),
    "sky mask of 0 and 1": (None, _zero_one_mask, "sky_masks/000_0.png",
                            ("sky_mask_path", "a binary mask of 0 and 255", "values 0, 1 only", "no sky")),
    "sky mask of 0 and 1, 0_is_sky": (lambda m: m.update(sky_mask_convention="0_is_sky"), _zero_one_mask,
                                      "sky_masks/000_0.png", ("0_is_sky", "values 0, 1 only", "all sky")),
}


ALREADY_GOOD = {  # named as they should be before this round: kept so
    "frames: []": (lambda m: m.update(frames=[]), None, "transforms.json",
                   ("field 'frames'", "a non-empty list of frames", "got []")),
    "fl_x NaN": (lambda m: m.update(fl_x=float("nan")), None, "transforms.json",
                 ("field 'fl_x'", "a finite number", "got nan")),
    "timestep a float": (lambda m: m["frames"][0].update(timestep=0.0), None, "transforms.json",
                         ("frames[0].timestep", "an integer", "got 0.0")),
    "depth .npy of 3 dims": (None, lambda d: np.save(d / "depth" / "000_0.npy", np.full((16, 24, 3), 5.0, np.float32)),
                             "depth/000_0.npy", ("frames[0].depth_file_path", "shape [H, W]", "(16, 24, 3)")),
}


@pytest.mark.parametrize("case", sorted(START_UP_CASES) + sorted(ALREADY_GOOD))
def test_bad_files_are_named_at_start_up(tmp_path, case):
    mutate, after, rel, words = {**START_UP_CASES, **ALREADY_GOOD}[case]
    root = _root(tmp_path, mutate=mutate, after=after)
    assert_names(error_of(load, root), root / "scene_000" / rel, *words)


def test_unknown_camera_is_named_with_the_cameras_there_are(tmp_path):
    """Already good: ``--pipeline.datamanager.dataparser.cameras 7`` on a one-camera scene."""
    root = _root(tmp_path)
    assert_names(error_of(load, root, cameras=("7",)), root / "scene_000" / "transforms.json", "field 'cameras'",
                 "camera names or ids among [0=0]", "got '7'")


# ---------------------------------------------------------------------------------------- 2. paths that do not resolve
def _replace_by_link(path: Path, target: str) -> None:
    path.unlink()
    os.symlink(target, path)


MISSING_CASES = {
    "image a broken symbolic link": (None, lambda d: _replace_by_link(d / "images" / "000_0.png", "/nowhere/000_0.png"),
                                     "images/000_0.png", ("frames[0].file_path", "an existing image file",
                                                          "a broken symbolic link to /nowhere/000_0.png")),
    "image a symbolic link loop": (None, lambda d: _replace_by_link(d / "images" / "000_0.png", "000_0.png"),
                                   "images/000_0.png", ("frames[0].file_path", "a symbolic link loop")),
    "depth map a broken symbolic link": (None, lambda d: _replace_by_link(d / "depth" / "001_0.npy", "gone.npy"),
                                         "depth/001_0.npy", ("frames[1].depth_file_path", "a broken symbolic link")),
    "transforms.json a symbolic link loop": (
        None, lambda d: _replace_by_link(d / "transforms.json", "transforms.json"), "transforms.json",
        ("the scene's transforms.json", "a symbolic link loop")),
    "a Windows path": (lambda m: m["frames"][0].update(file_path="images\\000_0.png"), None, "images\\000_0.png",
                       ("frames[0].file_path", "missing file (a Windows path? separate folders with '/')")),
    "a path without its extension": (lambda m: m["frames"][0].update(file_path="images/000_0"), None, "images/000_0",
                                     ("frames[0].file_path", "found 000_0.png: a path without its extension?")),
}


@pytest.mark.parametrize("layout", ["auto", "multiscene"])
@pytest.mark.parametrize("case", sorted(MISSING_CASES))
def test_paths_that_do_not_resolve_say_what_they_are(tmp_path, case, layout):
    mutate, after, rel, words = MISSING_CASES[case]
    root = _root(tmp_path, mutate=mutate, after=after)
    assert_names(error_of(load, root, layout=layout), root / "scene_000" / rel, *words)


# ---------------------------------------------------------------------------------------- 3. --data of the wrong level
@pytest.mark.parametrize("layout", ["auto", "multiscene"])
def test_data_root_of_the_wrong_level_names_the_folder_to_pass(tmp_path, layout):
    root = _root(tmp_path)
    scene = root / "scene_000"
    cases = {  # --data: (the folder named, words)
        tmp_path: (tmp_path, ("1 folders without one", f"root holds scene folders: pass --data {root}")),
        scene / "images": (scene / "images", ("a folder of 2 files and no scene folders",
                                              f"a folder inside the scene scene_000? pass --data {scene}")),
        scene / "transforms.json": (scene / "transforms.json", ("expected a folder",
                                                                f"a file (pass the folder holding it: {scene})")),
    }
    for data, (named, words) in cases.items():
        assert_names(error_of(load, data, layout=layout), named, *words)
    (tmp_path / "empty").mkdir()
    assert "got an empty folder" in error_of(load, tmp_path / "empty", layout=layout)


# --------------------------------------------------------------------------------------------- 4. inputs that are fine
def _save_as(mode: str, fmt: str = "PNG", name: str = "000_0.png"):
    def after(d: Path) -> None:
        src = d / "images" / "000_0.png"
        Image.open(src).convert(mode).save(d / "images" / name, format=fmt)
    return after


GOOD_IMAGES = {  # case: how the first image is re-saved
    "palette (P) image": _save_as("P"),
    "1-bit image": _save_as("1"),
    "CMYK JPEG": _save_as("CMYK", "JPEG", "000_0.jpg"),
    "JPEG named .png": _save_as("RGB", "JPEG"),
}


@pytest.mark.parametrize("case", sorted(GOOD_IMAGES))
def test_other_image_modes_and_formats_read_as_rgb(tmp_path, case):
    from evolsplat_ns.data.views import read_image

    jpg = case == "CMYK JPEG"
    root = _root(tmp_path, mutate=(lambda m: m["frames"][0].update(file_path="images/000_0.jpg")) if jpg else None,
                 after=GOOD_IMAGES[case])
    rec = load(root)[0].images[0]
    with Image.open(rec.image_path) as im:
        expected = np.asarray(im.convert("RGB"))
    got = read_image(rec.image_path)
    assert got.shape == (16, 24, 3) and got.dtype == np.uint8 and np.array_equal(got, expected)


def test_inputs_that_are_fine_load_as_given(tmp_path):
    """A 3x4 transform_matrix, negative timesteps, a float16 depth map, a UTF-8 byte-order mark: accepted, and read
    as the same scene as without them."""
    plain = load(_root(tmp_path / "plain"))[0]

    def edit(meta):
        for f in meta["frames"]:
            f["transform_matrix"] = f["transform_matrix"][:3]
            f["timestep"] -= 7

    def files(d: Path) -> None:
        np.save(d / "depth" / "000_0.npy", np.full((16, 24), 5.0, np.float16))
        p = d / "transforms.json"
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())

    other = load(_root(tmp_path / "other", mutate=edit, after=files))[0]
    assert [r.timestep for r in other.images] == [-7, -6]
    for a, b in zip(plain.images, other.images):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)
        np.testing.assert_allclose(a.K, b.K)


# ------------------------------------------------------------------------------------------------ 5. warnings
def test_distortion_coefficients_are_a_warning_naming_them(tmp_path, caplog):
    root = _root(tmp_path, mutate=lambda m: (m.update(camera_model="OPENCV", k1=-0.2, k2=0.0, p1=0.001),
                                             m["frames"][1].update(k3=0.01)))
    with caplog.at_level(logging.WARNING):
        load(root)
    warned = [r.getMessage() for r in caplog.records if "distortion" in r.getMessage()]
    assert len(warned) == 1, warned
    assert_names(warned[0], root / "scene_000" / "transforms.json", "k1=-0.2", "p1=0.001", "frames[1].k3=0.01",
                 "not applied", "undistort")
    assert "k2" not in warned[0]  # zero coefficients are not reported
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load(_root(tmp_path / "zero", mutate=lambda m: m.update(camera_model="PINHOLE", k1=0.0, p2=0)))
    assert "distortion" not in caplog.text


def test_transparent_images_warn_once_per_folder(tmp_path, caplog):
    from evolsplat_ns.data.views import read_image

    def rgba(d: Path) -> None:
        for name in ("000_0.png", "001_0.png"):
            a = np.asarray(Image.open(d / "images" / name).convert("RGBA")).copy()
            a[:4, :, 3] = 0
            Image.fromarray(a).save(d / "images" / name)

    root = _root(tmp_path, after=rgba)
    scene = load(root)[0]
    with caplog.at_level(logging.WARNING):
        for r in scene.images:
            assert read_image(r.image_path).shape == (16, 24, 3)
    warned = [r.getMessage() for r in caplog.records if "transparent" in r.getMessage()]
    assert len(warned) == 1 and "000_0.png: 25.0% of its pixels are transparent" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # opaque RGBA: nothing to say
        opaque = _root(tmp_path / "opaque", after=_save_as("RGBA"))
        read_image(load(opaque)[0].images[0].image_path)
    assert "transparent" not in caplog.text


def test_sky_mask_values_are_checked_again_when_decoded(tmp_path):
    """Start-up decodes the first mask of each camera; any other is checked when the point cloud reads it."""
    from evolsplat_ns.pointcloud.filters import read_mask

    root = _root(tmp_path, after=lambda d: _zero_one_mask(d, "001_0.png"))
    scene = load(root)[0]  # the first mask is fine
    bad = scene.images[1].sky_mask_path
    assert_names(error_of(read_mask, bad, scene.sky_mask_convention), bad, "values 0, 1 only", "no sky")
    # a blank mask (no sky in view) and a label map under the label convention are fine
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(blank)
    assert read_mask(blank, "255_is_sky").max() == 0
    labels = tmp_path / "labels.png"
    Image.fromarray(np.full((16, 24), 10, np.uint8)).save(labels)
    assert read_mask(labels, "label_10_is_sky").max() == 10


# ------------------------------------------------------------------------------------------ 6. the data side's options
def _dm(root, test_mode="val", **kw):
    from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig

    cfg = EvolSplatDataManagerConfig(**kw)
    cfg.data = root
    return cfg.setup(device="cpu", test_mode=test_mode)


def test_scenes_both_trained_and_evaluated_warn(tmp_path, caplog):
    from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig

    root = write_root(tmp_path / "r", num_scenes=2, num_frames=24, num_cams=1, size=(8, 12))
    for ids, words in ((dict(eval_scene_ids=(0, 1)), ("scenes [0, 1]", "train_scene_ids unset")),
                       (dict(train_scene_ids=(0, 1), eval_scene_ids=(1,)), ("scenes [1]", "eval_scene_ids [1]"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _dm(root, dataparser=EvolSplatDataParserConfig(**ids))
        warned = [r.getMessage() for r in caplog.records if "both training and evaluation" in r.getMessage()]
        assert len(warned) == 1 and all(w in warned[0] for w in words + ("not held-out scores",)), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the default split, and evaluation / inference, say nothing
        _dm(root)
        _dm(root, test_mode="test", dataparser=EvolSplatDataParserConfig(train_scene_ids=(0, 1),
                                                                       eval_scene_ids=(0, 1)))
    assert "both training and evaluation" not in caplog.text


def test_a_scene_of_one_frame_is_skipped_and_named(tmp_path, caplog):
    root = write_root(tmp_path / "r", num_scenes=1, num_frames=1, num_cams=1, size=(8, 12))
    with caplog.at_level(logging.WARNING):
        msg = error_of(_dm, root)
    assert "scene_000" in caplog.text and "min_keyframes_per_scene=10" in caplog.text
    assert_names(msg, root, "train_scene_ids", "at least one training scene with >= 10 keyframes", "skipped: [0]")


# ------------------------------------------------------------------------------------------------ 7. the commands
def _trainer_config_yaml(path: Path, method: str) -> Path:
    import yaml
    from nerfstudio.engine.trainer import TrainerConfig

    path.write_text(yaml.dump(TrainerConfig(method_name=method)))
    return path


def test_infer_load_config_mistakes_are_one_line(tmp_path, capsys):
    from evolsplat_ns.cli.infer import InferArgs, main

    run = tmp_path / "run"
    run.mkdir()
    _trainer_config_yaml(run / "config.yml", "evolsplat-ff")
    (tmp_path / "text.yml").write_text("hello\n")
    (tmp_path / "broken.yml").write_text("a: [1\n")
    cases = {  # --load-config: words of the message
        run: ("--load-config", "the config.yml of a trained evolsplat-ff run", f"a folder (pass {run / 'config.yml'})"),
        tmp_path / "text.yml": ("YAML holding str, not a TrainerConfig",),
        tmp_path / "broken.yml": ("not a config (",),
        _trainer_config_yaml(tmp_path / "splat.yml", "splatfacto"): ("a run of method 'splatfacto'",),
    }
    for i, (config, words) in enumerate(cases.items()):
        with pytest.raises(SystemExit) as ei:
            main(InferArgs(load_config=config, data=tmp_path, output=tmp_path / f"out{i}"))
        err = capsys.readouterr().err.strip().splitlines()
        assert ei.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert_names(err[0], config, *words)


def _with_seed_ply(root: Path, points: np.ndarray) -> None:
    from evolsplat_ns.pointcloud.plyio import write_ply

    for scene in sorted(p for p in root.iterdir() if p.is_dir()):
        write_ply(scene / "seed.ply", points, np.full_like(points, 0.5))
        tf = scene / "transforms.json"
        meta = json.loads(tf.read_text())
        meta["ply_file_path"] = "seed.ply"
        tf.write_text(json.dumps(meta))


def test_seed_ply_outside_every_view_is_one_line(tmp_path, capsys):
    """Already good: a seed PLY far from the cameras (another world frame) gives no point in the segment's box."""
    from evolsplat_ns.cli.pointcloud import PointCloudArgs, main
    from evolsplat_ns.pointcloud.options import PointCloudOptions

    root = write_root(tmp_path / "r", num_scenes=2, num_frames=24, num_cams=1, size=(8, 12))
    _with_seed_ply(root, np.random.default_rng(0).uniform(-1, 1, (50, 3)) + [5000.0, 5000.0, 0.0])
    with pytest.raises(SystemExit) as ei:
        main(PointCloudArgs(data=root, scene=0, segment=0, out=tmp_path / "o.ply", cache=False, quiet=True,
                            pointcloud=PointCloudOptions(generator="seed-ply")))
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert_names(err[0], root / "scene_000" / "seed.ply", "scene 0 (scene_000) segment 0", "(50 points)",
                 "lies in the box")
    assert not (tmp_path / "o.ply").exists()


def test_ns_train_on_a_fisheye_scene_is_one_line(tmp_path):
    """What the user sees from ``ns-train`` itself (real subprocess): one ``error:`` line, exit code 2, in seconds."""
    root = write_root(tmp_path / "r", num_scenes=2, num_frames=24, num_cams=1, size=(8, 12),
                      mutate=lambda m: m.update(camera_model="OPENCV_FISHEYE", k1=0.1))
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("EVOLSPLAT_NS_VERBOSE", None)
    out = subprocess.run([sys.executable, "-m", "nerfstudio.scripts.train", "evolsplat-ff-small", "--data", str(root),
                          "--vis", "tensorboard", "--output-dir", str(tmp_path / "out"), "--machine.device-type", "cpu",
                          "--max-num-iterations", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert_names(errors[0], root / "scene_000" / "transforms.json", "field 'camera_model'", "a pinhole camera model",
                 "'OPENCV_FISHEYE'")
