"""The plugin as nerfstudio sees it: entry points, a light import that never fails, ns-train --help."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from scene_fixtures import write_root



def test_entry_points_registered():
    methods = {e.name: e.value for e in entry_points(group="nerfstudio.method_configs")}
    parsers = {e.name: e.value for e in entry_points(group="nerfstudio.dataparser_configs")}
    assert methods["evolsplat-ff"] == "evolsplat_ns.configs:evolsplat_ff"
    assert parsers["evolsplat-multiscene"] == "evolsplat_ns.data.registration:evolsplat_multiscene"


def test_nerfstudio_discovers_the_method():
    code = (
        "from nerfstudio.configs.method_configs import all_methods, all_descriptions;"
        "from nerfstudio.configs.dataparser_configs import all_dataparsers;"
        "c = all_methods['evolsplat-ff'];"
        "assert 'evolsplat-multiscene' in all_dataparsers;"
        "assert 'splatfacto' in all_methods;"  # our plugin does not break the other methods
        "print(type(c.pipeline.datamanager).__name__, c.pipeline.datamanager.num_source_keyframes)"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EvolSplatDataManagerConfig", "3"]


def test_import_is_light():
    # the data and point-cloud side and the package root import neither nerfstudio nor open3d / gsplat
    code = (
        "import sys, evolsplat_ns, evolsplat_ns.cameras, evolsplat_ns.data.dataparser, evolsplat_ns.data.scene_index,"
        " evolsplat_ns.data.sampling, evolsplat_ns.data.scheduler, evolsplat_ns.pointcloud.options,"
        " evolsplat_ns.pointcloud.filters, evolsplat_ns.pointcloud.generators, evolsplat_ns.pointcloud.cache,"
        " evolsplat_ns.pointcloud.init, evolsplat_ns.pointcloud.plyio, evolsplat_ns.model.segment_state;"
        "bad = [m for m in ('open3d', 'gsplat', 'nerfstudio') if m in sys.modules]; assert not bad, bad;"
        "import evolsplat_ns.configs; assert 'open3d' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_ns_train_help_lists_data_options():
    # `python -m` rather than the console script: works wherever nerfstudio is importable (venv, --target dirs)
    out = subprocess.run([sys.executable, "-m", "nerfstudio.scripts.train", "evolsplat-ff", "--help"],
                         capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for opt in ("num-source-keyframes", "num-target-keyframes", "segment-overlap-ratio", "min-keyframes-per-scene",
                "min-keyframes-per-segment", "batches-per-segment", "segment-order", "scene-order",
                "train-scene-ids", "eval-scene-ids", "targets-include-sources", "cache-scenes", "keyframe-max-frames"):
        assert f"--pipeline.datamanager.{opt}" in out.stdout or f"--pipeline.datamanager.dataparser.{opt}" in out.stdout, opt


def test_config_dataclasses_have_no_shared_mutable_defaults():
    from evolsplat_ns.configs import make_trainer_config

    a, b = make_trainer_config(), make_trainer_config()
    assert a.pipeline.datamanager is not b.pipeline.datamanager
    assert a.pipeline.datamanager.dataparser is not b.pipeline.datamanager.dataparser


def test_inspect_json(tmp_path):
    root = write_root(tmp_path / "r", num_scenes=2, num_frames=30, num_cams=2, size=(8, 12))
    out = subprocess.run([sys.executable, "-m", "evolsplat_ns.cli.inspect", "--data", str(root), "--json"],
                         capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert [sc["scene_id"] for sc in s["scenes"]] == [0, 1]
    for sc in s["scenes"]:
        assert sc["num_frames"] == 30 and sc["num_cameras"] == 2 and sc["num_keyframes"] == 15
        covered = set()
        for seg in sc["segments"]:
            covered |= set(seg["keyframe_indices"])
            assert len(seg["aabb"]) == 2 and len(seg["aabb"][0]) == 3
        assert covered == set(range(sc["num_keyframes"]))
    sb = s["sample_batch"]
    assert sb["source"]["image"] == [6, 8, 12, 3] and sb["target"]["image"] == [12, 8, 12, 3]
    # the last scene is held out: its 15 odd frames x 2 cameras are what evaluation scores
    assert s["evaluation"]["scene_ids"] == [1] and s["evaluation"]["held_out_frames"] == 15
    assert s["evaluation"]["held_out_images"] == 30


def test_inspect_bad_input_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "evolsplat_ns.cli.inspect", "--data", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "missing" in lines[0] and "Traceback" not in out.stderr
