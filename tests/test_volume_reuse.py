"""A known segment reconstructed again in inference reuses its volume features and offsets (``reuse_volume``).

They depend on the segment's seed cloud and the network's weights only, not on the source images, so a later
reconstruction with other sources skips the U-Net (the second samples every point once, the later ones gather) and
gives what recomputing them gives; a change of weights (in
place, as an optimizer step makes it, or by loading a checkpoint) recomputes them; training never reuses them; only
one segment's are kept, and checkpoints do not hold them.
"""

import torch

from evolsplat_ns.data.batch import SegmentBatch
from model_fixtures import model_and_batch, views


def _counted(model):
    calls = []
    model.encoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _other_sources(batch, xs=(0.3, 0.8, 1.4), seed=7):
    return SegmentBatch(0, 0, views(list(xs), 24, 40, "cpu", seed), batch.target, True)


def _recomputed(model, batch):
    model.config.reuse_volume = False
    try:
        with torch.no_grad():
            return model.extract_shared(batch)
    finally:
        model.config.reuse_volume = True


def _assert_same_state(a, b):
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.f3, b.f3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.means, b.means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.fw, b.fw)


def test_other_sources_reuse_the_volume_and_equal_a_recomputation():
    model, batch = model_and_batch("cpu", points=3000, H=24, W=40)
    calls = _counted(model)
    other = _other_sources(batch)
    with torch.no_grad():
        first = model.extract_shared(batch)  # keeps the volume
        again = model.extract_shared(other)  # samples every point once
        third = model.extract_shared(batch)  # gathers
    assert len(calls) == 1, "a later reconstruction of the segment ran the U-Net again"
    assert not torch.equal(first.mask, again.mask), "the sources should see other points (the test's premise)"
    _assert_same_state(again, _recomputed(model, other))
    _assert_same_state(third, _recomputed(model, batch))
    _assert_same_state(third, first)
    assert len(calls) == 3


def test_a_change_of_weights_recomputes_the_volume():
    model, batch = model_and_batch("cpu", points=3000, H=24, W=40)
    calls = _counted(model)
    with torch.no_grad():
        before = model.extract_shared(batch)
    # an optimizer step (foreach Adam updates the parameters in place)
    params = list(model.heads.offset.parameters())
    opt = torch.optim.Adam(params, lr=0.05, foreach=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        after_step = model.extract_shared(batch)
    assert not torch.allclose(after_step.means, before.means)
    _assert_same_state(after_step, _recomputed(model, batch))
    # a loaded checkpoint (the encoder's weights: the U-Net runs again)
    n = len(calls)
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.encoder.state_dict().items()}
    model.encoder.load_state_dict(sd)
    with torch.no_grad():
        after_load = model.extract_shared(batch)
    assert len(calls) == n + 1
    assert not torch.allclose(after_load.f3, after_step.f3)
    _assert_same_state(after_load, _recomputed(model, batch))
    # an option that shapes the volume (dense sampling, as the reference samples it)
    model.config.volume_sampling = "dense"
    with torch.no_grad():
        dense = model.extract_shared(batch)
    assert len(calls) == n + 3  # after_load, its recomputation, and dense
    _assert_same_state(dense, _recomputed(model, batch))


def test_training_never_reuses_and_checkpoints_do_not_hold_it():
    model, batch = model_and_batch("cpu", points=3000, H=24, W=40)
    calls = _counted(model)
    with torch.no_grad():
        model.extract_shared(batch)
    extra = model.segments.get_extra_state()
    assert all("volume_points" not in seg["caches"] for seg in extra["segments"])
    model.train()
    with torch.no_grad():
        model.extract_shared(batch)
    model.extract_shared(batch)  # with gradient
    assert len(calls) == 3


def test_only_the_last_segment_keeps_its_volume():
    model, batch = model_and_batch("cpu", points=3000, H=24, W=40)
    seg0 = dict(model.segments.current)
    with torch.no_grad():
        model.extract_shared(batch)
        assert model.segments.get_cache("volume_points") is not None
        shifted = {k: v.clone() for k, v in seg0.items()}
        shifted["means"] = shifted["means"] + torch.tensor([0.5, 0.0, 0.0])
        model.segments.activate(0, 1, lambda: shifted)
        model.extract_shared(SegmentBatch(0, 1, batch.source, batch.target, True))
        model.segments.activate(0, 0, lambda: seg0)
        assert model.segments.get_cache("volume_points") is None
