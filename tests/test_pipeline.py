"""The train step and the nerfstudio workflow end to end on the CPU (small synthetic scenes).

Exact gradients of the cut-graph train step, one shared extraction per step, the stock Trainer, checkpoints that
load with ``weights_only=True`` and resume exactly, ns-eval's JSON, the viewer's render path, zero-shot
inference with PLY export, and non-finite losses that leave the weights alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from evolsplat_ns.data.batch import Views
from conftest import small_trainer_config, synthetic_root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory, "pipe", 3, 5, 24, 72, num_cameras=3)


def small_config(data_root, out_dir=None, **trainer):
    return small_trainer_config(data_root, out_dir, bg_num_points=1000, max_points=1500, **trainer)


def _first_views(v: Views, n: int) -> Views:
    return Views(v.image[:n], v.extrinsics[:n], v.intrinsics[:n], v.depth[:n], v.frame_indices[:n],
                 v.cam_indices[:n], v.keyframe_indices[: max(1, n // 3)])


@pytest.mark.parametrize("T", [1, 3, 6])
def test_train_step_gradient_equals_joint_backward(data_root, T):
    pipe = small_config(data_root).pipeline.setup(device="cpu", test_mode="val")
    model = pipe.ff_model
    _, batch = pipe.datamanager.next_train(0)
    batch.target = _first_views(batch.target, T)
    pipe.activate(batch.scene_id, batch.segment_id)
    offsets = model.segments.current["offset"].clone()
    calls = {"n": 0}
    orig = model.extract_shared

    def counted(b):
        calls["n"] += 1
        return orig(b)

    model.extract_shared = counted
    metrics = pipe.train_on_batch(batch, step=0)  # step 0: the entropy term is included
    assert calls["n"] == 1  # the shared extraction ran once for all T views
    cut = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(cut) == len([p for p in model.parameters() if p.numel() > 0])
    # reference: one joint backward of the mean of the per-view losses, from the same offsets
    model.zero_grad(set_to_none=True)
    model.segments.current["offset"].copy_(offsets)
    shared = orig(batch)
    tgt = batch.target
    total = sum(sum(model.view_loss(model.render_view(shared, tgt.extrinsics[v], tgt.intrinsics[v],
                                                      tgt.height, tgt.width), tgt.image[v], 0).values())
                for v in range(T)) / T
    total.backward()
    assert metrics["view_loss_mean"] == pytest.approx(float(total.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        if n in cut:
            torch.testing.assert_close(cut[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 3 and 5."""
    from nerfstudio.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("runs")
    # every evaluation hook of the stock Trainer runs too (batch, one image, all images)
    cfg = small_config(data_root, out / "a", max_num_iterations=6, steps_per_save=3,
                       save_only_latest_checkpoint=False, steps_per_eval_batch=2, steps_per_eval_image=3,
                       steps_per_eval_all_images=4)
    cfg.set_timestamp()
    cfg.save_config()  # what ns-train does before training
    trainer = Trainer(cfg, local_rank=0, world_size=1)
    trainer.setup()
    pipe = trainer.pipeline
    pipe.all_images_calls = []  # what the Trainer's all-images evaluation got (and logged as scalars)
    orig = pipe.get_average_eval_image_metrics

    def recorded(*args, **kwargs):
        out = orig(*args, **kwargs)
        pipe.all_images_calls.append((args, kwargs, out))
        return out

    pipe.get_average_eval_image_metrics = recorded
    trainer.train()
    pipe.get_average_eval_image_metrics = orig
    return cfg, trainer


def test_stock_trainer_runs_and_checkpoints_load_safely(trained):
    cfg, trainer = trained
    ckpts = sorted(cfg.get_checkpoint_dir().glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["step-000000003.ckpt", "step-000000005.ckpt"]
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)  # what nerfstudio itself does
    assert {"step", "pipeline", "optimizers", "schedulers", "scalers"} <= set(state)
    assert any(k.endswith("segments._extra_state") for k in state["pipeline"])
    assert any(k.endswith("datamanager._extra_state") for k in state["pipeline"])


def _held_out_images(num_frames=30, num_cameras=3):
    """The eval scene's held-out images under the default 'odd' hold-out: every camera of every odd frame."""
    return {(t, c) for t in range(num_frames) if t % 2 == 1 for c in range(num_cameras)}


def test_ns_eval_json(trained, tmp_path):
    from nerfstudio.scripts.eval import ComputePSNR

    cfg, _ = trained
    out = tmp_path / "m.json"
    ComputePSNR(load_config=cfg.get_base_dir() / "config.yml", output_path=out,
                render_output_path=tmp_path / "renders").main()
    res = json.loads(out.read_text())["results"]
    assert {"psnr", "ssim", "psnr_std", "ssim_std", "num_views", "views"} <= set(res)
    assert 5 < res["psnr"] < 40 and 0 < res["ssim"] <= 1
    # every held-out image of the eval scene (scene_002: 30 frames, 3 cameras), each scored once
    rows = res["views"]
    assert res["num_views"] == len(rows) == len(_held_out_images()) == 45
    assert sorted((r["frame"], r["camera"]) for r in rows) == sorted(_held_out_images())
    assert {r["scene"] for r in rows} == {"scene_002"}
    assert res["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / len(rows))
    assert len(list((tmp_path / "renders").glob("*.png"))) == res["num_views"]


def test_all_images_evaluation_during_training_logs_numbers_only(trained):
    """The Trainer calls get_average_eval_image_metrics with its step and logs every value as a scalar: there the
    dict holds numbers only (no per-view rows, which ns-eval gets with step None), over every held-out image."""
    _, trainer = trained
    (args, kwargs, out), = trainer.pipeline.all_images_calls  # steps_per_eval_all_images=4 of 6 steps
    assert kwargs.get("step", args[0] if args else None) == 4
    assert "views" not in out and all(isinstance(v, (int, float)) for v in out.values())
    assert out["num_views"] == len(trainer.pipeline.datamanager.held_out_views()) == len(_held_out_images())
    assert 5 < out["psnr"] < 40


def test_viewer_render_path(trained):
    from nerfstudio.utils.eval_utils import eval_setup

    cfg, _ = trained
    _, pipe, _, _ = eval_setup(cfg.get_base_dir() / "config.yml", test_mode="test")
    # ns-viewer first walks every attribute of the pipeline looking for GUI elements: nothing may raise there
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    parse_object(pipe, ViewerElement, "pipeline")
    cams = pipe.datamanager.train_dataset.cameras[0:1]
    out = pipe.model.get_outputs_for_camera(cams)  # no segment chosen yet: the first eval segment is shown
    assert out["rgb"].shape == (24, 72, 3) and out["rgb"].std() > 0.01
    assert {"depth", "accumulation", "background", "foreground"} <= set(out)
    first = out["rgb"].clone()
    sid, seg = pipe.datamanager.eval_keys()[-1]
    pipe.display.show(sid, seg)
    assert not torch.allclose(pipe.model.get_outputs_for_camera(cams)["rgb"], first)


def test_zero_shot_inference_and_ply(trained, data_root, tmp_path):
    from plyfile import PlyData

    from evolsplat_ns.cli.infer import InferArgs, main

    cfg, _ = trained
    summary = main(InferArgs(load_config=cfg.get_base_dir() / "config.yml", data=data_root / "scene_002",
                             output=tmp_path / "infer"))
    m = json.loads((tmp_path / "infer" / "metrics.json").read_text())
    assert m["mean"]["psnr"] > 5 and len(m["segments"]) == len(summary["segments"]) >= 1
    # the held-out (odd) frames' images, every one scored exactly once, as ns-eval scores them
    assert m["num_views"] == len(m["views"]) == 45
    assert sorted((v["frame"], v["camera"]) for v in m["views"]) == sorted(_held_out_images())
    assert sum(s["num_views"] for s in m["segments"]) == 45
    assert sum(len(b["target_frames"]) for b in m["batches"]) == 15
    assert all(not set(b["source_frames"]) & {v["frame"] for v in m["views"]} for b in m["batches"])
    assert len(list((tmp_path / "infer" / "renders").glob("*.png"))) == len(m["views"])
    assert not list((tmp_path / "infer").glob(".tmp-*"))  # written atomically: no temporary file left
    ply = PlyData.read(m["segments"][0]["ply"])["vertex"]
    names = [p.name for p in ply.properties]
    assert names[:3] == ["x", "y", "z"] and "f_dc_0" in names and "f_rest_8" in names and "rot_3" in names
    assert len(ply) == m["segments"][0]["num_gaussians"]
    assert all(s["segment_init_ms"] > 0 and s["reconstruction_ms"] > 0 for s in m["segments"])


def test_first_training_step_prebuilds_the_clouds_it_will_visit(data_root, tmp_path, capsys):
    """Before its first step, training builds the clouds and KNN scales of the segments its planned steps visit, with
    a progress bar; cached ones are not built again; switched off, only the first segment is built."""
    cfg = small_config(data_root)
    cfg.pipeline.model.pointcloud_cache_dir = tmp_path / "clouds"
    pipe = cfg.pipeline.setup(device="cpu", test_mode="val")
    sched = pipe.datamanager.scheduler
    bps = pipe.datamanager.config.batches_per_segment
    keys = {(s, g.segment_id) for s in pipe.datamanager.train_scene_ids for g in pipe.datamanager.index[s].segments}
    assert sched.upcoming(1) == sched.upcoming(bps) == sched.upcoming()[:1] and set(sched.upcoming()) == keys
    pipe.planned_steps = bps + 1  # what the trainer sets (max_num_iterations): two segments
    pipe.get_train_loss_dict(0)
    assert "Segment clouds" in capsys.readouterr().out
    assert len(list((tmp_path / "clouds").rglob("*.ply"))) == len(list((tmp_path / "clouds").rglob("*.knn.npy"))) == 2
    assert pipe.prebuild_pointclouds(sched.upcoming(bps + 1), "again") == 0  # cached (the schedule moved 1 step)
    cfg.pipeline.model.pointcloud_cache_dir = tmp_path / "lazy"
    cfg.pipeline.prebuild_pointclouds = False
    pipe = cfg.pipeline.setup(device="cpu", test_mode="val")
    pipe.get_train_loss_dict(0)
    assert len(list((tmp_path / "lazy").rglob("*.ply"))) == 1


def test_non_finite_loss_leaves_weights_unchanged(data_root, tmp_path, monkeypatch):
    from nerfstudio.engine.trainer import Trainer

    cfg = small_config(data_root, tmp_path / "nan", max_num_iterations=2)
    cfg.set_timestamp()
    trainer = Trainer(cfg, local_rank=0, world_size=1)
    trainer.setup()
    trainer.train_iteration(0)  # one good step: Adam has state now
    model = trainer.pipeline.ff_model
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(trainer.optimizers.optimizers["networks"].state_dict())
    orig = model.view_loss

    def nan_loss(out, gt, step=None):
        d = orig(out, gt, step)
        d["main_loss"] = d["main_loss"] * float("nan")
        return d

    monkeypatch.setattr(model, "view_loss", nan_loss)
    trainer.train_iteration(1)
    after = model.state_dict()
    for k, v in before.items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and "running" not in k and "segments" not in k:
            assert torch.equal(v, after[k]), k
    opt_after = trainer.optimizers.optimizers["networks"].state_dict()
    for i, st in opt_before["state"].items():
        assert torch.equal(st["exp_avg"], opt_after["state"][i]["exp_avg"])
    assert trainer.pipeline.train_step.skipped_steps == 1


def test_freeze_volume_computes_the_volume_once_per_segment(data_root):
    cfg = small_config(data_root)
    cfg.pipeline.model.freeze_volume = True
    pipe = cfg.pipeline.setup(device="cpu", test_mode="val")
    model = pipe.ff_model
    _, b0 = pipe.datamanager.next_train(0)
    _, b1 = pipe.datamanager.next_train(1)
    assert (b0.scene_id, b0.segment_id) == (b1.scene_id, b1.segment_id)
    pipe.train_on_batch(b0, 0)
    vol = model.segments.frozen_volume
    assert vol is not None
    assert all(p.grad is None for p in model.encoder.parameters())  # the U-Net gets no gradient when frozen
    assert any(p.grad is not None for p in model.heads.parameters())
    pipe.train_on_batch(b1, 1)
    assert model.segments.frozen_volume is vol  # reused, not recomputed


def test_sparse_mode_handles_a_box_too_big_to_densify(data_root):
    # 10 km x 1 km x 10 km at 0.1 m: a dense 16-channel volume would need ~6 PB; sparse sampling never allocates it
    cfg = small_config(data_root)
    cfg.pipeline.model.volume_aabb = (-5000.0, -500.0, -5000.0, 5000.0, 500.0, 5000.0)
    pipe = cfg.pipeline.setup(device="cpu", test_mode="val")
    _, batch = pipe.datamanager.next_train(0)
    metrics = pipe.train_on_batch(batch, 0)
    assert metrics["num_gaussians"] > 0 and metrics["view_loss_mean"] == metrics["view_loss_mean"]


def test_viewer_segment_chooser(trained):
    from nerfstudio.utils.eval_utils import eval_setup

    cfg, _ = trained
    _, pipe, _, _ = eval_setup(cfg.get_base_dir() / "config.yml", test_mode="test")
    dd = pipe.viewer_segment
    assert dd.options[0].startswith("eval") and any(o.startswith("train") for o in dd.options)
    cams = pipe.datamanager.train_dataset.cameras[0:1]
    first = pipe.model.get_outputs_for_camera(cams)["rgb"].clone()
    choice = [o for o in dd.options if o.startswith("train")][-1]
    dd.value = choice
    dd.cb_hook(dd)  # what the GUI does on a change
    out = pipe.model.get_outputs_for_camera(cams)["rgb"]
    assert pipe.ff_model.displayed_segment == pipe.display.picker.labels[choice]
    assert not torch.allclose(out, first)


def test_infer_with_a_truncated_checkpoint_is_one_clear_line(trained, data_root, tmp_path, capsys):
    import shutil

    from evolsplat_ns.cli.infer import InferArgs, main

    cfg, _ = trained
    bad = copy.deepcopy(cfg)
    bad.output_dir = tmp_path / "copy"
    bad.save_config()
    shutil.copytree(cfg.get_checkpoint_dir(), bad.get_checkpoint_dir())
    for ck in bad.get_checkpoint_dir().glob("*.ckpt"):
        ck.write_bytes(ck.read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit) as ei:
        main(InferArgs(load_config=bad.get_base_dir() / "config.yml", data=data_root / "scene_002",
                       output=tmp_path / "o"))
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "error:" in err and "Traceback" not in err


def test_joint_composite_and_frustum_culling_match_the_reference_composite(data_root, monkeypatch):
    """The fast render paths keep the reference image: culling points to the view frustum changes neither the
    image nor the gradients; one joint rasterization of foreground + dome gives the foreground accumulation
    exactly and ``fg + (1 - alpha_fg) bg`` up to the rasterizer's early stop (a pixel stops before the Gaussian
    that would take its transmittance below 1e-4, which can drop up to T_fg of the dome behind opaque foreground)."""
    import evolsplat_ns.model.evolsplat as evolsplat_module

    monkeypatch.setattr(evolsplat_module, "CULL_MIN_FRACTION", 1.01)  # cull whatever the fraction
    pipe = small_config(data_root).pipeline.setup(device="cpu", test_mode="val")
    model = pipe.ff_model
    _, batch = pipe.datamanager.next_train(0)
    pipe.activate(batch.scene_id, batch.segment_id)
    model.eval()
    shared = model.extract_shared(batch)
    # the fused (Triton) kernel maps are the default on CUDA; on the CPU the model keeps the PyTorch maps
    assert model.config.fused_kernel_maps and not model.segments.get_cache("voxels").kernel_maps.fused_lookup
    tgt = batch.target
    results = {}
    for composite, cull in [("separate", False), ("separate", True), ("joint", False), ("joint", True)]:
        model.config.composite, model.config.view_cull = composite, cull
        f3 = shared.f3.detach().requires_grad_(True)
        out = model.render_view(shared.with_outputs({"f3": f3, "means": shared.means.detach()}), tgt.extrinsics[0],
                                tgt.intrinsics[0], tgt.height, tgt.width)
        (out["rgb"].sum() + out["accumulation"].sum()).backward()
        results[(composite, cull)] = (out["rgb"].detach(), out["accumulation"].detach(), f3.grad.clone())
    for composite in ("separate", "joint"):
        full, culled = results[(composite, False)], results[(composite, True)]
        for a, b in zip(full, culled):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), composite
    ref, joint = results[("separate", False)], results[("joint", False)]
    assert ref[1].max() > 0.2 and ref[0].std() > 0.01  # a real picture, not an empty one
    assert torch.allclose(joint[1], ref[1], atol=1e-5)
    diff = (joint[0] - ref[0]).abs()
    assert diff.max() < 0.1 and diff.mean() < 2e-3, (float(diff.max()), float(diff.mean()))
    # culling really drops points: some of the segment lies outside this view
    from evolsplat_ns.model.render import visible_gaussians

    means = shared.means
    far = torch.tensor([0.0, 0.0, -50.0]) @ tgt.extrinsics[0][:3, :3].T + tgt.extrinsics[0][:3, 3]  # behind
    side = torch.tensor([1e4, 0.0, 10.0]) @ tgt.extrinsics[0][:3, :3].T + tgt.extrinsics[0][:3, 3]  # far right
    pts = torch.cat([means, far[None], side[None]])
    keep = visible_gaussians(pts, torch.full_like(pts, 0.05), tgt.extrinsics[0], tgt.intrinsics[0], tgt.height,
                             tgt.width)
    assert keep.numel() > 0 and len(pts) - 2 not in keep.tolist() and len(pts) - 1 not in keep.tolist()


def test_zero_shot_then_finetune(trained, data_root, tmp_path):
    """evolsplat-ns-infer --finetune-seconds: the merged feed-forward Gaussians start an evolsplat-ft run (splatfacto
    machinery) whose checkpoint nerfstudio loads; metrics.json reports both, the PLY is a 3DGS file."""
    from nerfstudio.utils.eval_utils import eval_setup

    from evolsplat_ns.cli.infer import InferArgs, main
    from evolsplat_ns.export.ply import read_gaussian_ply

    cfg, _ = trained
    main(InferArgs(load_config=cfg.get_base_dir() / "config.yml", data=data_root / "scene_002",
                   output=tmp_path / "infer", export_ply=False, finetune_seconds=600, finetune_max_steps=4))
    m = json.loads((tmp_path / "infer" / "metrics.json").read_text())
    ff, ft, row = m["feed_forward"], m["finetuned"], m["finetune_scenes"][0]
    assert ff["psnr"] == pytest.approx(m["mean"]["psnr"])  # the zero-shot figure, same views, same code
    assert row["steps"] == 4 and ft["seconds"] > 0 and ft["psnr"] > 5 and 0 < ft["ssim"] <= 1
    # the merged start renders the scene about as the feed-forward reconstruction does (not an empty or shifted set)
    assert abs(row["merged_start"]["psnr"] - ff["psnr"]) < 4.0
    g = read_gaussian_ply(row["ply"])
    assert g["means"].shape[0] == row["gaussians"]["finetuned"] > 0
    _, pipe, _, step = eval_setup(Path(row["config"]), test_mode="test")  # what ns-viewer / ns-eval load
    assert step == 3 and pipe.model.num_points == row["gaussians"]["finetuned"]
    # the default schedule is stretched over the run (here its 4 steps): it ends at splatfacto's final rate
    ckpt = torch.load(next(Path(row["config"]).parent.glob("nerfstudio_models/*.ckpt")), weights_only=False)
    assert ckpt["optimizers"]["means"]["param_groups"][0]["lr"] == pytest.approx(1.6e-6, rel=1e-3)
    cam = pipe.datamanager.eval_dataset.cameras[0:1]
    assert pipe.model.get_outputs_for_camera(cam)["rgb"].shape[-1] == 3


def test_a_budget_curve_is_one_fine_tuning_run_per_budget(trained, tmp_path):
    """With the budget schedule a run's learning rates depend on its budget, so a curve over several budgets is one
    run per budget from the same start (the benchmark's curves); the last budget's run is the result."""
    from nerfstudio.utils.eval_utils import eval_setup

    from evolsplat_ns.finetune.run import finetune_scene

    cfg, _ = trained
    _, pipe, _, _ = eval_setup(cfg.get_base_dir() / "config.yml", test_mode="test")
    sid = pipe.datamanager.eval_scene_ids[0]
    r = finetune_scene(pipe, sid, tmp_path / "ft", [1200, 600], {"psnr": 0.0, "ssim": 0.0}, max_steps=2)
    assert [p["steps"] for p in r["curve"]] == [0, 2, 2] and r["steps"] == 2
    runs = sorted(p.name for p in (tmp_path / "ft" / "runs").glob("*/evolsplat-ft/*"))
    assert runs == ["run", "run_600s"] and Path(r["config"]).parent.name == "run"
    one = finetune_scene(pipe, sid, tmp_path / "steps", [600, 1200], {"psnr": 0.0, "ssim": 0.0}, max_steps=2,
                         schedule="steps")  # splatfacto's schedule: one run, scored after each budget
    assert [p["steps"] for p in one["curve"]] == [0, 2, 2]
    assert [p.name for p in (tmp_path / "steps" / "runs").glob("*/evolsplat-ft/*")] == ["run"]
    # the start from every near-source window of each segment (median opacity): a whole scene, close to the default
    w = finetune_scene(pipe, sid, tmp_path / "windows", [600], {"psnr": 0.0, "ssim": 0.0}, max_steps=1,
                       bake="windows")
    assert w["gaussians"]["start"] > 0 and abs(w["merged_start"]["psnr"] - r["merged_start"]["psnr"]) < 3.0


def test_a_fine_tuning_sweep_runs_its_variants_in_one_process(trained, tmp_path):
    """The benchmarks' ``--variant`` sweep (GPU time goes to the runs, not to loading the model and exporting the
    scene again): each variant is its own fine-tuning run with its own options and start, its rows are named after
    it and reported as soon as it ends, and a variant that fails is recorded while the others go on. A bad variant
    is refused before any work."""
    import argparse
    import sys

    from nerfstudio.utils.eval_utils import eval_setup

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_splatfacto import add_finetune_arguments, compare_scene, finetune_variants

    ap = argparse.ArgumentParser()
    add_finetune_arguments(ap)
    args = ap.parse_args(["--ft-option", "pipeline.model.warmup_length=7", "--variant", "plain",
                          "--variant", "win", "bake=windows", "pipeline.model.refine_every=50",
                          "--variant", "bad", "pipeline.model.budget_refine_stop=2.0"])
    variants = finetune_variants(args)
    assert [(v.name, v.bake) for v in variants] == [("plain", "middle"), ("win", "windows"), ("bad", "middle")]
    assert variants[1].overrides == {"pipeline.model.warmup_length": 7, "pipeline.model.refine_every": 50}
    for bad in (["--variant", "a", "--variant", "a"], ["--variant", "a b"], ["--variant", "a", "bake=nowhere"],
                ["--variant", "a", "pipeline.model.no_such_field=1"], ["--ft-option", "pipeline.nope=1"]):
        with pytest.raises(SystemExit, match="--variant '?a|--ft-option"):
            finetune_variants(ap.parse_args(bad))

    cfg, _ = trained
    _, pipe, _, _ = eval_setup(cfg.get_base_dir() / "config.yml", test_mode="test")
    sid = pipe.datamanager.eval_scene_ids[0]
    reported = []
    row = compare_scene(pipe, sid, tmp_path / "scene", tmp_path / "runs", "s", [0.5], 1, tmp_path / "view",
                        methods=("finetune",), variants=variants, on_row=lambda r: reported.append(sorted(r)))
    assert [p["seconds"] for p in row["finetune_curve_plain"]][0] == 0.0 and len(row["finetune_curve_win"]) == 2
    assert row["gaussians_win"]["start"] > 0 and "merged_start_win" in row
    assert "budget-refine-stop" in row["finetune_error_bad"] and "finetune_curve_bad" not in row  # fails in its run
    assert len(reported) == 2 and "finetune_curve_win" not in reported[0] and "finetune_curve_win" in reported[1]
    assert len(list(tmp_path.glob("view_view*.png"))) == 1


def test_infer_output_is_never_a_mix_and_errors_name_their_cause(trained, data_root, tmp_path, capsys):
    from evolsplat_ns.cli.infer import InferArgs, main

    cfg, _ = trained
    config = cfg.get_base_dir() / "config.yml"
    # a folder of other files is refused before any work, and left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as ei:
        main(InferArgs(load_config=config, data=data_root / "scene_002", output=other))
    assert ei.value.code == 2 and "non-empty folder" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    # an earlier run's output (here: interrupted, with a stale file) is cleared: no old file survives a new run
    out = tmp_path / "o"
    main(InferArgs(load_config=config, data=data_root / "scene_002", output=out, export_ply=False))
    (out / "renders" / "stale_from_an_old_run.png").write_bytes(b"x")
    (out / "metrics.json").unlink()  # as if interrupted
    main(InferArgs(load_config=config, data=data_root / "scene_002", output=out, export_ply=False))
    assert (out / "metrics.json").exists() and not (out / "renders" / "stale_from_an_old_run.png").exists()
    # a bad --holdout is a usage error, not a "bad checkpoint"
    with pytest.raises(SystemExit):
        main(InferArgs(load_config=config, data=data_root / "scene_002", output=tmp_path / "h", holdout="even"))
    err = capsys.readouterr().err
    assert "--holdout 'even'" in err and "checkpoint" not in err
    # data with another camera count than the checkpoint's: said so, with both view counts
    from evolsplat_ns.data.synthetic import generate_scenes

    two = tmp_path / "two"
    generate_scenes(two, 1, 5, 24, 72, num_frames=30, num_cameras=2, quiet=True)
    with pytest.raises(SystemExit):
        main(InferArgs(load_config=config, data=two / "scene_000", output=tmp_path / "c"))
    err = capsys.readouterr().err
    assert "reads 9 source views" in err and "give 6" in err and "cameras" in err


def test_ns_export_gaussian_splat_writes_a_segment(trained, tmp_path):
    """nerfstudio's own `ns-export gaussian-splat` on an evolsplat-ff run: the chosen segment's Gaussians (as
    evolsplat-ns-infer exports them), not nerfstudio's bare assertion; a bad choice is one line."""
    import os
    import subprocess
    import sys

    from evolsplat_ns.export.ply import read_gaussian_ply

    cfg, trainer = trained
    env = {**os.environ, "EVOLSPLAT_EXPORT_SEGMENT": "2:0"}
    env.pop("EVOLSPLAT_NS_VERBOSE", None)
    cmd = [sys.executable, "-m", "nerfstudio.scripts.exporter", "gaussian-splat", "--load-config",
           str(cfg.get_base_dir() / "config.yml"), "--output-dir", str(tmp_path / "exp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    g = read_gaussian_ply(tmp_path / "exp" / "splat.ply")
    pipe = trainer.pipeline
    shared = pipe.reconstruct(pipe.datamanager.eval_batch(2, 0))
    assert g["means"].shape[0] == shared.num_gaussians and g["sh"].shape[1] == 4
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**env, "EVOLSPLAT_EXPORT_SEGMENT": "9:9"})
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "EVOLSPLAT_EXPORT_SEGMENT" in errors[0]
