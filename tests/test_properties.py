"""Property-based tests (hypothesis) over scene metadata and batch composition (issue 9, item 4).

Scene metadata: random camera and frame counts, sparse and shuffled timesteps, global or per-frame intrinsics and
random rigid poses parse into a complete (frame, camera) grid, in time order, relative to the first front camera,
with the relative geometry of the input unchanged; a missing image or a NaN pose is an error naming the camera and
timestep / the frame. Batch composition: for random datamanager options either set-up refuses them with a
ConfigError, or every batch it then makes (training and evaluation) has the documented layout.

Deterministic (``derandomize=True``) and small, so that the CPU suite stays fast.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolsplat_ns.cameras import opencv_to_opengl, opengl_to_opencv, rigid_inverse
from evolsplat_ns.data.dataparser import parse_scene
from evolsplat_ns.errors import ConfigError, DataValidationError
from scene_fixtures import write_root

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=float) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


quats = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.2)
@st.composite
def intrinsics(draw):
    """Plausible pinhole intrinsics (implausible ones are refused by name: tests/test_plausibility.py): any image
    size, a field of view of 5-150 degrees per axis, the principal point within the central 80 %."""
    w, h = draw(st.integers(8, 4000)), draw(st.integers(8, 4000))
    fov_x, fov_y = draw(st.floats(5, 150)), draw(st.floats(5, 150))
    return {"fl_x": w / (2 * np.tan(np.radians(fov_x) / 2)), "fl_y": h / (2 * np.tan(np.radians(fov_y) / 2)),
            "cx": draw(st.floats(0.1, 0.9)) * w, "cy": draw(st.floats(0.1, 0.9)) * h, "w": w, "h": h}


@st.composite
def scene_meta(draw):
    C = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    timesteps = sorted(draw(st.lists(st.integers(-50, 500), min_size=T, max_size=T, unique=True)))
    cams = sorted(draw(st.lists(st.integers(0, 7), min_size=C, max_size=C, unique=True)))
    per_frame = draw(st.booleans())
    glob = draw(intrinsics())
    cam_intr = {c: draw(intrinsics()) if per_frame else glob for c in cams}
    frames = []
    for ts in timesteps:
        for c in cams:
            T_cv = np.eye(4)
            T_cv[:3, :3] = _rotation(draw(quats))
            T_cv[:3, 3] = draw(st.lists(st.floats(-100, 100), min_size=3, max_size=3))
            fr = {"file_path": f"images/{ts}_{c}.png", "transform_matrix": opencv_to_opengl(T_cv).tolist(),
                  "camera": c, "timestep": ts}
            if per_frame:
                fr.update(cam_intr[c])
            frames.append(fr)
    order = draw(st.permutations(range(len(frames))))
    meta = {"frames": [frames[i] for i in order]}
    if not per_frame:
        meta.update(glob)
    if C == 1 and draw(st.booleans()):  # a single camera may leave timesteps out: the list order is then time
        for i, fr in enumerate(sorted(meta["frames"], key=lambda f: f["timestep"])):
            fr.pop("timestep")
        meta["frames"] = sorted(meta["frames"], key=lambda f: int(f["file_path"].split("/")[1].split("_")[0]))
    return meta, timesteps, cams, cam_intr


def _parse(meta):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "transforms.json").write_text(json.dumps(meta))
        return parse_scene(Path(d), 0, check_files=False)


@settings(max_examples=60, **SETTINGS)
@given(scene_meta())
def test_parsed_scene_properties(case):
    meta, timesteps, cams, cam_intr = case
    sc = _parse(meta)
    T, C = len(timesteps), len(cams)
    assert sc.num_frames == T and sc.camera_ids == cams and len(sc.images) == T * C
    # a full grid, frame-major then camera, frames in time order
    assert [(r.frame_index, r.camera_id) for r in sc.images] == [(t, c) for t in range(T) for c in cams]
    if all("timestep" in f for f in meta["frames"]):
        assert [r.timestep for r in sc.images[::C]] == timesteps
    front = 0 if 0 in cams else cams[0]
    assert sc.front_camera_id == front
    np.testing.assert_allclose(sc.image(0, front).c2w, np.eye(4), atol=1e-6)
    by_key = {}
    for f in meta["frames"]:
        ts = f["timestep"] if "timestep" in f else int(f["file_path"].split("/")[1].split("_")[0])
        by_key[(timesteps.index(ts), f["camera"])] = opengl_to_opencv(np.asarray(f["transform_matrix"]))
    for r in sc.images:
        R = r.c2w[:3, :3]
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-6)
        assert abs(np.linalg.det(R) - 1) < 1e-6 and np.allclose(r.c2w[3], [0, 0, 0, 1])
        intr = cam_intr[r.camera_id]
        assert (r.width, r.height) == (intr["w"], intr["h"])
        np.testing.assert_allclose(r.K[[0, 1, 0, 1], [0, 1, 2, 2]], [intr["fl_x"], intr["fl_y"], intr["cx"], intr["cy"]])
    # the relative geometry of the input is unchanged (only a global rigid alignment is applied)
    a, b = sc.images[0], sc.images[-1]
    rel_in = rigid_inverse(by_key[(a.frame_index, a.camera_id)]) @ by_key[(b.frame_index, b.camera_id)]
    np.testing.assert_allclose(rigid_inverse(a.c2w) @ b.c2w, rel_in, atol=1e-6)


@settings(max_examples=40, **SETTINGS)
@given(scene_meta(), st.data())
def test_broken_metadata_is_named(case, data):
    meta, timesteps, cams, _ = case
    frames = meta["frames"]
    i = data.draw(st.integers(0, len(frames) - 1))
    if data.draw(st.booleans()):
        # a NaN anywhere in a pose: the error names that frame's transform_matrix
        r, c = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
        frames[i]["transform_matrix"][r][c] = float("nan")
        with pytest.raises(DataValidationError, match=rf"frames\[{i}\]\.transform_matrix"):
            _parse(meta)
    elif len(cams) > 1:
        # an image missing from the grid: the error names its camera and timestep
        gone = frames.pop(i)
        if len(timesteps) == 1:  # the camera is simply absent from a one-timestep scene: still a valid grid
            assert _parse(meta).camera_ids == [c for c in cams if c != gone["camera"]]
            return
        with pytest.raises(DataValidationError, match=rf"camera {gone['camera']} at timestep {gone['timestep']}"):
            _parse(meta)


# ------------------------------------------------------------------------------------------------ batches
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("prop") / "r", num_scenes=2, num_frames=30, num_cams=2, size=(8, 12))


@st.composite
def dm_options(draw):
    kps = draw(st.integers(4, 12))
    return dict(
        num_source_keyframes=draw(st.integers(1, 5)),
        num_target_keyframes=draw(st.integers(1, 8)),
        targets_include_sources=draw(st.booleans()),
        keyframes_per_segment=kps,
        min_keyframes_per_segment=draw(st.integers(1, kps)),
        min_keyframes_per_scene=draw(st.sampled_from([6, 10, 14, 16])),
        keyframe_min_count=draw(st.integers(1, 3)),
        keyframe_max_frames=draw(st.sampled_from([0, 1, 2, 10])),
        segment_overlap_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 0.9])),
        batches_per_segment=draw(st.integers(1, 3)),
        segment_order=draw(st.sampled_from(["random", "sequential"])),
        scene_order=draw(st.sampled_from(["random", "sequential"])),
        seed=draw(st.integers(0, 1000)),
        view_selection=draw(st.sampled_from(["near", "spread"])),
    )


def _check_views(dm, scene, seg, views, n_kf, allowed_frames=None, distinct=True):
    C = scene.num_cameras
    V = n_kf * C
    assert views.image.shape == (V, 8, 12, 3) and 0 <= float(views.image.min()) and float(views.image.max()) <= 1
    assert views.extrinsics.shape == (V, 4, 4) and views.intrinsics.shape == (V, 4, 4) and views.depth.shape == (V, 8, 12)
    frames = views.frame_indices.tolist()
    assert views.cam_indices.tolist() == scene.camera_ids * n_kf  # frame-major, then camera
    assert all(frames[k * C:(k + 1) * C] == [frames[k * C]] * C for k in range(n_kf))
    kfs = views.keyframe_indices.tolist()
    assert len(kfs) == n_kf and set(kfs) <= set(seg.keyframe_indices)
    assert frames[::C] == sorted(set(frames))  # distinct frames, time order
    if distinct:  # training batches: one frame per keyframe (evaluation batches take the frames nearest a target)
        assert len(set(kfs)) == n_kf
    keyframes = dm.index[scene.scene_id].keyframes
    for k, kf in enumerate(kfs):
        assert keyframes[kf].start <= frames[k * C] < keyframes[kf].stop  # each frame lies in its keyframe
        if allowed_frames is not None:
            assert frames[k * C] in allowed_frames
    for v in (0, V - 1):
        rec = scene.image(frames[v], int(views.cam_indices[v]))
        np.testing.assert_allclose(views.extrinsics[v].numpy(), rec.c2w, atol=1e-5)
        np.testing.assert_allclose(views.intrinsics[v, :3, :3].numpy(), rec.K, atol=1e-4)
    return set(frames[::C])


@settings(max_examples=25, **SETTINGS)
@given(opts=dm_options(), steps=st.lists(st.integers(0, 10_000), min_size=1, max_size=3))
def test_batch_composition(root, opts, steps):
    from evolsplat_ns.data.datamanager import EvolSplatDataManager, EvolSplatDataManagerConfig
    from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig

    def make():
        cfg = EvolSplatDataManagerConfig(dataparser=EvolSplatDataParserConfig(data=root, check_depth_values=False),
                                         **opts)
        return EvolSplatDataManager(cfg, device="cpu", test_mode="val")

    try:
        dm = make()
    except (ConfigError, DataValidationError) as e:  # options that cannot work are refused at set-up, by name
        assert any(k in str(e) for k in ("num_source_keyframes", "num_target_keyframes", "keyframes_per_segment",
                                         "min_keyframes_per_s", "train_scene_ids", "segment", "keyframe_max_frames")), str(e)
        return
    # once set up, no step fails: every batch has the documented layout
    for step in sorted(steps):
        _, b = dm.next_train(step)
        scene, seg = dm.scenes[b.scene_id], dm.segment(b.scene_id, b.segment_id)
        assert b.scene_id in dm.train_scene_ids
        spread = opts["view_selection"] == "spread"  # one frame per keyframe; 'near' counts frames
        src = _check_views(dm, scene, seg, b.source, opts["num_source_keyframes"], distinct=spread)
        tgt = _check_views(dm, scene, seg, b.target, opts["num_target_keyframes"], distinct=spread)
        if not opts["targets_include_sources"]:
            assert not src & tgt
    scored = []
    for b in dm.eval_batches():  # eval scenes: even frames in, odd frames tested, each image once
        scene, seg = dm.scenes[b.scene_id], dm.segment(b.scene_id, b.segment_id)
        held = b.scene_id in dm.eval_scene_ids
        src = _check_views(dm, scene, seg, b.source, opts["num_source_keyframes"],
                           {t for t in range(scene.num_frames) if t % 2 == 0} if held else None, distinct=False)
        tgt = _check_views(dm, scene, seg, b.target, len(b.target) // scene.num_cameras,
                           {t for t in range(scene.num_frames) if t % 2 == 1} if held else None, distinct=False)
        if not opts["targets_include_sources"]:
            assert not src & tgt
        scored += [(b.scene_id, t) for t in b.target.frame_indices.tolist()[::scene.num_cameras]]
    evaluated = dm.eval_scene_ids or dm.train_scene_ids
    assert sorted(scored) == [(s, t) for s in sorted(evaluated) for t in range(dm.scenes[s].num_frames)
                              if s not in dm.eval_scene_ids or t % 2 == 1]
    # a batch is a function of (seed, step): a fresh data manager gives the same one
    a, b = make(), make()
    for step in sorted(steps):
        _, ba = a.next_train(step)
        _, bb = b.next_train(step)
        assert (ba.scene_id, ba.segment_id, ba.is_new_segment) == (bb.scene_id, bb.segment_id, bb.is_new_segment)
        assert ba.source.frame_indices.tolist() == bb.source.frame_indices.tolist()
        assert ba.target.frame_indices.tolist() == bb.target.frame_indices.tolist()
