"""nerfstudio registrations: the ``evolsplat-ff`` and ``evolsplat-ft`` methods and the ``evolsplat-multiscene``
dataparser.

This module is the plugin's entry point: nerfstudio imports it on every ``ns-*`` command, so it must never fail
and must stay light (no open3d at import, no import of ``nerfstudio.configs.method_configs``, which imports us;
gsplat comes with nerfstudio's splatfacto, which ``evolsplat-ft`` extends and every ``ns-*`` command imports).
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


def make_finetune_config() -> TrainerConfig:
    """``evolsplat-ft``: splatfacto started from given Gaussians (:mod:`evolsplat_ns.finetune.model`), on a scene
    written by :func:`evolsplat_ns.finetune.scene.export_scene` (poses already normalised: the dataparser applies no
    transform of its own). splatfacto's optimiser settings (learning rates per parameter group), with the
    checkpoint-safe schedule (:mod:`evolsplat_ns.engine.schedulers`: splatfacto's own checkpoints hold numpy scalars
    that torch's default ``weights_only`` load rejects)."""
    decay = FloatExponentialDecaySchedulerConfig
    from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

    from evolsplat_ns.engine.optimizers import FusedAdamOptimizerConfig
    from evolsplat_ns.finetune.model import EvolSplatFinetuneModelConfig

    def adam(lr, scheduler=None):  # splatfacto's Adam settings; the fused kernel (evolsplat_ns.engine.optimizers)
        return {"optimizer": FusedAdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}

    return TrainerConfig(
        method_name="evolsplat-ft",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=30000,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(
                dataparser=NerfstudioDataParserConfig(load_3D_points=False, orientation_method="none",
                                                      center_method="none", auto_scale_poses=False,
                                                      downscale_factor=1),
                cache_images_type="uint8",
            ),
            model=EvolSplatFinetuneModelConfig(),
        ),
        optimizers={
            "means": adam(1.6e-4, decay(lr_final=1.6e-6, max_steps=30000)),
            "features_dc": adam(0.0025),
            "features_rest": adam(0.0025 / 20),
            "opacities": adam(0.05),
            "scales": adam(0.005),
            "quats": adam(0.001),
            "camera_opt": adam(1e-4, decay(lr_final=5e-7, max_steps=30000,
                                                                     warmup_steps=1000, lr_pre_warmup=0)),
            "bilateral_grid": adam(2e-3, decay(lr_final=1e-4, max_steps=30000,
                                                                         warmup_steps=1000, lr_pre_warmup=0)),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


evolsplat_ft = MethodSpecification(
    config=make_finetune_config(),
    description="splatfacto started from the feed-forward Gaussians of a scene (evolsplat-ns-infer --finetune-seconds)",
)
