"""Issue 9: bad input, interruptions and numerical faults (docs/RELIABILITY.md lists every case and its test).

Depth maps that are all zero or hold NaN / inf; images of one camera of different sizes; degenerate intrinsics;
checkpoints that are missing, truncated, not PyTorch, another method's or another model's, through the plugin's
trainer (ns-train --load-dir) and nerfstudio's eval_setup (ns-eval / ns-viewer / ns-render); one-line errors in
nerfstudio's own commands; atomic checkpoint writes and an exact resume through the plugin's trainer; non-finite
gradients; degenerate geometry (coincident points, views that see nothing, cameras inside the cloud).
"""

from __future__ import annotations

import copy
import errno
import io
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.data.depth_check import check_depth_values
from evolsplat_ns.errors import CheckpointError, DataValidationError
from evolsplat_ns.engine.checkpoint import check_checkpoint, resolve_checkpoint, summarize_load_error
from scene_fixtures import write_root, write_scene


# ------------------------------------------------------------------------------------------------ depth values
def _scene_with_depth(tmp_path, depth: np.ndarray, name="001_1"):
    d = write_scene(tmp_path / "s", num_frames=3, num_cams=2)
    np.save(d / "depth" / f"{name}.npy", depth.astype(np.float32))
    return d


def test_depth_all_zero_is_an_error_naming_file_and_field(tmp_path):
    d = _scene_with_depth(tmp_path, np.zeros((16, 24)))
    with pytest.raises(DataValidationError) as ei:
        parse_scene(d, 0)
    msg = str(ei.value)
    assert "001_1.npy" in msg and "frames[3].depth_file_path" in msg and "all zero" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_depth_nan_inf_reports_the_fraction(tmp_path, bad):
    depth = np.full((16, 24), 4.0)
    depth[:4] = bad  # 96 of 384 pixels
    d = _scene_with_depth(tmp_path, depth)
    with pytest.raises(DataValidationError) as ei:
        parse_scene(d, 0)
    msg = str(ei.value)
    assert "001_1.npy" in msg and "frames[3].depth_file_path" in msg
    assert "25.0% NaN/inf (96 of 384 pixels)" in msg and "non_finite_depth" in msg


def test_depth_nan_as_unknown_reads_zero_with_a_warning(tmp_path, caplog):
    depth = np.full((16, 24), 4.0)
    depth[0, :6] = np.nan
    d = _scene_with_depth(tmp_path, depth)
    with caplog.at_level(logging.WARNING):
        scene = parse_scene(d, 0, non_finite_depth="unknown")
    assert any("001_1.npy" in r.getMessage() and "1.6% NaN/inf" in r.getMessage() for r in caplog.records)
    from evolsplat_ns.data.views import SceneCache

    arrays = SceneCache(1).get(scene)  # the decoded map has 0 (unknown) where the file had NaN
    assert torch.isfinite(arrays.depth).all() and float(arrays.depth[1, 1, 0, 0]) == 0.0
    # a map that is only NaN is still an error under "unknown": nothing positive is left
    with pytest.raises(DataValidationError, match="no positive value once NaN/inf are read as 0|all zero"):
        check_depth_values(np.full((4, 4), np.nan, np.float32), Path("x.npy"), "depth", non_finite="unknown")


def test_depth_checked_on_first_decode_when_start_up_check_is_off(tmp_path):
    # loaders that bypass the start-up check (or check_depth_values=False) still get the named error
    depth = np.full((16, 24), 4.0)
    depth[3, 3] = np.inf
    d = _scene_with_depth(tmp_path, depth)
    scene = parse_scene(d, 0, check_depth_values=False)
    from evolsplat_ns.data.views import SceneCache

    with pytest.raises(DataValidationError, match=r"001_1\.npy.*0\.3% NaN/inf"):
        SceneCache(1).get(scene)


def test_depth_options_reach_the_dataparser(tmp_path):
    from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig

    root = tmp_path / "r"
    write_root(root, num_scenes=1, num_frames=3, num_cams=1)
    depth = np.full((16, 24), 4.0)
    depth[0, 0] = np.nan
    np.save(root / "scene_000" / "depth" / "002_0.npy", depth.astype(np.float32))
    with pytest.raises(DataValidationError, match="002_0.npy"):
        EvolSplatDataParserConfig(data=root).setup().scenes()
    scenes = EvolSplatDataParserConfig(data=root, non_finite_depth="unknown").setup().scenes()
    assert scenes[0].metadata["non_finite_depth"] == "unknown"


# ------------------------------------------------------------------------------------------------ images, intrinsics
def test_images_of_one_camera_with_different_sizes(tmp_path):
    def per_frame_size(m):  # per-frame w/h agree with each file, but camera 1 changes size at frame 2
        for f in m["frames"]:
            if f["camera"] == 1 and f["timestep"] == 2:
                f["w"], f["h"] = 30, 16

    d = write_scene(tmp_path / "s", num_frames=3, num_cams=2, depth=False, sky=False, mutate=per_frame_size)
    Image.new("RGB", (30, 16)).save(d / "images" / "002_1.png")
    with pytest.raises(DataValidationError) as ei:
        parse_scene(d, 0)
    msg = str(ei.value)
    assert "002_1.png" in msg and "camera 1 all of one size (24x16" in msg and "30x16" in msg


def test_truncated_image_data_is_named_when_decoded(tmp_path):
    # the header is intact (start-up reads headers only), the pixel data are cut: decoding names the file
    d = write_scene(tmp_path / "s", num_frames=3, num_cams=2, size=(64, 96))
    img = d / "images" / "002_0.png"
    img.write_bytes(img.read_bytes()[:200])
    scene = parse_scene(d, 0)
    from evolsplat_ns.data.views import SceneCache

    with pytest.raises(DataValidationError, match=r"002_0\.png: field 'file_path': expected a readable image"):
        SceneCache(1).get(scene)


@pytest.mark.parametrize("key,value", [("fl_x", 0.0), ("w", 0), ("h", -4), ("cx", "a")])
def test_degenerate_intrinsics(tmp_path, key, value):
    d = write_scene(tmp_path / "s", num_frames=2, num_cams=1, mutate=lambda m: m.update({key: value}))
    with pytest.raises(DataValidationError, match="fl_x/fl_y/w/h|finite number"):
        parse_scene(d, 0)


# ------------------------------------------------------------------------------------------------ CLI one-liners
def test_run_cli_turns_an_empty_point_cloud_into_one_line(capsys):
    from evolsplat_ns.errors import run_cli
    from evolsplat_ns.errors import EmptyPointCloudError

    def boom():
        raise EmptyPointCloudError("scene 0 (s) segment 3: the depth point cloud is empty after every fallback")

    with pytest.raises(SystemExit) as ei:
        run_cli(boom, verbose=False)
    assert ei.value.code == 2 and capsys.readouterr().err.strip().startswith("error: scene 0 (s) segment 3")
    with pytest.raises(EmptyPointCloudError):
        run_cli(boom, verbose=True)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 / 0, verbose=False)


def test_one_line_errors_only_inside_nerfstudio_commands(monkeypatch, capsys):
    from evolsplat_ns.errors import VERBOSE_ENV, one_line_errors_in_nerfstudio_commands

    err = DataValidationError("/d/scene/transforms.json", "frames", "a non-empty list of frames")
    with pytest.raises(DataValidationError):  # pytest is not a nerfstudio command: the exception passes
        with one_line_errors_in_nerfstudio_commands():
            raise err
    monkeypatch.setattr(sys, "argv", ["/venv/bin/ns-train", "evolsplat-ff"])
    with pytest.raises(SystemExit) as ei:
        with one_line_errors_in_nerfstudio_commands():
            raise err
    lines = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(lines) == 1 and "transforms.json: field 'frames'" in lines[0]
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with pytest.raises(DataValidationError):
        with one_line_errors_in_nerfstudio_commands():
            raise err


def test_ns_train_on_bad_data_is_one_line_naming_the_file(tmp_path):
    root = write_root(tmp_path / "r", num_scenes=2, num_frames=24, num_cams=2, size=(8, 12))
    depth = np.full((8, 12), 5.0, np.float32)
    depth[:2] = np.nan
    np.save(root / "scene_001" / "depth" / "007_1.npy", depth)
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("EVOLSPLAT_NS_VERBOSE", None)
    out = subprocess.run([sys.executable, "-m", "nerfstudio.scripts.train", "evolsplat-ff-small", "--data", str(root),
                          "--vis", "tensorboard", "--output-dir", str(tmp_path / "out"),
                          "--machine.device-type", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "scene_001/depth/007_1.npy" in errors[0] and "frames[15].depth_file_path" in errors[0]
    assert "25.0% NaN/inf" in errors[0]


# ------------------------------------------------------------------------------------------------ checkpoints (unit)
def _fake_ckpt(path: Path, pipeline_keys=("_model.encoder.w", "_model.heads.w", "_model.segments._extra_state")):
    torch.save({"step": 3, "pipeline": {k: torch.zeros(2) for k in pipeline_keys}, "optimizers": {},
                "scalers": {}}, path)
    return path


def test_checkpoint_checks_name_the_file(tmp_path):
    good = _fake_ckpt(tmp_path / "step-000000003.ckpt")
    assert check_checkpoint(good)["step"] == 3
    cases = {}
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases["empty.ckpt"] = "empty file"
    (tmp_path / "trunc.ckpt").write_bytes(good.read_bytes()[:300])
    cases["trunc.ckpt"] = "truncated or corrupt"
    (tmp_path / "text.ckpt").write_text("not a checkpoint at all\n" * 20)
    cases["text.ckpt"] = "PyTorch cannot read|truncated or corrupt"
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.ckpt")
    cases["plain.ckpt"] = r"nerfstudio checkpoint with keys"
    _fake_ckpt(tmp_path / "splatfacto.ckpt", ("_model.gauss_params.means", "_model.gauss_params.scales"))
    cases["splatfacto.ckpt"] = r"another method's state \(keys such as _model.gauss_params.means"
    torch.save({"step": np.float64(1.0), "pipeline": {}, "optimizers": {}, "scalers": {}}, tmp_path / "numpy.ckpt")
    cases["numpy.ckpt"] = "unsafe unpickling"
    cases["missing.ckpt"] = "missing file"
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as ei:
            check_checkpoint(tmp_path / name)
        assert str(ei.value).startswith(str(tmp_path / name)), name
        assert "\n" not in str(ei.value)


def test_resolve_checkpoint_folder_rules(tmp_path):
    ck = tmp_path / "nerfstudio_models"
    with pytest.raises(CheckpointError, match="load_dir.*missing"):
        resolve_checkpoint(ck, None, None)
    ck.mkdir()
    (ck / "notes.txt").write_text("x")  # nerfstudio's own step parsing would fail on this file
    with pytest.raises(CheckpointError, match=r"none \(contents: \['notes.txt'\]\)"):
        resolve_checkpoint(ck, None, None)
    _fake_ckpt(ck / "step-000000002.ckpt")
    _fake_ckpt(ck / "step-000000010.ckpt")
    assert resolve_checkpoint(ck, None, None).name == "step-000000010.ckpt"
    assert resolve_checkpoint(ck, 2, None).name == "step-000000002.ckpt"
    with pytest.raises(CheckpointError, match=r"load_step.*\[2, 10\].*got 5"):
        resolve_checkpoint(ck, 5, None)
    assert resolve_checkpoint(None, None, None) is None


def test_summarize_load_error_is_one_line():
    a, b = torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.Linear(3, 5))
    with pytest.raises(RuntimeError) as ei:
        b.load_state_dict({"0.weight": a.weight, "0.bias": a.bias, "x": a.bias})
    s = summarize_load_error(ei.value)
    assert "\n" not in s and "2 size mismatch(es), e.g. 0.weight" in s and "1 unexpected key(s), e.g. x" in s


# ------------------------------------------------------------------------------------------------ trainer / ns-eval
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from conftest import synthetic_root

    return synthetic_root(tmp_path_factory, "rel", 2, 3, 24, 72, num_cameras=3)


def _config(data_root, out_dir, **trainer):
    from conftest import small_trainer_config

    cfg = small_trainer_config(data_root, out_dir, bg_num_points=500, max_points=800, no_periodic_eval=True, **trainer)
    cfg.pipeline.datamanager.batches_per_segment = 2  # the schedule moves on within the run
    cfg.pipeline.datamanager.num_source_keyframes = 2  # 6 source, 3 target views: the CPU rasterizer is the cost
    cfg.pipeline.datamanager.num_target_keyframes = 1
    return cfg


@pytest.fixture(scope="module")
def run_a(synth, tmp_path_factory):
    """An uninterrupted 4-step run of the plugin's trainer (2 batches per segment), checkpoints at steps 2 and 3."""
    cfg = _config(synth, tmp_path_factory.mktemp("runs") / "a", max_num_iterations=4, steps_per_save=2,
                  save_only_latest_checkpoint=False)
    cfg.save_config()
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return cfg, trainer


def test_plugin_trainer_writes_only_complete_checkpoints(run_a):
    from evolsplat_ns.engine.trainer import EvolSplatTrainer

    cfg, trainer = run_a
    assert isinstance(trainer, EvolSplatTrainer)
    names = sorted(p.name for p in cfg.get_checkpoint_dir().iterdir())
    assert names == ["step-000000002.ckpt", "step-000000003.ckpt"]  # nothing else in the folder
    assert not any(p.name.endswith(".partial") for p in cfg.get_base_dir().iterdir())
    for p in cfg.get_checkpoint_dir().iterdir():
        check_checkpoint(p)  # complete, and loadable with weights_only=True


def test_checkpoint_write_killed_midway_leaves_the_previous_one(run_a, tmp_path, monkeypatch):
    cfg_a, trainer = run_a
    ck = cfg_a.get_checkpoint_dir()
    before = sorted(p.name for p in ck.iterdir())
    real_save = torch.save

    def killed(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:500])  # the process dies halfway through the write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(6)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in ck.iterdir()) == before  # no truncated step-6 file for --load-dir to pick
    assert resolve_checkpoint(ck, None, None).name == before[-1]


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes: the rest of a write fails with ``OSError(code)``."""

    def __init__(self, f, room: int, code: int):
        self.f, self.room, self.code = f, room, code

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        if len(b) > self.room:
            self.f.write(b[:self.room])
            self.room = 0
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(b)
        return self.f.write(b)


@pytest.mark.parametrize("code, where", [(errno.ENOSPC, "write"), (errno.EDQUOT, "fsync")])
def test_a_full_disk_while_checkpointing_names_the_file_and_keeps_the_previous_one(run_a, monkeypatch, code, where):
    """(issue 18) The disk fills up while ``step-7.ckpt`` is written (torch's zip writer wraps the failed write in a
    RuntimeError; or the final fsync fails): one CheckpointError naming the file and the full disk; no partial or
    temporary file anywhere in the run; every earlier checkpoint kept, even with save_only_latest_checkpoint."""
    from evolsplat_ns.errors import is_user_error

    cfg_a, trainer = run_a
    ck = cfg_a.get_checkpoint_dir()
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    everything = sorted(str(p.relative_to(cfg_a.get_base_dir())) for p in cfg_a.get_base_dir().rglob("*"))
    real_save = torch.save
    if where == "write":
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, _FullDisk(f, 3000, code), *a, **k))
    else:
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(trainer.config, "save_only_latest_checkpoint", True)
    with pytest.raises(CheckpointError) as e:
        trainer.save_checkpoint(7)
    monkeypatch.undo()
    msg = str(e.value)
    assert is_user_error(e.value) and "\n" not in msg  # one error: line under ns-train
    assert msg.startswith(str(ck / "step-000000007.ckpt") + ": ")
    full = "the disk quota is exceeded" if code == errno.EDQUOT else "the disk is full"
    assert full in msg and "no partial file is left" in msg
    assert f"the previous checkpoint {max(before)} is kept" in msg and f"--load-dir {ck}" in msg
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # nothing deleted, nothing half-written
    assert sorted(str(p.relative_to(cfg_a.get_base_dir())) for p in cfg_a.get_base_dir().rglob("*")) == everything
    check_checkpoint(ck / max(before))
    assert resolve_checkpoint(ck, None, None).name == max(before)


def test_resume_through_the_plugin_trainer_continues_exactly(run_a, synth, tmp_path):
    cfg_a, trainer_a = run_a
    cfg = _config(synth, tmp_path / "b", max_num_iterations=1, steps_per_save=100)  # step 3 only
    cfg.load_dir = cfg_a.get_checkpoint_dir()
    cfg.load_step = 2
    trainer_b = cfg.setup(local_rank=0, world_size=1)
    trainer_b.setup()
    assert trainer_b._start_step == 3
    trainer_b.train()  # step 3: the second batch of the segment the checkpoint was in
    pa, pb = trainer_a.pipeline, trainer_b.pipeline
    assert pb.datamanager.scheduler.state_dict() == pa.datamanager.scheduler.state_dict()
    for (na, a), (_, b) in zip(pa.model.named_parameters(), pb.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=na)
    for key in pa.ff_model.segments.keys():  # every segment's state, not only the active one
        torch.testing.assert_close(pa.ff_model.segments.get(*key)["offset"], pb.ff_model.segments.get(*key)["offset"])
    _, ba = pa.datamanager.next_train(4)
    _, bb = pb.datamanager.next_train(4)
    assert (ba.scene_id, ba.segment_id) == (bb.scene_id, bb.segment_id)
    assert torch.equal(ba.source.frame_indices, bb.source.frame_indices)
    assert torch.equal(ba.target.frame_indices, bb.target.frame_indices)


def _copy_run(cfg, dest: Path):
    bad = copy.deepcopy(cfg)
    bad.output_dir = dest
    bad.save_config()
    shutil.copytree(cfg.get_checkpoint_dir(), bad.get_checkpoint_dir())
    return bad


def test_resume_from_a_truncated_checkpoint_fails_before_any_long_work(run_a, synth, tmp_path, monkeypatch):
    cfg_a, _ = run_a
    bad = _copy_run(cfg_a, tmp_path / "copy")
    newest = bad.get_checkpoint_dir() / "step-000000003.ckpt"
    newest.write_bytes(newest.read_bytes()[:2000])
    cfg = _config(synth, tmp_path / "b")
    cfg.load_dir = bad.get_checkpoint_dir()
    trainer = cfg.setup(local_rank=0, world_size=1)
    monkeypatch.setattr(cfg.pipeline, "setup", lambda **kw: pytest.fail("data indexed before the checkpoint check"))
    with pytest.raises(CheckpointError) as ei:
        trainer.setup()
    assert str(ei.value).startswith(str(newest)) and "truncated" in str(ei.value)
    # inside ns-train: one line, exit code 2
    monkeypatch.setattr(sys, "argv", ["/venv/bin/ns-train", "evolsplat-ff-small"])
    with pytest.raises(SystemExit) as ei:
        trainer.setup()
    assert ei.value.code == 2


def test_a_run_kept_as_weights_evaluates_the_same_and_refuses_to_resume(run_a, synth, tmp_path, monkeypatch):
    """scripts/gpu/keep_run.py carries a trained run between GPU sessions: the pipeline state in parts (each under
    the machine's per-file limit), checked against its manifest when joined. The rebuilt run loads through
    nerfstudio's eval_setup with the same weights and step; a part that was cut is refused before anything is
    written; resuming training from it is refused by name before the data are indexed (nerfstudio would go on
    with fresh optimizer state and say nothing)."""
    from nerfstudio.utils.eval_utils import eval_setup

    import scripts.gpu.keep_run as keep_run

    cfg_a, _ = run_a
    monkeypatch.setattr(keep_run, "PART_BYTES", 1 << 16)  # several parts even for the small model
    written = keep_run.pack(cfg_a.get_base_dir(), tmp_path / "kept")
    parts = sorted(p for p in written if p.name.startswith("ckpt.part"))
    newest = resolve_checkpoint(cfg_a.get_checkpoint_dir(), None, None)
    assert len(parts) >= 2 and all(p.stat().st_size <= 1 << 16 for p in parts)
    assert sum(p.stat().st_size for p in parts) < newest.stat().st_size  # no optimizer state

    config = keep_run.unpack(tmp_path / "kept", output_dir=tmp_path / "restored")
    assert config.is_file() and (tmp_path / "restored") in config.parents
    _, pipe, ckpt, step = eval_setup(config, test_mode="test")
    saved = torch.load(newest, map_location="cpu", weights_only=True)
    assert step == saved["step"]
    state = pipe.state_dict()
    for k, v in saved["pipeline"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(state[k].cpu(), v), k

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "kept", cut)
    (cut / parts[-1].name).write_bytes(parts[-1].read_bytes()[:-10])
    with pytest.raises(SystemExit, match="do not add up"):
        keep_run.unpack(cut, output_dir=tmp_path / "cut_run")
    assert not (tmp_path / "cut_run").exists()

    cfg = _config(synth, tmp_path / "b")
    cfg.load_dir = ckpt.parent
    trainer = cfg.setup(local_rank=0, world_size=1)
    monkeypatch.setattr(cfg.pipeline, "setup", lambda **kw: pytest.fail("data indexed before the checkpoint check"))
    with pytest.raises(CheckpointError, match="optimizers.*weights only"):
        trainer.setup()


def test_ns_eval_with_truncated_foreign_or_mismatched_checkpoint(run_a, tmp_path, monkeypatch, capsys):
    from nerfstudio.scripts.eval import ComputePSNR
    from nerfstudio.utils.eval_utils import eval_setup

    cfg_a, _ = run_a
    trunc = _copy_run(cfg_a, tmp_path / "t")
    for p in trunc.get_checkpoint_dir().iterdir():
        p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step-000000003\.ckpt.*truncated"):
        eval_setup(trunc.get_base_dir() / "config.yml")

    foreign = _copy_run(cfg_a, tmp_path / "f")
    for p in foreign.get_checkpoint_dir().iterdir():
        _fake_ckpt(p, ("_model.gauss_params.means", "_model.gauss_params.opacities"))
    with pytest.raises(CheckpointError, match="another method's state"):
        eval_setup(foreign.get_base_dir() / "config.yml")

    def wider(config):  # a model option changed after training: the weights no longer fit
        config.pipeline.model.volume_dim = 8
        return config

    with pytest.raises(CheckpointError, match=r"step-000000003\.ckpt: field 'pipeline'.*size mismatch") as ei:
        eval_setup(cfg_a.get_base_dir() / "config.yml", update_config_callback=wider)
    assert "\n" not in str(ei.value)

    # what ns-eval prints: one line naming the file, exit code 2, no traceback
    monkeypatch.setattr(sys, "argv", ["/venv/bin/ns-eval", "--load-config", "x"])
    monkeypatch.delenv("EVOLSPLAT_NS_VERBOSE", raising=False)
    with pytest.raises(SystemExit) as ei:
        ComputePSNR(load_config=trunc.get_base_dir() / "config.yml", output_path=tmp_path / "m.json").main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert ei.value.code == 2 and len(lines) == 1 and "step-000000003.ckpt" in lines[0] and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ numerical faults
def test_non_finite_gradient_skips_the_step_and_is_logged(synth, tmp_path, monkeypatch):
    cfg = _config(synth, tmp_path / "g", max_num_iterations=3)
    from nerfstudio.utils import writer  # after the configs: imported first, it hits a nerfstudio import cycle

    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train_iteration(0)  # one good step: Adam has moments now
    model = trainer.pipeline.ff_model
    before = copy.deepcopy(model.state_dict())  # weights and BatchNorm running statistics
    offsets = model.segments.current["offset"].clone()  # step 1 draws from the same segment (2 batches each)
    opt_before = {k: copy.deepcopy(o.state_dict()) for k, o in trainer.optimizers.optimizers.items()}
    # the loss stays finite; one parameter's gradient turns NaN
    param = next(model.heads.parameters())
    handle = param.register_hook(lambda g: g * float("nan"))
    logged = []
    monkeypatch.setattr(writer, "put_dict", lambda name, scalar_dict, step: logged.append((name, dict(scalar_dict))))
    # step 1 through nerfstudio's own loop, logging every step
    trainer.config.logging.steps_per_log = 1
    trainer.config.max_num_iterations = 1
    trainer._start_step = 1
    trainer.train()
    handle.remove()
    after = model.state_dict()
    for k, v in before.items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and "segments" not in k:
            assert torch.equal(v, after[k]), k
    for name, opt in trainer.optimizers.optimizers.items():
        st_after = opt.state_dict()["state"]
        for i, st in opt_before[name]["state"].items():
            assert torch.equal(st["exp_avg"], st_after[i]["exp_avg"]) and torch.equal(st["exp_avg_sq"],
                                                                                   st_after[i]["exp_avg_sq"])
    assert trainer.pipeline.train_step.skipped_steps == 1
    assert torch.equal(model.segments.current["offset"], offsets)
    # the counter reaches nerfstudio's writer through the train metrics (logged every steps_per_log)
    metrics_logged = [d for n, d in logged if n == "Train Metrics Dict"]
    assert metrics_logged and metrics_logged[-1]["skipped_steps"] == 1


def test_nan_forward_does_not_poison_statistics_or_segment_state(pipe_and_batch):
    import dataclasses

    pipe, batch = pipe_and_batch
    model = pipe.ff_model
    rng = np.random.default_rng(2)
    pts = _cam_point(batch, 0, 10.0) + rng.normal(0, 2.0, (300, 3))  # a small cloud keeps the CPU steps quick
    _step_on_points(pipe, batch, pts)  # a good step: the segment exists, BatchNorm has statistics
    model.zero_grad(set_to_none=True)
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    offsets = model.segments.current["offset"].clone()
    image = batch.source.image.clone()
    image[0, :4] = float("nan")  # e.g. a corrupt frame that got through: NaN features, NaN loss
    bad = dataclasses.replace(batch, source=dataclasses.replace(batch.source, image=image))
    skipped = pipe.train_step.skipped_steps
    pipe.train_on_batch(bad, 2)
    assert pipe.train_step.skipped_steps == skipped + 1
    assert all(p.grad is None for p in model.parameters())
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n]), n  # no NaN in the running statistics used by evaluation
    assert torch.equal(model.segments.current["offset"], offsets)  # nor in the segment's offsets
    assert math.isfinite(pipe.train_on_batch(batch, 3)["view_loss_mean"])  # the next good step is unaffected


# ------------------------------------------------------------------------------------------------ degenerate geometry
@pytest.fixture(scope="module")
def pipe_and_batch(synth, tmp_path_factory):
    cfg = _config(synth, tmp_path_factory.mktemp("geo"))
    pipe = cfg.pipeline.setup(device="cpu", test_mode="val")
    _, batch = pipe.datamanager.next_train(0)
    return pipe, batch


def _step_on_points(pipe, batch, points: np.ndarray, step=1):
    from evolsplat_ns.pointcloud.init import init_gaussians

    model = pipe.ff_model
    cols = np.full_like(points, 0.5, dtype=np.float32)
    g = init_gaussians(points.astype(np.float32), cols, sh_degree=model.config.sh_degree, seed=0)
    model.segments.clear()
    model.segments.activate(batch.scene_id, batch.segment_id,
                            lambda: {k: g[k] for k in ("means", "colours", "log_scales", "offset")})
    model.zero_grad(set_to_none=True)
    skipped = pipe.train_step.skipped_steps
    metrics = pipe.train_on_batch(batch, step)
    assert pipe.train_step.skipped_steps == skipped, "the step was skipped: something went non-finite"
    assert math.isfinite(metrics["view_loss_mean"])
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    assert torch.isfinite(g["log_scales"]).all()
    out = pipe.render_targets(batch)[0]
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    return metrics


def _cam_point(batch, v, z):
    c2w = batch.source.extrinsics[v].double().numpy()
    return c2w[:3, :3] @ np.array([0.0, 0.0, z]) + c2w[:3, 3]


def test_coincident_points_do_not_produce_nan(pipe_and_batch):
    pipe, batch = pipe_and_batch
    p = _cam_point(batch, 0, 8.0)
    # one voxel for the whole segment: BatchNorm has a single row (it used to raise here)
    assert _step_on_points(pipe, batch, np.repeat(p[None], 300, axis=0))["num_gaussians"] == 300
    # two clusters of duplicates, one of them far away (sub-pixel footprints)
    q = _cam_point(batch, 0, 900.0)
    _step_on_points(pipe, batch, np.concatenate([np.repeat(p[None], 50, 0), np.repeat(q[None], 50, 0)]))


def test_views_that_see_nothing_do_not_produce_nan(pipe_and_batch):
    pipe, batch = pipe_and_batch
    # every point behind every camera of the batch: no source sees it, no target renders it
    centres = torch.cat([batch.source.extrinsics, batch.target.extrinsics])[:, :3, 3].double().numpy()
    back = -np.concatenate([batch.source.extrinsics, batch.target.extrinsics])[:, :3, 2].mean(0)
    back /= np.linalg.norm(back)
    rng = np.random.default_rng(0)
    pts = centres.min(0) + back * 60.0 + rng.normal(0, 0.5, (200, 3))
    assert _step_on_points(pipe, batch, pts)["num_gaussians"] == 0  # nothing seen: empty foreground, finite loss


def test_cameras_inside_the_cloud_do_not_produce_nan(pipe_and_batch):
    pipe, batch = pipe_and_batch
    rng = np.random.default_rng(1)
    cams = torch.cat([batch.source.extrinsics, batch.target.extrinsics])[:, :3, 3].double().numpy()
    # points all around (and exactly at) the camera centres: depth 0, behind and in front
    pts = np.concatenate([cams, cams + 1e-7, (cams[:, None] + rng.normal(0, 1.0, (len(cams), 40, 3))).reshape(-1, 3)])
    assert _step_on_points(pipe, batch, pts)["num_gaussians"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_ns_train_without_cuda_is_one_line_naming_the_cpu_options(tmp_path):
    root = write_root(tmp_path / "r", num_scenes=2, num_frames=24, num_cams=2, size=(8, 12))
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("EVOLSPLAT_NS_VERBOSE", None)
    out = subprocess.run([sys.executable, "-m", "nerfstudio.scripts.train", "evolsplat-ff", "--data", str(root),
                          "--vis", "tensorboard", "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "--machine.device-type cpu" in errors[0] and "evolsplat-ff-small" in errors[0]


def test_resume_is_tied_to_its_scenes_and_cloud_options_and_nan_weights_are_refused(run_a, synth, tmp_path):
    """Resuming on other scenes or other point-cloud options is refused with one line naming what differs; a
    checkpoint with NaN weights is refused by resume and by nerfstudio's eval_setup (ns-eval, ns-viewer, infer)."""
    import shutil

    from nerfstudio.utils.eval_utils import eval_setup

    cfg_a, _ = run_a
    ckpt_dir = cfg_a.get_checkpoint_dir()
    fewer = tmp_path / "fewer"  # one scene removed
    shutil.copytree(synth, fewer)
    shutil.rmtree(sorted(p for p in fewer.iterdir() if p.is_dir() and p.name.startswith("scene"))[-1])
    cfg = _config(fewer, tmp_path / "b", max_num_iterations=1)
    cfg.load_dir = ckpt_dir
    trainer = cfg.setup(local_rank=0, world_size=1)
    with pytest.raises(CheckpointError) as ei:
        trainer.setup()
    assert "field 'scenes'" in str(ei.value) and "missing" in str(ei.value)
    cfg = _config(synth, tmp_path / "c", max_num_iterations=1)
    cfg.load_dir = ckpt_dir
    cfg.pipeline.model.pointcloud.max_points = 700  # other clouds: the saved offsets would not fit them
    trainer = cfg.setup(local_rank=0, world_size=1)
    with pytest.raises(CheckpointError) as ei:
        trainer.setup()
    assert "pipeline.model.pointcloud" in str(ei.value) and "max_points (800 -> 700)" in str(ei.value)
    # NaN weights: refused when evaluating (and resuming), naming the tensor
    bad = _copy_run(cfg_a, tmp_path / "nan")
    for ck in bad.get_checkpoint_dir().glob("*.ckpt"):
        state = torch.load(ck, map_location="cpu", weights_only=True)
        key = next(k for k in state["pipeline"] if k.endswith("heads.opacity.0.weight"))
        state["pipeline"][key][0, 0] = float("nan")
        torch.save(state, ck)
    with pytest.raises(CheckpointError) as ei:
        eval_setup(bad.get_base_dir() / "config.yml", test_mode="test")
    assert "finite weights" in str(ei.value) and "heads.opacity.0.weight" in str(ei.value)
