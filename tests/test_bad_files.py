"""Issue 18, item 4: every way a file can be wrong is a user error (docs/RELIABILITY.md lists each case).

A file that cannot be decoded as text, a folder where a file should be, JSON of the wrong types, a file or folder
that cannot be read, a truncated PNG sky mask or depth map, a bad seed PLY, a cache or output folder that cannot be
created or is a file: each is a :class:`DataValidationError` (or ``ConfigError``) whose one-line message names the
file, the field and what was expected, raised at set-up (parsing) before any long work; never a raw traceback,
never zeros or fewer points read silently. Set-up and parsing only (no training).

Everything runs as root here, so permissions are simulated: :func:`deny` makes ``open`` / ``os.listdir`` /
``os.scandir`` raise ``PermissionError(13, ...)`` for one path, as an unreadable file or folder would.
"""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
from PIL import Image

from evolsplat_ns.data.layouts import load_layout_scenes
from layout_fixtures import (assert_names, error_of, load, write_drivestudio, write_kitti_calib, write_kitti_drive,
                             write_pandaset, write_reference)
from scene_fixtures import write_scene

BAD_UTF8 = b'{"frames": "\xff\xfe\xfa not utf-8"}'


# ------------------------------------------------------------------------------------------------ helpers
def _multiscene(tmp: Path, mutate=None, **kw) -> Path:
    """A multi-scene root with one small scene (2 frames, 1 camera, depth and sky masks); returns the root."""
    kw = {"num_frames": 2, "num_cams": 1, **kw}
    write_scene(tmp / "root" / "scene_000", mutate=mutate, **kw)
    return tmp / "root"


def _reference(tmp: Path) -> Path:
    write_reference(tmp / "ref" / "seq", num_frames=2, two_cameras=False)
    return tmp / "ref"


def _drivestudio(tmp: Path) -> Path:
    write_drivestudio(tmp / "ds" / "000", num_frames=2, cams=(0,))
    return tmp / "ds"


def _pandaset(tmp: Path) -> Path:
    write_pandaset(tmp / "ps" / "001", num_frames=2, cams=("front",))
    return tmp / "ps"


def _kitti(tmp: Path) -> Path:
    date = tmp / "2011_09_26"
    write_kitti_calib(date)
    write_kitti_drive(date, num_frames=2)
    return date / "2011_09_26_drive_0001_sync"


LAYOUTS: Dict[str, Callable[[Path], Path]] = {
    "multiscene": _multiscene, "reference": _reference, "drivestudio": _drivestudio, "pandaset": _pandaset,
    "kitti-raw": _kitti,
}
#: a file of each layout, relative to the root the writer returns (kitti: the drive folder; its calib is in ..)
FILES = {
    "multiscene": "scene_000/transforms.json",
    "reference": "seq/transforms.json",
    "drivestudio": "000/intrinsics/0.txt",
    "pandaset": "001/camera/front_camera/poses.json",
    "pandaset-intrinsics": "001/camera/front_camera/intrinsics.json",
    "pandaset-timestamps": "001/camera/front_camera/timestamps.json",
    "pandaset-lidar-timestamps": "001/lidar/timestamps.json",
    "kitti-raw": "../calib_cam_to_cam.txt",
    "kitti-raw-timestamps": "image_02/timestamps.txt",
    "kitti-raw-oxts": "oxts/data/0000000001.txt",
    "drivestudio-extrinsics": "000/extrinsics/0.txt",
    "drivestudio-ego": "000/ego_pose/001.txt",
}


def _layout_of(case: str) -> str:
    return next(k for k in LAYOUTS if case == k or case.startswith(k + "-"))


@pytest.fixture
def deny(monkeypatch):
    """``deny(path)``: opening ``path`` (a file) or listing it (a folder) raises PermissionError, as when the user
    may not read it (the tests run as root, where chmod does not stop reads)."""
    denied = set()
    real_open, real_listdir, real_scandir = builtins.open, os.listdir, os.scandir

    def blocked(p) -> bool:
        try:
            return os.path.realpath(os.fspath(p)) in denied
        except TypeError:  # a file descriptor
            return False

    def opener(file, *a, **kw):
        if blocked(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *a, **kw)

    def listdir(p="."):
        if blocked(p):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_listdir(p)

    def scandir(p="."):
        if blocked(p):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_scandir(p)

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)

    def add(path: Path) -> Path:
        denied.add(os.path.realpath(path))
        return path

    return add


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _big_mask(path: Path, size=(24, 16)) -> None:
    """A noisy mask (so that its PNG data are long enough to cut in the middle of the pixel data)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 2, size[::-1], dtype=np.uint8) * 255).save(path)


# ------------------------------------------------------------------------------------------------ 1. not UTF-8
@pytest.mark.parametrize("case", sorted(FILES))
def test_undecodable_text_names_the_file(tmp_path, case):
    root = LAYOUTS[_layout_of(case)](tmp_path)
    path = (root / FILES[case]).resolve()
    path.write_bytes(BAD_UTF8)
    msg = error_of(load, root)
    assert_names(msg, path, "UTF-8")


# ------------------------------------------------------------------------------------------------ 2. a folder
def _folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("a file inside")


FOLDER_CASES = {
    # case: (layout, file relative to the root, words the message must hold)
    "transforms.json": ("multiscene", "scene_000/transforms.json", ("a file", "a folder")),
    "image": ("multiscene", "scene_000/images/001_0.png", ("frames[1].file_path", "a folder")),
    "depth map": ("multiscene", "scene_000/depth/001_0.npy", ("frames[1].depth_file_path", "a folder")),
    "sky mask": ("multiscene", "scene_000/sky_masks/001_0.png", ("frames[1].sky_mask_path", "a folder")),
    "reference transforms.json": ("reference", "seq/transforms.json", ("a file", "a folder")),
    "reference depth": ("reference", "seq/depth/000095.npy", ("depth", "a folder")),
    "drivestudio image": ("drivestudio", "000/images/001_0.jpg", ("image", "a folder")),
    "drivestudio sky mask": ("drivestudio", "000/sky_masks/001_0.png", ("sky mask", "a folder")),
    "drivestudio intrinsics": ("drivestudio", "000/intrinsics/0.txt", ("intrinsics", "a folder")),
    "drivestudio extrinsics": ("drivestudio", "000/extrinsics/0.txt", ("extrinsics", "a folder")),
    "drivestudio lidar sweep": ("drivestudio", "000/lidar/001.bin", ("lidar", "a folder")),
    "pandaset poses.json": ("pandaset", "001/camera/front_camera/poses.json", ("a file", "a folder")),
    "pandaset image": ("pandaset", "001/camera/front_camera/00.jpg", ("image", "a folder")),
    "kitti calibration": ("kitti-raw", "../calib_velo_to_cam.txt", ("a file", "a folder")),
    "kitti oxts": ("kitti-raw", "oxts/data/0000000000.txt", ("a file", "a folder")),
    "kitti velodyne sweep": ("kitti-raw", "velodyne_points/data/0000000001.bin", ("lidar", "a folder")),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_a_folder_where_a_file_should_be(tmp_path, case):
    layout, rel, words = FOLDER_CASES[case]
    root = LAYOUTS[layout](tmp_path)
    path = (root / rel).resolve()
    _folder_instead(path)
    msg = error_of(load, root)
    assert_names(msg, path, *words)


def test_a_folder_as_seed_ply(tmp_path):
    root = _multiscene(tmp_path, mutate=lambda m: m.update(ply_file_path="seed.ply"))
    (root / "scene_000" / "seed.ply").mkdir()
    msg = error_of(load, root)
    assert_names(msg, root / "scene_000" / "seed.ply", "ply_file_path", "a folder")


# ------------------------------------------------------------------------------------------------ 3. JSON types
def _frame(i: int, **changes):
    return lambda m: m["frames"][i].update(changes)


MULTISCENE_TYPES = {
    "frames is a dict": (lambda m: m.update(frames={"0": m["frames"][0]}), "field 'frames'"),
    "frames is a string": (lambda m: m.update(frames="images/"), "field 'frames'"),
    "top level is a list": (lambda m: (m.clear(), m.update(_list=True)), "a JSON object"),
    "a frame is a list": (lambda m: m["frames"].__setitem__(1, [1, 2]), "field 'frames[1]'"),
    "transform_matrix is a string": (_frame(1, transform_matrix="identity"), "frames[1].transform_matrix"),
    "transform_matrix ragged": (_frame(1, transform_matrix=[[1, 0, 0, 0], [0, 1, 0]]), "frames[1].transform_matrix"),
    "transform_matrix flat": (_frame(1, transform_matrix=list(range(16))), "frames[1].transform_matrix"),
    "transform_matrix too deep": (_frame(1, transform_matrix=[[[1.0] * 4] * 4]), "frames[1].transform_matrix"),
    "transform_matrix a dict": (_frame(1, transform_matrix={"rows": 4}), "frames[1].transform_matrix"),
    "fl_x is a list": (lambda m: m.update(fl_x=[19.2]), "field 'fl_x'"),
    "frame fl_x is a list": (_frame(1, fl_x=[19.2]), "frames[1].fl_x"),
    "w is a string": (lambda m: m.update(w="24"), "field 'w'"),
    "file_path is a number": (_frame(1, file_path=7), "frames[1].file_path"),
    "file_path is null": (_frame(1, file_path=None), "frames[1].file_path"),
    "depth_file_path is a list": (_frame(1, depth_file_path=["depth/001_0.npy"]), "frames[1].depth_file_path"),
    "sky_mask_path is a dict": (_frame(1, sky_mask_path={"path": "x.png"}), "frames[1].sky_mask_path"),
    "camera is a dict": (_frame(1, camera={"id": 0}), "frames[1].camera"),
    "timestep is a string": (_frame(1, timestep="1"), "frames[1].timestep"),
    "sky_mask_convention is a list": (lambda m: m.update(sky_mask_convention=["255_is_sky"]), "sky_mask_convention"),
    "ply_file_path is a number": (lambda m: m.update(ply_file_path=3), "ply_file_path"),
}


@pytest.mark.parametrize("case", sorted(MULTISCENE_TYPES))
def test_wrong_json_types_in_transforms_json(tmp_path, case):
    mutate, field = MULTISCENE_TYPES[case]
    root = _multiscene(tmp_path, mutate=mutate)
    tf = root / "scene_000" / "transforms.json"
    if "_list" in json.loads(tf.read_text()):
        tf.write_text("[1, 2]")
    msg = error_of(load, root)
    assert_names(msg, tf, field, "expected")


def _json_edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    data = edit(data)
    path.write_text(json.dumps(data))


def _drop(d: dict, key: str) -> dict:
    d.pop(key)
    return d


OTHER_LAYOUT_TYPES = {
    # case: (layout, file, edit of its JSON -> new JSON, words the message must hold)
    "pandaset pose without position": ("pandaset", "001/camera/front_camera/poses.json",
                                       lambda p: [p[0], _drop(p[1], "position")], ("field '[1]'", "position")),
    "pandaset pose heading a string": ("pandaset", "001/camera/front_camera/poses.json",
                                       lambda p: [p[0], {**p[1], "heading": "north"}], ("field '[1]'", "heading")),
    "pandaset pose a list": ("pandaset", "001/camera/front_camera/poses.json",
                             lambda p: [p[0], [1, 2, 3]], ("field '[1]'", "position")),
    "pandaset poses a dict": ("pandaset", "001/camera/front_camera/poses.json",
                              lambda p: {"0": p[0]}, ("a non-empty list of poses", "dict")),
    "pandaset intrinsics a list": ("pandaset", "001/camera/front_camera/intrinsics.json",
                                   lambda k: [k["fx"], k["fy"]], ("fx", "numbers")),
    "pandaset fx a string": ("pandaset", "001/camera/front_camera/intrinsics.json",
                             lambda k: {**k, "fx": "wide"}, ("fx", "numbers")),
    "pandaset timestamps strings": ("pandaset", "001/camera/front_camera/timestamps.json",
                                    lambda t: [str(x) for x in t], ("field '[0]'", "a finite number")),
    "pandaset timestamps a dict": ("pandaset", "001/camera/front_camera/timestamps.json",
                                   lambda t: {"t": t}, ("a list of 2 timestamps", "dict")),
    "pandaset LiDAR timestamps null": ("pandaset", "001/lidar/timestamps.json",
                                       lambda t: [None] * len(t), ("field '[0]'", "a finite number")),
    "reference file_path a number": ("reference", "seq/transforms.json",
                                     lambda m: {**m, "frames": [m["frames"][0], {**m["frames"][1], "file_path": 7}]},
                                     ("frames[1]", "file_path")),
    "reference inv_pose a string": ("reference", "seq/transforms.json", lambda m: {**m, "inv_pose": "I"},
                                    ("inv_pose", "4x4")),
    "reference fl_x a list": ("reference", "seq/transforms.json", lambda m: {**m, "fl_x": [1.0]},
                              ("fl_x", "a finite number")),
    "reference frames a dict": ("reference", "seq/transforms.json", lambda m: {**m, "frames": {"a": 1}},
                                ("field 'frames'", "a non-empty list")),
}


@pytest.mark.parametrize("case", sorted(OTHER_LAYOUT_TYPES))
def test_wrong_json_types_in_other_layouts(tmp_path, case):
    layout, rel, edit, words = OTHER_LAYOUT_TYPES[case]
    root = LAYOUTS[layout](tmp_path)
    path = root / rel
    _json_edit(path, edit)
    msg = error_of(load, root)
    assert_names(msg, path, *words)


@pytest.mark.parametrize("text,field", [("fx fy cx cy\n", "intrinsics"), ("1 2 3\n4 5\n", "intrinsics")])
def test_drivestudio_text_files_of_words(tmp_path, text, field):
    root = _drivestudio(tmp_path)
    path = root / "000" / "intrinsics" / "0.txt"
    path.write_text(text)
    msg = error_of(load, root)
    assert_names(msg, path, f"field '{field}'", "numbers")


# ------------------------------------------------------------------------------------------------ 4. permissions
DENY_CASES = {
    # case: (layout, path relative to the root, words)
    "transforms.json": ("multiscene", "scene_000/transforms.json", ("Permission denied",)),
    "image": ("multiscene", "scene_000/images/001_0.png", ("frames[1].file_path", "Permission denied")),
    "depth map": ("multiscene", "scene_000/depth/001_0.npy", ("frames[1].depth_file_path", "Permission denied")),
    "sky mask": ("multiscene", "scene_000/sky_masks/001_0.png", ("frames[1].sky_mask_path", "Permission denied")),
    "data root folder": ("multiscene", ".", ("Permission denied",)),
    "reference transforms.json": ("reference", "seq/transforms.json", ("Permission denied",)),
    "drivestudio intrinsics": ("drivestudio", "000/intrinsics/0.txt", ("intrinsics", "Permission denied")),
    "drivestudio ego pose": ("drivestudio", "000/ego_pose/001.txt", ("ego_pose", "Permission denied")),
    "drivestudio images folder": ("drivestudio", "000/images", ("images", "Permission denied")),
    "pandaset poses.json": ("pandaset", "001/camera/front_camera/poses.json", ("Permission denied",)),
    "pandaset intrinsics.json": ("pandaset", "001/camera/front_camera/intrinsics.json", ("Permission denied",)),
    "kitti calibration": ("kitti-raw", "../calib_cam_to_cam.txt", ("Permission denied",)),
    "kitti oxts": ("kitti-raw", "oxts/data/0000000001.txt", ("Permission denied",)),
}


@pytest.mark.parametrize("case", sorted(DENY_CASES))
def test_unreadable_files_and_folders(tmp_path, deny, case):
    layout, rel, words = DENY_CASES[case]
    root = LAYOUTS[layout](tmp_path)
    path = (root / rel).resolve()
    deny(path)
    msg = error_of(load, root)
    assert_names(msg, path, *words)


def test_unreadable_files_when_decoded(tmp_path, deny, monkeypatch):
    """Files read after start-up (scene decode, point-cloud build): the same one line naming the file."""
    from evolsplat_ns.data.layouts.lidar import read_float32_rows
    from evolsplat_ns.data.views import read_depth, read_image
    from evolsplat_ns.pointcloud.filters import read_mask
    from evolsplat_ns.pointcloud.plyio import read_ply, write_ply

    d = write_scene(tmp_path / "s", num_frames=1, num_cams=1)
    write_ply(d / "seed.ply", np.zeros((4, 3)), np.zeros((4, 3)))
    reads = {"images/000_0.png": read_image, "depth/000_0.npy": read_depth, "sky_masks/000_0.png": read_mask,
             "seed.ply": read_ply}
    for rel, fn in reads.items():
        assert_names(error_of(fn, deny(d / rel)), d / rel, "Permission denied")
    sweep = d / "sweep.bin"
    np.zeros((4, 4), np.float32).tofile(sweep)

    def fromfile(*a, **kw):
        raise PermissionError(13, "Permission denied", str(sweep))

    monkeypatch.setattr(np, "fromfile", fromfile)
    assert_names(error_of(read_float32_rows, sweep, 4), sweep, "lidar", "Permission denied")


# ------------------------------------------------------------------------------------------------ 5. truncated PNG
def test_truncated_sky_mask_is_named_at_start_up(tmp_path):
    root = _multiscene(tmp_path, size=(16, 24))
    mask = root / "scene_000" / "sky_masks" / "001_0.png"
    _big_mask(mask)
    _truncate(mask)
    msg = error_of(load, root)
    assert_names(msg, mask, "frames[1].sky_mask_path", "a complete PNG")


def test_truncated_drivestudio_sky_mask_is_named_at_start_up(tmp_path):
    root = _drivestudio(tmp_path)
    mask = root / "000" / "sky_masks" / "001_0.png"
    _big_mask(mask, size=(64, 40))
    _truncate(mask)
    assert_names(error_of(load, root), mask, "sky mask", "a complete PNG")


def _png_depth_scene(tmp_path) -> Path:
    def to_png(m):
        for fr in m["frames"]:
            fr["depth_file_path"] = fr["depth_file_path"].replace(".npy", ".png")

    root = _multiscene(tmp_path, mutate=to_png)
    rng = np.random.default_rng(0)
    for p in (root / "scene_000" / "depth").glob("*.npy"):
        mm = rng.integers(4000, 9000, (16, 24)).astype(np.uint16)  # millimetres
        Image.fromarray(mm).save(p.with_suffix(".png"))
    return root


@pytest.mark.parametrize("check_values", [True, False])
def test_truncated_depth_png_is_named_at_start_up(tmp_path, check_values):
    from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig

    root = _png_depth_scene(tmp_path)
    load_layout_scenes(root)  # the scene is good before the cut
    depth = root / "scene_000" / "depth" / "001_0.png"
    _truncate(depth)
    parser = EvolSplatDataParserConfig(data=root, check_depth_values=check_values).setup()
    msg = error_of(parser.scenes)
    assert_names(msg, depth, "frames[1].depth_file_path", "a complete PNG")


def test_truncated_masks_and_depth_maps_are_named_when_decoded(tmp_path):
    """Behind a start-up that did not look (check_files off, or a file cut afterwards): named when decoded."""
    from evolsplat_ns.data.views import read_depth
    from evolsplat_ns.pointcloud.filters import read_mask

    mask = tmp_path / "m.png"
    _big_mask(mask)
    _truncate(mask)
    assert_names(error_of(read_mask, mask), mask, "sky mask", "a readable image")
    depth = tmp_path / "d.png"
    Image.fromarray(np.random.default_rng(0).integers(4000, 9000, (16, 24)).astype(np.uint16)).save(depth)
    _truncate(depth)
    assert_names(error_of(read_depth, depth), depth, "depth", "a readable")
    npy = tmp_path / "d.npy"
    np.save(npy, np.full((16, 24), 5.0, np.float32))
    _truncate(npy, 0.8)
    assert_names(error_of(read_depth, npy), npy, "depth", "a readable .npy")


# ------------------------------------------------------------------------------------------------ 6. seed PLYs
def _ply_bytes(n: int = 40) -> bytes:
    from plyfile import PlyData, PlyElement

    v = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    v["x"] = np.arange(n)
    buf = io.BytesIO()
    PlyData([PlyElement.describe(v, "vertex")], text=False, byte_order="<").write(buf)
    return buf.getvalue()


def _no_xyz() -> bytes:
    from plyfile import PlyData, PlyElement

    v = np.zeros(10, dtype=[("a", "<f4"), ("b", "<f4"), ("c", "<f4")])
    buf = io.BytesIO()
    PlyData([PlyElement.describe(v, "vertex")], text=False).write(buf)
    return buf.getvalue()


def _ascii_cut() -> bytes:
    from plyfile import PlyData, PlyElement

    v = np.zeros(10, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    buf = io.BytesIO()
    PlyData([PlyElement.describe(v, "vertex")], text=True).write(buf)
    lines = buf.getvalue().splitlines(keepends=True)
    return b"".join(lines[:-4])


BAD_PLYS = {
    # case: (file bytes, words)
    "body cut": (lambda: _ply_bytes()[:-37], ("bytes",)),
    "header claims more vertices": (lambda: _ply_bytes().replace(b"element vertex 40", b"element vertex 50"),
                                    ("50 vertices",)),
    "header claims fewer vertices": (lambda: _ply_bytes().replace(b"element vertex 40", b"element vertex 30"),
                                     ("30 vertices",)),
    "a text file named .ply": (lambda: b"these are not the points you are looking for\n", ("a PLY file",)),
    "empty file": (lambda: b"", ("a PLY file",)),
    "no x y z": (_no_xyz, ("x, y, z",)),
    "no end_header": (lambda: b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n", ("end_header",)),
}


@pytest.mark.parametrize("case", sorted(BAD_PLYS))
def test_bad_seed_ply_is_named_at_start_up_and_when_read(tmp_path, case):
    from evolsplat_ns.pointcloud.plyio import read_ply

    data, words = BAD_PLYS[case]
    root = _multiscene(tmp_path, mutate=lambda m: m.update(ply_file_path="seed.ply"))
    ply = root / "scene_000" / "seed.ply"
    ply.write_bytes(_ply_bytes())
    load(root)  # a good PLY passes
    ply.write_bytes(data())
    assert_names(error_of(load, root), ply, "ply_file_path", *words)
    assert_names(error_of(read_ply, ply), ply, *words)  # the generator's reader: never fewer points or zeros


def test_cut_ascii_ply_is_named_when_read(tmp_path):
    from evolsplat_ns.pointcloud.plyio import read_ply

    ply = tmp_path / "a.ply"
    ply.write_bytes(_ascii_cut())
    assert_names(error_of(read_ply, ply), ply, "10 vertices")


def test_bad_reference_seed_ply_is_named_at_start_up(tmp_path):
    root = _reference(tmp_path)
    ply = root / "seq" / "Drop50" / "94.ply"
    _truncate(ply, 0.7)
    assert_names(error_of(load, root), ply, "ply_file_path_Drop50", "bytes")


# ------------------------------------------------------------------------------------------ 7., 8. folders to write
def _mkdir_denied(monkeypatch, folder: Path) -> None:
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if os.path.realpath(self) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def _unwritable(tmp_path, monkeypatch, how: str) -> Path:
    """A folder path that cannot be a folder: under a file, a file itself, or one that mkdir refuses."""
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    if how == "parent is a file":
        return f / "cache"
    if how == "is a file":
        return f
    _mkdir_denied(monkeypatch, tmp_path / "denied")
    return tmp_path / "denied"


WRITE_CASES = ["parent is a file", "is a file", "mkdir refused"]


@pytest.mark.parametrize("how", WRITE_CASES)
def test_pointcloud_cache_dir_that_cannot_be_made(tmp_path, monkeypatch, how):
    from evolsplat_ns.pointcloud.cache import PointCloudCache

    folder = _unwritable(tmp_path, monkeypatch, how)
    msg = error_of(PointCloudCache(folder, data_root=tmp_path).check_folder, "--pipeline.model.pointcloud-cache-dir")
    assert_names(msg, folder, "--pipeline.model.pointcloud-cache-dir")


@pytest.mark.parametrize("how", ["is a file", "mkdir refused"])  # its parent is the data root, a folder
def test_default_pointcloud_cache_dir_that_cannot_be_made(tmp_path, monkeypatch, how):
    from evolsplat_ns.pointcloud.cache import DEFAULT_CACHE_DIRNAME, PointCloudCache

    root = _multiscene(tmp_path)
    folder = root / DEFAULT_CACHE_DIRNAME
    if how == "is a file":
        folder.write_text("x")
    else:
        _mkdir_denied(monkeypatch, folder)
    msg = error_of(PointCloudCache(None, data_root=root).check_folder, "--pipeline.model.pointcloud-cache-dir")
    assert_names(msg, folder, "--pipeline.model.pointcloud-cache-dir")


def test_pipeline_set_up_checks_the_cache_dir_before_any_cloud(tmp_path):
    """Through nerfstudio's set-up of the pipeline (ns-train / ns-eval / evolsplat-ns-infer): the bad cache folder is
    named at set-up, with the option that moves it."""
    from conftest import small_trainer_config

    root = _multiscene(tmp_path / "a", num_frames=30)
    bad = tmp_path / "a_file"
    bad.write_text("x")
    cfg = small_trainer_config(root, tmp_path / "out", bg_num_points=64, max_points=256)
    cfg.pipeline.model.pointcloud_cache_dir = bad
    msg = error_of(cfg.pipeline.setup, device="cpu", test_mode="val")
    assert_names(msg, bad, "--pipeline.model.pointcloud-cache-dir", "an existing file")


def test_pointcloud_cli_cache_dir_is_checked(tmp_path):
    from evolsplat_ns.cli.pointcloud import PointCloudArgs, run

    root = _multiscene(tmp_path, num_frames=30)
    bad = tmp_path / "a_file"
    bad.write_text("x")
    msg = error_of(run, PointCloudArgs(data=root, all=True, cache_dir=bad, quiet=True))
    assert_names(msg, bad, "--cache-dir")


@pytest.mark.parametrize("bad", ["a folder", "under a file"])
def test_pointcloud_cli_out_is_checked_before_any_cloud(tmp_path, bad):
    from evolsplat_ns.cli.pointcloud import PointCloudArgs, run

    root = _multiscene(tmp_path, num_frames=30)
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "folder.ply" if bad == "a folder" else tmp_path / "a_file" / "seg.ply"
    if bad == "a folder":
        out.mkdir()
    msg = error_of(run, PointCloudArgs(data=root, scene=0, segment=0, out=out, cache_dir=tmp_path / "pc", quiet=True))
    assert_names(msg, out if bad == "a folder" else out.parent, "--out", bad.split()[-1])
    assert not any((tmp_path / "pc").rglob("*.ply"))  # no cloud was built


@pytest.mark.parametrize("how", WRITE_CASES)
def test_lidar_cache_dir_that_cannot_be_made(tmp_path, monkeypatch, how):
    root = _drivestudio(tmp_path)
    folder = _unwritable(tmp_path, monkeypatch, how)
    msg = error_of(load, root, lidar_cache_dir=folder)
    assert_names(msg, folder, "--pipeline.datamanager.dataparser.lidar-cache-dir")


@pytest.mark.parametrize("how", WRITE_CASES)
def test_infer_output_that_cannot_be_made(tmp_path, monkeypatch, how):
    """Checked before the checkpoint is loaded (a placeholder config.yml suffices: it is never read)."""
    from evolsplat_ns.cli.infer import InferArgs, infer

    config = tmp_path / "config.yml"
    config.write_text("not read: the output is checked first\n")
    out = _unwritable(tmp_path, monkeypatch, how)
    msg = error_of(infer, InferArgs(load_config=config, data=tmp_path, output=out))
    assert_names(msg, out, "--output")


def test_infer_output_errors_are_one_line_on_the_command_line(tmp_path, capsys):
    from evolsplat_ns.cli.infer import InferArgs, main

    config = tmp_path / "config.yml"
    config.write_text("x\n")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as ei:
        main(InferArgs(load_config=config, data=tmp_path, output=tmp_path / "f" / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--output" in err[0]
