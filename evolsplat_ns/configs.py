"""nerfstudio registrations: the ``evolsplat-ff`` method and the ``evolsplat-multiscene`` dataparser.

This module is the plugin's entry point: nerfstudio imports it on every ``ns-*`` command, so it must never fail
and must stay light (no open3d / gsplat at import, no import of ``nerfstudio.configs.method_configs``, which
imports us).
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from evolsplat_ns.engine.schedulers import FloatExponentialDecaySchedulerConfig
from evolsplat_ns.engine.trainer import EvolSplatTrainerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from evolsplat_ns.data.datamanager import EvolSplatDataManagerConfig
from evolsplat_ns.data.ns_dataparser import EvolSplatDataParserConfig
from evolsplat_ns.model.evolsplat import EvolSplatModelConfig
from evolsplat_ns.pipeline.pipeline import EvolSplatPipelineConfig


def make_trainer_config() -> TrainerConfig:
    """The ``evolsplat-ff`` defaults (reference constants, SPEC). The trainer is nerfstudio's, with atomic
    checkpoints, checkpoint checks before any long work and one-line errors (:mod:`evolsplat_ns.engine.trainer`)."""
    return EvolSplatTrainerConfig(
        method_name="evolsplat-ff",
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_save=2000,
        max_num_iterations=50000,
        mixed_precision=False,
        pipeline=EvolSplatPipelineConfig(
            datamanager=EvolSplatDataManagerConfig(dataparser=EvolSplatDataParserConfig()),
            model=EvolSplatModelConfig(),
        ),
        optimizers={
            "networks": {
                "optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
                "scheduler": FloatExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=30000),
            },
            "sparse_conv": {
                "optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
                "scheduler": FloatExponentialDecaySchedulerConfig(lr_final=5e-7, warmup_steps=500, max_steps=30000),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, quit_on_train_completion=True),
        vis="viewer",
    )


def make_small_trainer_config() -> TrainerConfig:
    """A small preset for CPU runs and smoke tests: fewer and smaller views, few Gaussians, the PyTorch
    rasterizer; the architecture is unchanged."""
    cfg = make_trainer_config()
    cfg.method_name = "evolsplat-ff-small"
    import torch

    cfg.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.max_num_iterations = 300
    cfg.steps_per_eval_batch = 100
    cfg.steps_per_eval_image = 100
    cfg.steps_per_eval_all_images = 1_000_000
    cfg.steps_per_save = 100
    dm = cfg.pipeline.datamanager
    dm.num_target_keyframes = 2
    dm.keyframes_per_segment = 8
    dm.batches_per_segment = 10
    m = cfg.pipeline.model
    m.bg_num_points = 4000
    m.pointcloud.max_points = 4000
    for group in cfg.optimizers.values():
        group["scheduler"].max_steps = 300
    cfg.optimizers["sparse_conv"]["scheduler"].warmup_steps = 20
    return cfg


evolsplat_ff = MethodSpecification(
    config=make_trainer_config(),
    description="EVolSplat feed-forward 3D Gaussian Splatting of driving scenes (many scenes, segment batches)",
)

evolsplat_ff_small = MethodSpecification(
    config=make_small_trainer_config(),
    description="evolsplat-ff, small preset for CPU runs (fewer/smaller views, 4k Gaussians, PyTorch rasterizer)",
)
