"""Multi-GPU training semantics, on the CPU: two processes over gloo, nerfstudio's Trainer in each.

One run checks, in the same two processes:

- after step 0 both ranks hold identical parameters, equal to a single-process step over the union of their two
  segment batches (losses averaged over the batches, i.e. DDP's averaged gradients), gradients included;
- the ranks train different segments at every step, and each segment's state lives on its rank only;
- a run resumed from the checkpoint rank 0 wrote after step 1 continues exactly like the uninterrupted run (weights,
  every rank's scheduler position and offset cache): it continues a restored segment, then switches;
- rank 0's checkpoint holds every rank's state (``torch.load(weights_only=True)``), and one process can resume or
  evaluate it (segment states merged, schedule restarted).

The single-process reference runs in rank 0's process after the distributed runs (its imports are paid once).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 4  # run A: steps 0..3 (checkpoints after steps 1, 2, 3); run B resumes after step 1 and runs steps 2, 3
BATCHES_PER_SEGMENT = 3  # so run B first continues a segment whose state it restored, then switches segments


def _config(data_root: Path, out_dir: Path, **trainer):
    from conftest import small_trainer_config

    cfg = small_trainer_config(data_root, out_dir, bg_num_points=300, max_points=600, no_periodic_eval=True, **trainer)
    cfg.machine.seed = 7
    cfg.pipeline.datamanager.num_target_keyframes = 1
    cfg.pipeline.datamanager.batches_per_segment = BATCHES_PER_SEGMENT
    cfg.pipeline.model.pointcloud_cache_dir = data_root / ".cache"
    return cfg


def _snapshot(pipe):
    dm, store = pipe.datamanager, pipe.ff_model.segments
    return {
        "params": {n: p.detach().clone() for n, p in pipe.ff_model.named_parameters()},
        "buffers": {n: b.clone() for n, b in pipe.ff_model.named_buffers() if "running" in n},
        "scheduler": dm.scheduler.state_dict(),
        "offsets": {k: store.get(*k)["offset"].clone() for k in store.keys()},
    }


def _worker(rank: int, port: int, data_root: str, out: str) -> None:
    import torch.distributed as dist
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    torch.set_num_threads(1)
    os.environ.setdefault("EVOLSPLAT_NS_VERBOSE", "1")
    if any(name == "lo" for _, name in socket.if_nameindex()):  # gloo on loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(1000 + rank)  # different initial weights per rank, as under ns-train: DDP must unify them
        out_dir = Path(out)
        rec = {"rank": rank, "keys": []}

        def record_batches(pipe):
            orig = pipe.datamanager.next_train

            def next_train(step):
                cams, batch = orig(step)
                rec["keys"].append((step, batch.scene_id, batch.segment_id))
                if step == 0:
                    rec["batch0"] = batch
                return cams, batch

            pipe.datamanager.next_train = next_train

        # ---- run A: uninterrupted
        cfg = _config(Path(data_root), out_dir / "a", max_num_iterations=STEPS, steps_per_save=1,
                      save_only_latest_checkpoint=False)
        trainer = cfg.setup(local_rank=rank, world_size=WORLD)
        trainer.setup()
        pipe = trainer.pipeline
        record_batches(pipe)

        def before(step):
            if step == 0:
                rec["init_state"] = {k: v.clone() for k, v in pipe.ff_model.state_dict().items()
                                     if isinstance(v, torch.Tensor)}

        def after(step):
            if step == 0:
                m = pipe.ff_model
                rec["step0_grads"] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
                rec["step0"] = _snapshot(pipe)

        trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before))
        trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], after))
        trainer.train()
        rec["final_a"] = _snapshot(pipe)
        rec["ckpt_dir"] = str(cfg.get_checkpoint_dir())
        dist.barrier()  # rank 0's checkpoints are on disk

        # ---- run B: resumed from the checkpoint written after step 1
        cfg_b = _config(Path(data_root), out_dir / "b", max_num_iterations=STEPS - 2,
                        load_checkpoint=cfg.get_checkpoint_dir() / "step-000000001.ckpt")
        trainer_b = cfg_b.setup(local_rank=rank, world_size=WORLD)
        trainer_b.setup()
        record_b = trainer_b.pipeline
        trainer_b.train()
        rec["final_b"] = _snapshot(record_b)
        torch.save(rec, out_dir / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:  # the single-process reference over both ranks' step-0 batches
            other = torch.load(out_dir / "rank1.pt", weights_only=False)
            ref, grads = _single_process_union_step(Path(data_root), out_dir, rec["init_state"],
                                                    [rec["batch0"], other["batch0"]])
            torch.save(_snapshot(ref) | {"grads": grads}, out_dir / "reference.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from conftest import synthetic_root

    return synthetic_root(tmp_path_factory, "ddp", 3, 5, 24, 72, num_cameras=2)


@pytest.fixture(scope="module")
def ddp_run(data_root, tmp_path_factory):
    from evolsplat_ns.pipeline.distributed import free_port, spawn_local

    for attempt in range(2):
        out = tmp_path_factory.mktemp("ddp_runs")
        for run in ("a", "b"):  # both ranks create the run folders; make them first (a mkdir race seen under load)
            (out / run / "synth" / "evolsplat-ff-small" / "run" / "nerfstudio_models").mkdir(parents=True)
        try:
            spawn_local(_worker, WORLD, args=(free_port(), str(data_root), str(out)), timeout_s=240)
            break
        except Exception as e:  # noqa: BLE001 - one retry for a file-system race between the ranks, nothing else
            if attempt or not any(k in str(e) for k in ("FileExistsError", "FileNotFoundError")):
                raise
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, torch.load(out / "reference.pt", weights_only=False)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (0 for equal tensors)."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _single_process_union_step(data_root, tmp_path, init_state, batches):
    """Reference: one process, one optimizer step on the mean of the batches' losses, from rank 0's initial weights."""
    from nerfstudio.engine.optimizers import Optimizers

    cfg = _config(data_root, tmp_path / "ref")
    torch.set_num_threads(1)  # as in the workers: the same summation orders, so equal up to rounding
    pipe = cfg.pipeline.setup(device="cpu", test_mode="val")
    model = pipe.ff_model
    missing, unexpected = model.load_state_dict(init_state, strict=False)
    assert not unexpected and all("segments" in k for k in missing), (missing, unexpected)
    optimizers = Optimizers(cfg.optimizers.copy(), pipe.get_param_groups())
    optimizers.zero_grad_all()
    for b in batches:
        pipe.train_on_batch(b, step=0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= len(batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizers.optimizer_step_all()
    return pipe, grads


def test_ddp_step_equals_single_process_union_step(ddp_run, data_root, tmp_path):
    (r0, r1), ref = ddp_run
    # the ranks built their models from different seeds; DDP gave both rank 0's weights before the first step
    for k, v in r0["init_state"].items():
        assert torch.equal(v, r1["init_state"][k]), k
    # both ranks hold identical weights after the step
    for n, p in r0["step0"]["params"].items():
        assert torch.equal(p, r1["step0"]["params"][n]), n
    # ... equal to one process stepping on the union of the two batches (gradients averaged)
    ref_grads = ref["grads"]
    assert set(ref_grads) == set(r0["step0_grads"]) == set(r1["step0_grads"])
    for n, g in ref_grads.items():  # float32, one thread everywhere: equal up to rounding (~1e-7 of the scale)
        for r in (r0, r1):
            assert _rel_err(r["step0_grads"][n], g) < 1e-6, (n, _rel_err(r["step0_grads"][n], g))
    # Adam's first step moves each weight by lr * g / (|g| + eps): compare where the gradient is above rounding
    lr = max(o["optimizer"].lr for o in _config(data_root, tmp_path).optimizers.values())
    for n, b in ref["params"].items():
        a, g = r0["step0"]["params"][n], ref_grads.get(n)
        if g is None:
            assert torch.equal(a, b), n
            continue
        clear = g.abs() > 1e-5 * g.abs().max()
        torch.testing.assert_close(a[clear], b[clear], rtol=1e-6, atol=1e-4 * lr, msg=n)  # float32 rounding
        assert (a - b).abs().max() <= 2.0001 * lr, n
    # each segment's state lives on its rank: the offsets each rank wrote equal the reference's for that segment
    assert len(ref["offsets"]) == 2
    for r in (r0, r1):
        (key,) = r["step0"]["offsets"].keys()
        assert _rel_err(r["step0"]["offsets"][key], ref["offsets"][key]) < 1e-6


def test_ranks_train_different_segments(ddp_run):
    (r0, r1), _ = ddp_run
    k0 = {step: (sc, sg) for step, sc, sg in r0["keys"]}
    k1 = {step: (sc, sg) for step, sc, sg in r1["keys"]}
    assert sorted(k0) == sorted(k1) == list(range(STEPS))
    assert all(k0[s] != k1[s] for s in k0)
    assert not set(k0.values()) & set(k1.values())  # one owner per segment for the whole run
    assert not set(r0["final_a"]["offsets"]) & set(r1["final_a"]["offsets"])  # per-segment state on its rank only
    assert r0["final_a"]["scheduler"]["rank"] == 0 and r1["final_a"]["scheduler"]["rank"] == 1
    # replicas stay identical: weights, and the BatchNorm statistics DDP broadcasts from rank 0
    assert r0["final_a"]["buffers"]
    for key in ("params", "buffers"):
        for n, v in r0["final_a"][key].items():
            assert torch.equal(v, r1["final_a"][key][n]), n


def test_checkpoint_of_rank0_holds_every_rank(ddp_run):
    (r0, r1), _ = ddp_run
    state = torch.load(Path(r0["ckpt_dir"]) / "step-000000001.ckpt", map_location="cpu", weights_only=True)
    ranks = state["pipeline"]["_extra_state"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[1]["scheduler"]["rank"] == 1 and ranks[1]["segments"]["segments"]
    assert ranks[0]["segments"] is None  # rank 0's store is the model's own entry
    assert any(k.endswith("segments._extra_state") for k in state["pipeline"])


def test_resume_continues_exactly(ddp_run):
    for r in ddp_run[0]:
        a, b = r["final_a"], r["final_b"]
        assert b["scheduler"] == a["scheduler"]
        for n, p in a["params"].items():
            torch.testing.assert_close(b["params"][n], p, rtol=1e-6, atol=1e-8, msg=n)
        assert set(b["offsets"]) <= set(a["offsets"])
        for k, off in b["offsets"].items():
            torch.testing.assert_close(off, a["offsets"][k], rtol=1e-6, atol=1e-8)


def test_one_process_resumes_or_evaluates_a_two_process_checkpoint(ddp_run, data_root, tmp_path):
    (r0, r1), _ = ddp_run
    state = torch.load(Path(r0["ckpt_dir"]) / f"step-{STEPS - 1:09d}.ckpt", map_location="cpu", weights_only=True)
    saved = {k: off for r in (r0, r1) for k, off in r["final_a"]["offsets"].items()}
    for mode in ("val", "test"):  # resume training on one GPU / ns-eval, ns-viewer
        pipe = _config(data_root, tmp_path / mode).pipeline.setup(device="cpu", test_mode=mode)
        pipe.load_pipeline(state["pipeline"], state["step"])
        store = pipe.ff_model.segments
        assert set(store.keys()) == set(saved)  # both ranks' segment states, merged
        for (sc, sg), off in saved.items():
            assert torch.equal(store.get(sc, sg)["offset"], off)
        for n, p in pipe.ff_model.named_parameters():
            assert torch.equal(p.detach(), r0["final_a"]["params"][n]), n
        if mode == "val":  # the schedule of one process starts at the pass after the furthest saved one
            passes = [r["final_a"]["scheduler"]["pass"] for r in (r0, r1)]
            assert pipe.datamanager.scheduler.state_dict()["pass"] == max(passes) + 1
            assert pipe.datamanager.scheduler.state_dict()["world_size"] == 1
