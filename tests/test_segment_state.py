"""Per-segment state: activation, exact restore, LRU residency, checkpoints (weights_only)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from evolsplat_ns.model.segment_state import SegmentStateStore
from evolsplat_ns.pointcloud.init import init_gaussians


def make_init(scene_id: int, segment_id: int, n: int = 50, calls=None):
    """init_fn of a segment: Gaussians of a random cloud that depends on (scene, segment)."""

    def init():
        if calls is not None:
            calls.append((scene_id, segment_id))
        rng = np.random.default_rng([scene_id, segment_id])
        pts = rng.normal(size=(n + segment_id, 3)).astype(np.float32)
        return init_gaussians(pts, rng.uniform(0, 1, pts.shape), seed=scene_id * 100 + segment_id)

    return init


def snapshot(d):
    return {k: v.clone() for k, v in d.items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a[k], b[k]), k
        # bit for bit, NaN-safe
        assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k


def test_activate_new_and_returning_segments_restore_exactly():
    calls = []
    store = SegmentStateStore(resident_segments=2)
    assert store.activate(0, 0, make_init(0, 0, calls=calls)) is True
    store.update_offset(torch.arange(5), torch.full((5, 3), 0.25))
    mask = torch.zeros(store.current["means"].shape[0], dtype=torch.bool)
    mask[10:13] = True
    store.update_offset(mask, torch.tensor([[1.0, 2.0, 3.0]] * 3, requires_grad=True) * 0.01)
    before = snapshot(store.current)
    assert before["offset"][:5].eq(0.25).all() and before["offset"][10:13].abs().sum() > 0

    assert store.activate(0, 1, make_init(0, 1, calls=calls)) is True
    assert store.current_key == (0, 1) and store.current["means"].shape[0] == 51
    store.update_offset(torch.tensor([0]), torch.ones(1, 3))
    for key in [(0, 2), (0, 3)]:  # more segments than resident_segments: (0, 0) gets evicted
        store.activate(*key, make_init(*key, calls=calls))
    assert store.activate(0, 0, make_init(0, 0, calls=calls)) is False
    assert_identical(store.current, before)
    assert store.activate(0, 1, make_init(0, 1, calls=calls)) is False
    assert store.current["offset"][0].tolist() == [1.0, 1.0, 1.0]
    assert calls == [(0, 0), (0, 1), (0, 2), (0, 3)]  # each init_fn ran once
    assert store.num_segments == 4 and store.num_inits == 4


def test_same_segment_id_in_different_scenes_does_not_collide():
    store = SegmentStateStore()
    store.activate(0, 3, make_init(0, 3))
    a = snapshot(store.current)
    assert store.activate(1, 3, make_init(1, 3)) is True
    b = snapshot(store.current)
    assert not torch.equal(a["means"], b["means"])
    store.update_offset(torch.tensor([1, 2]), torch.ones(2, 3))
    store.activate(0, 3, make_init(0, 3))
    assert_identical(store.current, a)
    assert (0, 3) in store and (1, 3) in store and (2, 3) not in store


def test_lru_residency_is_bounded():
    store = SegmentStateStore(resident_segments=2)
    for seg in range(5):
        store.activate(0, seg, make_init(0, seg))
    assert store.resident_keys() == [(0, 3), (0, 4)]
    store.activate(0, 1, make_init(0, 1))
    assert store.resident_keys() == [(0, 4), (0, 1)] and store.current_key == (0, 1)
    assert store.keys()[-1] == (0, 1)
    with pytest.raises(ValueError):
        SegmentStateStore(resident_segments=0)


def test_current_without_activation_and_bad_init():
    store = SegmentStateStore()
    with pytest.raises(RuntimeError, match="activate"):
        _ = store.current
    with pytest.raises(TypeError):
        store.activate(0, 0, lambda: [torch.zeros(3)])
    with pytest.raises(TypeError, match="'n'"):
        store.activate(0, 0, lambda: {"means": torch.zeros(2, 3), "n": 3})
    store.activate(0, 0, lambda: {"means": torch.zeros(4, 3)})
    assert torch.equal(store.current["offset"], torch.zeros(4, 3))  # added when missing
    with pytest.raises(ValueError, match="mask"):
        store.update_offset(torch.ones(3, dtype=torch.bool), torch.zeros(3, 3))


def test_caches_and_frozen_volume():
    store = SegmentStateStore(resident_segments=1)
    built = []
    store.activate(0, 0, make_init(0, 0))
    v = store.cached("voxels", lambda: built.append(0) or object())
    assert store.cached("voxels", lambda: built.append(1)) is v and built == [0]
    store.frozen_volume = {"feats": torch.arange(6.0).reshape(2, 3), "coords": torch.ones(2, 4, dtype=torch.int32)}
    store.activate(0, 1, make_init(0, 1))
    assert store.frozen_volume is None and store.get_cache("voxels") is None
    store.activate(0, 0, make_init(0, 0))
    assert torch.equal(store.frozen_volume["feats"], torch.arange(6.0).reshape(2, 3))
    # a plain object cannot be moved: dropped when its segment is evicted (only when the device changes; on a
    # single-device machine nothing moves and it stays)
    assert store.get_cache("voxels") is v
    store.clear_caches("frozen_volume")
    assert store.frozen_volume is None


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_across_scenes_weights_only():
    store = SegmentStateStore(resident_segments=2)
    keys = [(0, 0), (0, 1), (1, 0), (2, 5)]
    for key in keys:
        store.activate(*key, make_init(*key))
        store.update_offset(torch.arange(3), torch.randn(3, 3))
    store.activate(1, 0, make_init(1, 0))
    store.frozen_volume = torch.randn(4, 16)
    expected = {key: snapshot(store.get(*key)) for key in keys}
    volume = store.frozen_volume.clone()

    sd = _roundtrip(store.state_dict())
    assert set(sd) == {"_extra_state"}
    other = SegmentStateStore(resident_segments=2)
    other.load_state_dict(sd)
    assert other.current_key == (1, 0) and torch.equal(other.frozen_volume, volume)
    calls = []
    for key in keys:
        assert other.activate(*key, make_init(*key, calls=calls)) is False
        assert_identical(other.current, expected[key])
    assert calls == [] and other.keys() == keys

    # the saved state is a copy: later updates do not leak into it
    sd2 = store.state_dict()
    store.update_offset(torch.arange(3), torch.zeros(3, 3))
    saved = [s for s in sd2["_extra_state"]["segments"] if (s["scene_id"], s["segment_id"]) == (1, 0)][0]
    assert torch.equal(saved["tensors"]["offset"], expected[(1, 0)]["offset"])


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.segments = SegmentStateStore()


def test_travels_in_the_model_state_dict_and_follows_to():
    model = TinyModel()
    model.to("cpu")
    assert model.segments.device == torch.device("cpu")
    model.segments.activate(4, 2, make_init(4, 2))
    model.segments.update_offset(torch.tensor([7]), torch.full((1, 3), 0.5))
    expected = snapshot(model.segments.current)
    sd = _roundtrip(model.state_dict())
    assert "segments._extra_state" in sd and "lin.weight" in sd
    fresh = TinyModel()
    fresh.load_state_dict(sd, strict=True)
    assert fresh.segments.current_key == (4, 2)
    assert_identical(fresh.segments.current, expected)
    assert list(fresh.segments.parameters()) == []


def test_persist_subset_rebuilds_the_rest_with_init_fn():
    store = SegmentStateStore(persist=("offset",))
    store.activate(0, 0, make_init(0, 0))
    store.update_offset(torch.arange(4), torch.full((4, 3), 0.3))
    expected = snapshot(store.current)
    sd = _roundtrip(store.state_dict())
    assert set(sd["_extra_state"]["segments"][0]["tensors"]) == {"offset"}
    other = SegmentStateStore(persist=("offset",))
    other.load_state_dict(sd)
    assert other.current_key is None  # needs its init_fn first
    calls = []
    assert other.activate(0, 0, make_init(0, 0, calls=calls)) is False and calls == [(0, 0)]
    assert_identical(other.current, expected)


@pytest.mark.gpu
def test_eviction_moves_tensors_off_the_gpu_and_back_exactly():
    store = SegmentStateStore(resident_segments=1).to("cuda")
    store.activate(0, 0, make_init(0, 0))
    assert store.current["means"].is_cuda
    store.update_offset(torch.arange(3, device="cuda"), torch.ones(3, 3, device="cuda"))
    store.frozen_volume = torch.randn(8, device="cuda")
    before = {k: v.cpu() for k, v in store.current.items()}
    store.activate(0, 1, make_init(0, 1))
    assert store.device_of(0, 0).type == "cpu" and store.current["means"].is_cuda
    assert store.get(0, 0)["means"].device.type == "cpu"
    store.activate(0, 0, make_init(0, 0))
    assert store.current["offset"].is_cuda and store.frozen_volume.is_cuda
    assert_identical({k: v.cpu() for k, v in store.current.items()}, before)
