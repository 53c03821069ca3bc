"""The DataManager: batch layout, determinism, no disk reads in steady state, exact resume, eval batches."""

import builtins
import io

import numpy as np
import pytest
import torch

from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig
from evolsplat_ns.errors import ConfigError, DataValidationError
from scene_fixtures import write_root, write_scene


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("data") / "root", num_scenes=3, num_frames=40, num_cams=3, size=(8, 12))


def make_dm(root, **kw):
    cfg = EvolSplatDataManagerConfig(**kw)
    cfg.data = root
    return cfg.setup(device="cpu", test_mode="val")


def _same(a: SegmentBatch, b: SegmentBatch) -> bool:
    if (a.scene_id, a.segment_id, a.is_new_segment) != (b.scene_id, b.segment_id, b.is_new_segment):
        return False
    return all(torch.equal(getattr(a, p)[k], getattr(b, p)[k]) for p in ("source", "target") for k in a.source.keys())


def test_batch_layout(root):
    dm = make_dm(root)
    cams, b = dm.next_train(0)
    C = 3
    assert b.source.image.shape == (3 * C, 8, 12, 3) and b.target.image.shape == (6 * C, 8, 12, 3)
    assert b.source.image.dtype == torch.float32 and 0 <= b.source.image.min() and b.source.image.max() <= 1
    assert b.source.extrinsics.shape == (9, 4, 4) and b.source.intrinsics.shape == (9, 4, 4)
    assert b.source.depth.shape == (9, 8, 12)
    assert b.source.keyframe_indices.shape == (3,) and b.target.keyframe_indices.shape == (6,)
    # frame-major, then camera
    assert b.source.cam_indices.tolist() == [0, 1, 2] * 3
    f = b.source.frame_indices.tolist()
    assert f[0] == f[1] == f[2] and f[3] == f[4] == f[5] and f[0] < f[3] < f[6]
    assert not set(b.source.frame_indices.tolist()) & set(b.target.frame_indices.tolist())
    assert torch.equal(b.source.intrinsics[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(9, 4))
    # design-document access style
    assert b["source"]["image"] is b.source.image and b["scene_id"] == b.scene_id
    assert b.scene_id in dm.train_scene_ids and b.is_new_segment
    # the targets as nerfstudio cameras (OpenGL): same centres, z axis flipped
    assert cams.shape[0] == 18
    assert torch.allclose(cams.camera_to_worlds[:, :3, 3], b.target.extrinsics[:, :3, 3])
    assert torch.allclose(cams.camera_to_worlds[:, :3, 2], -b.target.extrinsics[:, :3, 2])
    # the pixels are the files' pixels
    from PIL import Image

    scene = dm.scenes[b.scene_id]
    t, c = int(b.target.frame_indices[4]), int(b.target.cam_indices[4])
    ref = np.asarray(Image.open(scene.image(t, c).image_path)).astype(np.float32) / 255
    assert np.allclose(b.target.image[4].numpy(), ref)


def test_deterministic_for_seed_and_step(root):
    a, b, c = make_dm(root, seed=1), make_dm(root, seed=1), make_dm(root, seed=2)
    ba = [a.next_train(s)[1] for s in range(12)]
    bb = [b.next_train(s)[1] for s in range(12)]
    bc = [c.next_train(s)[1] for s in range(12)]
    assert all(_same(x, y) for x, y in zip(ba, bb))
    assert not all(_same(x, y) for x, y in zip(ba, bc))


def test_steady_state_reads_no_files(root, monkeypatch):
    dm = make_dm(root, batches_per_segment=2, cache_scenes=3)
    for s in range(12):  # one pass: every training scene decoded once
        dm.next_train(s)
    assert dm.cache.loads == 2

    def forbidden(*a, **k):
        raise AssertionError(f"file opened in steady state: {a[:1]}")

    import PIL.Image

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(PIL.Image, "open", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    for s in range(12, 60):
        dm.next_train(s)
    assert dm.cache.loads == 2


def test_lru_cache_evicts(root):
    dm = make_dm(root, batches_per_segment=1, cache_scenes=1, scene_order="sequential", segment_order="sequential")
    for s in range(12):
        dm.next_train(s)
    assert dm.cache.loads == 4  # scene 0, 1, 0, 1 across two passes with room for one scene


def test_resume_through_state_dict(root):
    a = make_dm(root, batches_per_segment=3)
    for s in range(7):
        a.next_train(s)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    expected = [a.next_train(s)[1] for s in range(7, 20)]
    b = make_dm(root, batches_per_segment=3)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    got = [b.next_train(s)[1] for s in range(7, 20)]
    assert all(_same(x, y) for x, y in zip(expected, got))


def test_eval_batches_fixed_and_held_out(root):
    dm = make_dm(root)
    assert dm.eval_scene_ids == [2]
    batches = list(dm.eval_batches())
    assert {b.scene_id for b in batches} == {2}
    for b in batches:
        assert all(t % 2 == 0 for t in b.source.frame_indices.tolist())  # Drop50: even frames are inputs
        assert all(t % 2 == 1 for t in b.target.frame_indices.tolist())  # odd frames are tested
    # every odd frame's cameras, each scored once (tests/test_eval_plan.py checks the plan itself)
    scored = [(t, c) for b in batches for t, c in zip(b.target.frame_indices.tolist(), b.target.cam_indices.tolist())]
    assert sorted(scored) == [(t, c) for t in range(1, 40, 2) for c in range(3)]
    again = list(make_dm(root).eval_batches())
    assert len(again) == len(batches) and all(_same(x, y) for x, y in zip(batches, again))
    cams, b = dm.next_eval(1)
    assert _same(b, dm.planned_batch(dm.eval_plan()[0])) and cams.shape[0] == b.target.image.shape[0]
    assert dm.input_frames(2) == {t for t in range(40) if t % 2 == 0} and dm.input_frames(0) is None


def test_options_that_cannot_work(root, tmp_path):
    with pytest.raises(ConfigError, match="num_source_keyframes"):
        make_dm(root, num_source_keyframes=11)
    with pytest.raises(ConfigError, match="keyframes_per_segment"):
        make_dm(root, keyframes_per_segment=4, min_keyframes_per_segment=6)
    with pytest.raises(ConfigError, match="num_target_keyframes"):
        make_dm(root, num_source_keyframes=3, num_target_keyframes=11)
    with pytest.raises(ConfigError, match="keyframe_max_frames=-1 must be 0 \\(off\\) or >= keyframe_min_count"):
        make_dm(root, keyframe_max_frames=-1)
    with pytest.raises(ConfigError, match="keyframe_max_frames=2 must be 0 \\(off\\) or >= keyframe_min_count=3"):
        make_dm(root, keyframe_min_count=3, keyframe_max_frames=2)
    with pytest.raises(DataValidationError, match="eval_scene_ids"):
        make_dm(root, dataparser=type(EvolSplatDataManagerConfig().dataparser)(eval_scene_ids=(5,)))
    short = write_root(tmp_path / "short", num_scenes=2, num_frames=6, num_cams=1, size=(8, 12))
    with pytest.raises(DataValidationError, match="at least one training scene"):
        make_dm(short)


def test_short_scenes_are_skipped(tmp_path, caplog):
    r = tmp_path / "r"
    write_scene(r / "a_long", num_frames=40, num_cams=1, size=(8, 12))
    write_scene(r / "b_short", num_frames=6, num_cams=1, size=(8, 12))
    write_scene(r / "c_long", num_frames=40, num_cams=1, size=(8, 12))
    with caplog.at_level("WARNING"):
        dm = make_dm(r)
    assert "b_short" in caplog.text and "min_keyframes_per_scene" in caplog.text  # the warning says why
    assert dm.train_scene_ids == [0] and dm.eval_scene_ids == [2] and 1 in dm.skipped
    roles = {s["name"]: s["role"] for s in dm.summary()["scenes"]}
    assert roles == {"a_long": "train", "b_short": "skipped", "c_long": "eval"}


def test_viewer_dataset_and_rays(root):
    dm = make_dm(root)
    assert len(dm.train_dataset) == 2 * 40 * 3
    assert dm.get_train_rays_per_batch() == 6 * 3 * 8 * 12
    assert dm.train_dataset.cameras.camera_to_worlds.shape == (240, 3, 4)


# ------------------------------------------------------------------------ a car that waits at a light (PandaSet 002)
WAIT = 35  # frames the car stands still before it drives off (PandaSet 002: ~35 of 80 frames)


@pytest.fixture(scope="module")
def waiting_pandaset(tmp_path_factory):
    pytest.importorskip("pandas")
    from layout_fixtures import write_pandaset

    root = tmp_path_factory.mktemp("waiting") / "pandaset"
    write_pandaset(root / "002", num_frames=60, size=(48, 27), cams=["front", "back"], stand_still=WAIT)
    return root


def _pandaset_dm(root, cfg=None, **kw):
    cfg = cfg or EvolSplatDataManagerConfig(**kw)
    cfg.data = root
    cfg.dataparser.lidar_cache_dir = root.parent / "lidar_cache"
    return cfg.setup(device="cpu", test_mode="val")


def _waiting_keyframes_drawn(dm, steps):
    """Keyframes of the wait that training batches drew as sources or targets over ``steps``."""
    kfs = dm.index[dm.train_scene_ids[0]].keyframes
    drawn = set()
    for step in range(steps):
        _, b = dm.next_train(step)
        for k in b.source.keyframe_indices.tolist() + b.target.keyframe_indices.tolist():
            if kfs[k].start < WAIT:
                drawn.add(k)
    return drawn


def test_a_waiting_car_is_sampled_over_its_whole_wait(waiting_pandaset):
    dm = _pandaset_dm(waiting_pandaset)  # default options
    (sid,) = dm.train_scene_ids
    idx = dm.index[sid]
    assert dm.scenes[sid].num_frames == 60 and dm.config.keyframe_max_frames == 10
    # every frame in exactly one keyframe, time order; none longer than 10 frames
    assert [t for kf in idx.keyframes for t in kf.frame_indices] == list(range(60))
    assert max(len(kf) for kf in idx.keyframes) <= 10
    # the wait: a keyframe per 10 frames, then the one in which the car drives off (1.2 m per frame: 2 frames per 2 m)
    spans = [(kf.start, kf.stop) for kf in idx.keyframes]
    assert spans[:4] == [(0, 10), (10, 20), (20, 30), (30, WAIT + 2)]
    assert set().union(*(seg.frame_indices for seg in idx.segments)) == set(range(60))
    # batches draw sources and targets from all over the wait
    assert _waiting_keyframes_drawn(dm, 40) == {0, 1, 2, 3}
    summary = dm.summary()["scenes"][0]
    assert [k["frames"] for k in summary["keyframes"][:4]] == [[0, 9], [10, 19], [20, 29], [30, WAIT + 1]]
    assert summary["keyframes"][0]["travel_m"] == 0.0 and summary["keyframes"][3]["travel_m"] == pytest.approx(2.4, abs=0.05)  # 2 x 1.2 m, on a curve

    # the frame limit off: the distance rule alone makes the whole wait one keyframe
    old = _pandaset_dm(waiting_pandaset, keyframe_max_frames=0)
    old_kfs = old.index[old.train_scene_ids[0]].keyframes
    assert (old_kfs[0].start, old_kfs[0].stop) == (0, WAIT + 2) and len(old_kfs) == len(idx.keyframes) - 3
    # after the wait, the same keyframes as before
    assert spans[4:] == [(kf.start, kf.stop) for kf in old_kfs[1:]]
    assert _waiting_keyframes_drawn(old, 40) == {0}


def test_keyframe_max_frames_on_the_command_line(waiting_pandaset, capsys):
    import json

    import tyro

    from evolsplat_ns.cli.inspect import entrypoint
    from evolsplat_ns.configs import make_trainer_config

    # as ns-train evolsplat-ff parses it (tyro over the method's config)
    default = make_trainer_config()
    cfg = tyro.cli(type(default), default=default,
                   args=["--data", str(waiting_pandaset), "--pipeline.datamanager.keyframe-max-frames", "0"])
    assert cfg.pipeline.datamanager.keyframe_max_frames == 0 and make_trainer_config().pipeline.datamanager.keyframe_max_frames == 10
    dm = _pandaset_dm(waiting_pandaset, cfg.pipeline.datamanager)
    assert len(dm.index[0].keyframes[0]) == WAIT + 2
    # evolsplat-ns-inspect shows the keyframes and the option
    cache = ["--datamanager.dataparser.lidar-cache-dir", str(waiting_pandaset.parent / "lidar_cache")]
    for value, first in (("0", [0, WAIT + 1]), ("10", [0, 9]), ("5", [0, 4])):
        entrypoint(["--data", str(waiting_pandaset), "--json", "--datamanager.keyframe-max-frames", value, *cache])
        s = json.loads(capsys.readouterr().out)
        assert s["options"]["keyframe_max_frames"] == int(value) and s["scenes"][0]["keyframes"][0]["frames"] == first
    # a bad value: one line naming the option, exit code 2
    with pytest.raises(SystemExit) as e:
        entrypoint(["--data", str(waiting_pandaset), "--datamanager.keyframe-max-frames", "-1", *cache])
    assert e.value.code == 2 and "keyframe_max_frames" in capsys.readouterr().err
