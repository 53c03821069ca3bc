"""Feed-forward start, then per-scene optimisation (:mod:`evolsplat_ns.finetune`); the end-to-end run of
``evolsplat-ns-infer --finetune-seconds`` is in tests/test_pipeline.py (it needs a trained checkpoint)."""

import dataclasses
from typing import Optional

import numpy as np
import pytest
import torch

from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.export.ply import read_gaussian_ply, write_gaussian_ply
from evolsplat_ns.finetune.merge import merge_segments, nearest_owner
from evolsplat_ns.finetune.scene import NormalisedFrame


def _gaussians(means, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = means.shape[0]
    return {"means": means, "sh": torch.randn(n, k, 3, generator=g), "opacity_logit": torch.randn(n, generator=g),
            "log_scales": torch.randn(n, 3, generator=g) - 3, "quats": torch.randn(n, 4, generator=g)}


def test_overlapping_segments_keep_each_region_once_from_the_nearest_segment():
    # two segments along x that both reconstructed the overlap [4, 6]; their centres at x = 2.5 and x = 7.5
    a = _gaussians(torch.stack([torch.linspace(0, 6, 61), torch.zeros(61), torch.zeros(61)], 1), seed=1)
    b = _gaussians(torch.stack([torch.linspace(4, 10, 61), torch.zeros(61), torch.zeros(61)], 1), k=1, seed=2)
    merged = merge_segments([(a, torch.tensor([2.5, 0, 0])), (b, torch.tensor([7.5, 0, 0]))])
    x = merged["means"][:, 0]
    assert torch.equal(torch.sort(x).values, torch.sort(torch.unique(x)).values)  # no region twice
    assert x.min() == 0 and x.max() == 10 and len(x) == 101  # nothing lost: [0, 5] from a, (5, 10] from b
    from_a = merged["means"][:, 0] <= 5.0
    assert merged["sh"].shape[1] == 4 and bool((merged["sh"][~from_a, 1:] == 0).all())  # b's degree 0, padded
    torch.testing.assert_close(merged["sh"][from_a], a["sh"][a["means"][:, 0] <= 5.0])
    assert nearest_owner(torch.tensor([[5.0, 0, 0]]), torch.tensor([[2.5, 0, 0], [7.5, 0, 0]])).item() == 0  # tie


def test_normalised_frame_round_trip():
    rng = np.random.default_rng(0)
    cams = rng.normal(size=(20, 3)) * 30 + 500
    f = NormalisedFrame.of_cameras(cams)
    poses = np.tile(np.eye(4), (20, 1, 1))
    poses[:, :3, 3] = cams
    assert np.abs(f.poses(poses)[:, :3, 3]).max() == pytest.approx(1.0)
    g = _gaussians(torch.from_numpy(cams).float())
    back = f.gaussians(f.gaussians(g), inverse=True)
    torch.testing.assert_close(back["means"], g["means"].double())  # float64 on the way back
    torch.testing.assert_close(back["log_scales"], g["log_scales"])
    # a Gaussian's size relative to the scene is unchanged: scales follow the positions
    n = f.gaussians(g)
    torch.testing.assert_close(n["log_scales"] - g["log_scales"], torch.full_like(g["log_scales"], np.log(f.scale)))


def test_gaussian_ply_round_trip_and_bad_files(tmp_path):
    g = _gaussians(torch.randn(50, 3), k=9)
    p = write_gaussian_ply(tmp_path / "g.ply", g["means"], g["sh"], g["opacity_logit"], g["log_scales"], g["quats"])
    r = read_gaussian_ply(p)
    for k in ("means", "sh", "opacity_logit", "log_scales"):
        torch.testing.assert_close(r[k], g[k])
    torch.testing.assert_close(r["quats"], g["quats"] / g["quats"].norm(dim=-1, keepdim=True))
    (tmp_path / "short.ply").write_bytes(p.read_bytes()[:600])
    with pytest.raises(DataValidationError, match="short.ply"):
        read_gaussian_ply(tmp_path / "short.ply")
    from evolsplat_ns.pointcloud.plyio import write_ply

    write_ply(tmp_path / "points.ply", np.zeros((5, 3)), np.zeros((5, 3)))  # a point cloud, not Gaussians
    with pytest.raises(DataValidationError, match="f_dc_0"):
        read_gaussian_ply(tmp_path / "points.ply")


def test_finetune_options_are_set_by_name_and_a_typo_is_refused(tmp_path):
    """The A/B knobs of the fine-tuning run (bench_splatfacto --ft-option): a known field is set where the trainer
    reads it; an unknown one is an error, not a silent run with the default."""
    from evolsplat_ns.errors import ConfigError
    from evolsplat_ns.finetune.run import apply_overrides, finetune_config

    cfg = finetune_config(tmp_path, tmp_path / "init.ply", tmp_path / "runs", "s", "cpu")
    default = cfg.pipeline.model.reset_alpha_every
    apply_overrides(cfg, {"pipeline.model.reset_alpha_every": default + 7, "max_num_iterations": 5})
    assert cfg.pipeline.model.reset_alpha_every == default + 7 and cfg.max_num_iterations == 5
    apply_overrides(cfg, {"optimizers.means.optimizer.fused": False})  # dict keys on the way
    assert cfg.optimizers["means"]["optimizer"].fused is False and cfg.optimizers["scales"]["optimizer"].fused
    for bad in ("pipeline.model.reset_alpha_evry", "pipeline.nomodel.reset_alpha_every", "optimizers.mean.optimizer.fused",
                "optimizers.means"):
        with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
            apply_overrides(cfg, {bad: 1})


def test_finetune_options_take_the_type_of_their_field(tmp_path):
    """A sweep's values come as YAML (``--variant NAME FIELD=VALUE``), which reads ``1e-4`` as a string: a number
    field still gets a number, a count stays a whole number, and a value of the wrong kind is refused by name
    before the run instead of failing inside the optimizer (or running with a string)."""
    from evolsplat_ns.errors import ConfigError
    from evolsplat_ns.finetune.run import apply_overrides, finetune_config

    cfg = finetune_config(tmp_path, tmp_path / "init.ply", tmp_path / "runs", "s", "cpu")
    apply_overrides(cfg, {"optimizers.opacities.optimizer.lr": "1e-4", "pipeline.model.ssim_lambda": 0,
                          "pipeline.model.warmup_length": 200.0, "pipeline.model.use_scale_regularization": True})
    lr = cfg.optimizers["opacities"]["optimizer"].lr
    assert lr == pytest.approx(1e-4) and type(lr) is float
    assert type(cfg.pipeline.model.ssim_lambda) is float and cfg.pipeline.model.ssim_lambda == 0.0
    assert type(cfg.pipeline.model.warmup_length) is int and cfg.pipeline.model.warmup_length == 200
    assert cfg.pipeline.model.use_scale_regularization is True
    @dataclasses.dataclass
    class Knobs:
        rate: float = 1  # a float field whose default is written as a whole number
        cap: Optional[float] = None  # a float field without a default value

    knobs = Knobs()
    apply_overrides(knobs, {"rate": 2.5, "cap": "1e-3"})
    assert knobs.rate == 2.5 and knobs.cap == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="'cap' expects a number"):
        apply_overrides(knobs, {"cap": "none"})
    for key, value, expected in (("optimizers.opacities.optimizer.lr", "fast", "a number"),
                                 ("pipeline.model.warmup_length", 2.5, "a whole number"),
                                 ("pipeline.model.warmup_length", True, "a number"),
                                 ("pipeline.model.use_scale_regularization", "yes", "true or false")):
        with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')}.*{expected}"):
            apply_overrides(cfg, {key: value})


def test_baking_several_viewpoints_averages_what_a_static_set_can_hold():
    """bake="sources": the mean over viewpoints of each decoded parameter — one viewpoint gives itself back, opacity
    is averaged as a probability (not as a logit), and a quaternion and its negation (the same rotation) average to
    that rotation, not to zero."""
    from evolsplat_ns.finetune.merge import bake_views

    g = _gaussians(torch.randn(50, 3))
    g["quats"] = g["quats"] / g["quats"].norm(dim=-1, keepdim=True)
    one = bake_views([g])
    for k in ("means", "sh", "log_scales", "quats"):
        torch.testing.assert_close(one[k], g[k])
    torch.testing.assert_close(one["opacity_logit"], g["opacity_logit"], atol=1e-4, rtol=1e-4)
    flipped = {**g, "quats": -g["quats"], "opacity_logit": torch.full_like(g["opacity_logit"], -20.0)}
    two = bake_views([{**g, "opacity_logit": torch.full_like(g["opacity_logit"], 20.0)}, flipped])
    torch.testing.assert_close(two["quats"], g["quats"])
    torch.testing.assert_close(torch.sigmoid(two["opacity_logit"]), torch.full((50,), 0.5))  # 1 and 0 -> 0.5


def test_a_budget_schedule_ends_decayed_whatever_the_step_count():
    """schedule="budget" (evolsplat-ns-infer --finetune-seconds): the configured decay is followed against the
    fraction of the budget spent, so a run of 2,000 steps ends at the rate a 30,000-step schedule ends at; groups
    without a schedule keep theirs, and the model is told when to stop densifying."""
    from types import SimpleNamespace

    from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers

    from evolsplat_ns.configs import make_finetune_config
    from evolsplat_ns.errors import ConfigError
    from evolsplat_ns.finetune.run import follow_budget, train_on_the_clock

    spec = make_finetune_config().optimizers
    config = {k: spec[k] for k in ("means", "opacities")}
    params = {k: [torch.nn.Parameter(torch.zeros(3))] for k in config}
    optimizers = Optimizers(config, params)
    calls = []
    model = SimpleNamespace(follow_budget=lambda f, s: calls.append((f, s)))
    trainer = SimpleNamespace(config=SimpleNamespace(optimizers=config), optimizers=optimizers,
                              pipeline=SimpleNamespace(model=model))

    def lr(name):
        return optimizers.optimizers[name].param_groups[0]["lr"]

    lr0, lr1 = config["means"]["optimizer"].lr, config["means"]["scheduler"].lr_final
    for fraction, want in ((0.0, lr0), (0.5, (lr0 * lr1) ** 0.5), (1.0, lr1), (3.0, lr1)):
        follow_budget(trainer, fraction, step=7)
        assert lr("means") == pytest.approx(want, rel=1e-6)
        assert lr("opacities") == config["opacities"]["optimizer"].lr
    assert calls[-1] == (1.0, 7)  # clamped to the budget
    assert isinstance(config["opacities"]["optimizer"], AdamOptimizerConfig)
    with pytest.raises(ConfigError, match="schedule"):
        train_on_the_clock(trainer, [1.0], schedule="cosine")


def test_densification_stops_at_its_fraction_of_the_budget():
    from types import SimpleNamespace

    from evolsplat_ns.finetune.model import EvolSplatFinetuneModel, EvolSplatFinetuneModelConfig

    model = SimpleNamespace(config=EvolSplatFinetuneModelConfig(budget_refine_stop=0.5),
                            strategy=SimpleNamespace(refine_stop_iter=15000))
    EvolSplatFinetuneModel.follow_budget(model, 0.49, 800)
    assert model.strategy.refine_stop_iter == 15000
    EvolSplatFinetuneModel.follow_budget(model, 0.5, 812)
    EvolSplatFinetuneModel.follow_budget(model, 0.9, 1400)  # stays stopped where it stopped
    assert model.strategy.refine_stop_iter == 812


def test_training_psnr_is_torchmetrics_psnr():
    """The fine-tuning model's per-step ``psnr`` (computed directly, without torchmetrics' state bookkeeping) is
    the value splatfacto's torchmetrics metric gives, uint8 ground truth included."""
    from types import SimpleNamespace

    from nerfstudio.models.splatfacto import SplatfactoModel
    from torchmetrics.image import PeakSignalNoiseRatio

    from evolsplat_ns.finetune.model import EvolSplatFinetuneModel, EvolSplatFinetuneModelConfig

    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(12, 20, 3, generator=g) * 255).to(torch.uint8)
    pred = torch.rand(12, 20, 3, generator=g)
    model = SimpleNamespace(training=True, config=EvolSplatFinetuneModelConfig(), num_points=17, device="cpu",
                            _kept_target=None,
                            _get_downscale_factor=lambda: 1, _downscale_if_required=lambda im: im,
                            camera_optimizer=SimpleNamespace(get_metrics_dict=lambda d: None))
    model.get_gt_img = lambda im: SplatfactoModel.get_gt_img(model, im)
    model.composite_with_background = lambda im, bg: SplatfactoModel.composite_with_background(model, im, bg)
    model._target_image = lambda o, b: EvolSplatFinetuneModel._target_image(model, o, b)
    m = EvolSplatFinetuneModel.get_metrics_dict(model, {"rgb": pred, "background": torch.zeros(3)}, {"image": gt})
    want = PeakSignalNoiseRatio(data_range=1.0)(pred, gt.float() / 255.0)
    assert float(m["psnr"]) == pytest.approx(float(want), rel=1e-5) and m["gaussian_count"] == 17


def test_a_refine_stop_outside_the_budget_is_refused_before_reading_anything(tmp_path):
    from nerfstudio.data.scene_box import SceneBox

    from evolsplat_ns.errors import ConfigError
    from evolsplat_ns.finetune.model import EvolSplatFinetuneModelConfig

    cfg = EvolSplatFinetuneModelConfig(init_ply=tmp_path / "missing.ply", budget_refine_stop=1.5)
    with pytest.raises(ConfigError, match="budget-refine-stop"):
        cfg.setup(scene_box=SceneBox(torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=1, metadata={})


def test_window_consensus_drops_what_only_one_time_saw():
    """bake="windows": a point opaque in one window out of three (a passing car's LiDAR trail) gets the median, a low
    opacity; a point every window sees keeps its value; a point no window kept is dropped; the rest is averaged,
    quaternions sign-aligned."""
    from evolsplat_ns.finetune.merge import consensus

    n = 5
    base = _gaussians(torch.randn(n, 3), k=4, seed=3)
    base["quats"] = base["quats"] / base["quats"].norm(dim=-1, keepdim=True)

    def window(rows, opacity, flip=False):
        g = {k: v[rows].clone() for k, v in base.items()}
        g["opacity_logit"] = torch.logit(torch.tensor(opacity))
        if flip:
            g["quats"] = -g["quats"]
        return torch.tensor(rows), g

    parts = [window([0, 1, 3], [0.9, 0.95, 0.6]), window([0, 1, 3], [0.05, 0.95, 0.6], flip=True),
             window([0, 1], [0.1, 0.95])]  # point 2 never kept, 4 never either; 3 seen by two windows
    keep, g = consensus(parts, n)
    assert keep.tolist() == [0, 1, 3]
    torch.testing.assert_close(torch.sigmoid(g["opacity_logit"]), torch.tensor([0.1, 0.95, 0.6]), atol=1e-5,
                               rtol=1e-5)
    for k in ("means", "sh", "log_scales"):
        torch.testing.assert_close(g[k], base[k][[0, 1, 3]])
    torch.testing.assert_close(g["quats"], base["quats"][[0, 1, 3]])  # q and -q average to q, not to zero


def test_the_clock_loop_spends_each_budget_and_shows_progress(capsys):
    """train_on_the_clock: steps until each budget is spent (the recorded seconds at least the budget), scores after
    each, stops at max_steps, returns the model to training mode before each budget, and shows a progress line."""
    import time
    from types import SimpleNamespace

    from evolsplat_ns.finetune.run import train_on_the_clock

    modes, calls = [], []
    pipeline = SimpleNamespace(model=SimpleNamespace(num_points=1234), train=lambda: modes.append("train"))
    trainer = SimpleNamespace(pipeline=pipeline, callbacks=[], train_iteration=lambda step: time.sleep(0.005))
    steps = train_on_the_clock(trainer, [0.1, 0.05], lambda b, n, s: calls.append((b, n, s)), description="clock")
    assert [b for b, _, _ in calls] == [0.05, 0.1] and modes == ["train", "train"]
    assert all(s >= b for b, _, s in calls) and calls[-1][1] == steps and 0 < calls[0][1] < steps
    assert steps <= 0.1 / 0.005 + 1  # no step counted that did not run
    out = capsys.readouterr().out
    assert "clock" in out and f"{steps} steps" in out and "1,234 Gaussians" in out
    assert train_on_the_clock(trainer, [60.0], max_steps=3, show_progress=False) == 3


def _finetune_model(tmp_path, **options):
    from nerfstudio.data.scene_box import SceneBox

    from evolsplat_ns.finetune.model import EvolSplatFinetuneModelConfig

    g = _gaussians(torch.randn(50, 3))
    ply = write_gaussian_ply(tmp_path / "g.ply", g["means"], g["sh"], g["opacity_logit"], g["log_scales"], g["quats"])
    cfg = EvolSplatFinetuneModelConfig(init_ply=ply, **options)
    return cfg.setup(scene_box=SceneBox(torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=4, metadata={})


def test_the_start_can_drop_its_faint_gaussians(tmp_path):
    """``start_cull_alpha``: the starting Gaussians below that opacity are gone before the first step, the others
    are kept as written; 0 keeps all; a value that would drop everything, or is not an opacity, is refused."""
    from evolsplat_ns.errors import ConfigError

    torch.manual_seed(7)
    g = _gaussians(torch.randn(50, 3))  # what _finetune_model writes
    alpha = torch.sigmoid(g["opacity_logit"])
    assert 0 < int((alpha >= 0.5).sum()) < 50
    torch.manual_seed(7)
    kept = _finetune_model(tmp_path, start_cull_alpha=0.5)
    assert kept.num_points == int((alpha >= 0.5).sum())
    assert torch.allclose(kept.gauss_params["means"], g["means"][alpha >= 0.5])
    assert torch.allclose(kept.gauss_params["opacities"][:, 0], g["opacity_logit"][alpha >= 0.5])
    assert _finetune_model(tmp_path).num_points == 50
    for bad, match in ((0.9999, "drops every Gaussian"), (1.0, r"in \[0, 1\)"), (-0.1, r"in \[0, 1\)")):
        with pytest.raises(ConfigError, match=match):
            _finetune_model(tmp_path, start_cull_alpha=bad)


def test_sync_free_steps_compute_splatfacto_losses_and_statistics(tmp_path):
    """``sync_free`` (the default) changes how a step reaches its values, not the values: splatfacto's losses, gsplat's
    densification statistics (same strategy settings), and the image size of a training camera, read once."""
    from gsplat.strategy import DefaultStrategy
    from nerfstudio.cameras.cameras import Cameras

    from evolsplat_ns.finetune.model import DenseStatsStrategy

    model = _finetune_model(tmp_path).train()
    reference = _finetune_model(tmp_path, sync_free=False).train()
    assert isinstance(model.strategy, DenseStatsStrategy) and type(reference.strategy) is DefaultStrategy
    assert {f: getattr(model.strategy, f) for f in vars(reference.strategy)} == vars(reference.strategy)

    g = torch.Generator().manual_seed(1)
    outputs = {"rgb": torch.rand(16, 24, 3, generator=g), "background": torch.zeros(3)}
    batch = {"image": (torch.rand(16, 24, 3, generator=g) * 255).to(torch.uint8)}
    converted = []
    model.get_gt_img = lambda im: converted.append(im) or type(model).get_gt_img(model, im)
    metrics = model.get_metrics_dict(outputs, batch)  # nerfstudio's order in a step: metrics, then losses
    ours, theirs = model.get_loss_dict(outputs, batch, metrics), reference.get_loss_dict(outputs, batch)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    assert len(converted) == 1  # the ground truth is converted once for both
    outputs = {**outputs, "background": torch.ones(3)}  # the next step: a new background (random in training)
    ours, theirs = model.get_loss_dict(outputs, batch), reference.get_loss_dict(outputs, batch)
    assert len(converted) == 2 and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    n = 50
    for absgrad in (False, True):
        states = []
        for strategy in (model.strategy, reference.strategy):
            strategy.absgrad = absgrad
            state = strategy.initialize_state(scene_scale=1.0)
            for step in range(3):
                gg = torch.Generator().manual_seed(step)
                means2d = torch.zeros(1, n, 2, requires_grad=True)
                means2d.grad = torch.randn(1, n, 2, generator=gg)
                means2d.absgrad = means2d.grad.abs()
                radii = torch.randint(0, 4, (1, n), generator=gg, dtype=torch.int32)
                info = {"width": 24, "height": 16, "n_cameras": 1, "radii": radii, "gaussian_ids": None,
                        "means2d": means2d}
                strategy._update_state(model.gauss_params, state, info)
            states.append(state)
        for k in ("grad2d", "count", "radii"):
            assert torch.equal(states[0][k], states[1][k]), (k, absgrad)

    cam = Cameras(camera_to_worlds=torch.eye(4)[None, :3], fx=20.0, fy=20.0, cx=12.0, cy=8.0, width=24, height=16,
                  metadata={"cam_idx": 2})
    assert model.image_size(cam) == (16, 24)
    cam.height[:] = 99  # training cameras keep their size: the first reading is kept
    assert model.image_size(cam) == (16, 24)
    cam.metadata = None  # a camera that is not a training camera (the viewer's) is read every time
    assert model.image_size(cam) == (99, 24)


def test_fine_tuning_uses_fused_adam_with_splatfacto_settings():
    """evolsplat-ft's optimisers are splatfacto's Adam (same rates, eps) in torch's fused implementation: the same
    updates as the default implementation, to float rounding."""
    from evolsplat_ns.configs import make_finetune_config

    spec = make_finetune_config().optimizers["means"]["optimizer"]
    torch.manual_seed(0)
    p0 = torch.randn(1000, 3)
    params = {}
    for fused in (True, False):
        spec.fused = fused
        p = torch.nn.Parameter(p0.clone())
        opt = spec.setup([p])
        assert opt.defaults["fused"] is fused and opt.defaults["eps"] == 1e-15 and opt.defaults["lr"] == 1.6e-4
        for step in range(5):
            p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
        params[fused] = p.detach()
    torch.testing.assert_close(params[True], params[False], rtol=1e-6, atol=1e-7)
    assert not torch.equal(params[True], p0)


def _tiny_exported_scene(root, n_images=6, H=24, W=32):
    """A scene as export_scene writes it: images, transforms.json (4 training, 2 test views), init_gaussians.ply."""
    import json

    from PIL import Image

    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n_images):
        Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(data / f"images/{i}.png")
        c2w = np.eye(4)
        c2w[0, 3], c2w[2, 3] = 0.1 * i, 2.0
        frames.append({"file_path": f"images/{i}.png", "transform_matrix": c2w.tolist(), "fl_x": 30.0, "fl_y": 30.0,
                       "cx": W / 2, "cy": H / 2, "w": W, "h": H})
    names = [f["file_path"] for f in frames]
    (data / "transforms.json").write_text(json.dumps({"camera_model": "OPENCV", "frames": frames,
                                                      "train_filenames": names[:4], "val_filenames": names[4:],
                                                      "test_filenames": names[4:]}))
    g = _gaussians(torch.randn(300, 3) * 0.5)
    write_gaussian_ply(data / "init_gaussians.ply", g["means"], g["sh"], g["opacity_logit"], g["log_scales"] - 1,
                       g["quats"])
    return data


@pytest.mark.gpu
def test_a_fine_tuning_step_does_not_wait_for_the_device(tmp_path):
    """On CUDA, evolsplat-ft's training steps (render, splatfacto's losses, fused Adam, densification statistics)
    make no call that waits for the device (torch's sync debug mode), so the host queues the next step while the
    device runs this one. Steps that grow or prune Gaussians (every 100th) may wait; these are not among them."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    from evolsplat_ns.engine.device_waits import device_waits
    from evolsplat_ns.finetune.run import finetune_config, train_on_the_clock

    data = _tiny_exported_scene(tmp_path)
    cfg = finetune_config(data, data / "init_gaussians.ply", tmp_path / "runs", "s", "cuda")
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    train_on_the_clock(trainer, [1e9], max_steps=5, show_progress=False)  # every training camera seen once
    torch.cuda.synchronize()

    def steps():
        for step in range(5, 10):
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
            trainer.train_iteration(step)
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)

    waits = device_waits(steps)
    assert not waits, waits.most_common(3)
    assert trainer.pipeline.model.strategy_state["count"].sum() > 0  # the statistics were accumulated


def test_device_waits_counts_only_synchronising_calls(monkeypatch):
    """The helper behind the GPU test above and ``profile_finetune_step.py`` counts the warnings of torch's sync debug
    mode, by where they come from, and nothing else: not the warning that switching the mode on gives (on the H200
    it was counted as a wait), nor other warnings. Runs anywhere: the mode switch is replaced by one that warns as
    torch's does."""
    import warnings

    import evolsplat_ns.engine.device_waits as dw

    def switch(mode):
        if mode == "warn":
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", switch)

    def work():
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        waits = dw.device_waits(work, parts=("tests",))
    assert sum(waits.values()) == 2 and len(waits) == 2  # two call sites, once each
    assert all("work" in key for key in waits)
    shown = [str(w.message) for w in shown]  # other warnings are shown as usual, the counted ones are not
    assert "an unrelated warning" in shown and not any("called a synchronizing" in m for m in shown)
