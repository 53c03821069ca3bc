"""Shared test set-up: GPU-only tests skipped without CUDA; the small trainer config and the synthetic scene folders
that the pipeline, viewer, reliability and multi-GPU tests build (``from conftest import ...``)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels of the sparse convolution (model/sparse/igemm.py) run on CPU tensors only under Triton's
    # interpreter, which has to be chosen before triton is first imported (torch does not import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run on the GPU machine (see README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def small_trainer_config(data_root, out_dir=None, *, bg_num_points: int, max_points: int, device: str = "cpu",
                         no_periodic_eval: bool = False, **trainer):
    """The small preset (``evolsplat-ff-small``) on ``data_root`` for a test: no viewer, no local log writer, the
    given background and seed-cloud sizes, outputs under ``out_dir/<experiment>/evolsplat-ff-small/run``;
    ``no_periodic_eval``: the trainer's periodic evaluations never come; ``trainer``: further TrainerConfig fields."""
    from pathlib import Path

    from evolsplat_ns.configs import make_small_trainer_config

    cfg = make_small_trainer_config()
    cfg.machine.device_type = device
    cfg.pipeline.datamanager.data = data_root
    cfg.pipeline.model.bg_num_points = bg_num_points
    cfg.pipeline.model.pointcloud.max_points = max_points
    cfg.vis = "tensorboard"
    cfg.logging.local_writer.enable = False
    if out_dir is not None:
        cfg.output_dir = Path(out_dir)
        cfg.timestamp = "run"
    if no_periodic_eval:
        cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 1_000_000
    for k, v in trainer.items():
        setattr(cfg, k, v)
    return cfg


def synthetic_root(tmp_path_factory, name: str, num_scenes: int, seed: int, height: int, width: int,
                   num_cameras: int):
    """A folder of synthetic street scenes (30 frames each) under a fresh temporary folder, for a test module."""
    from evolsplat_ns.data.synthetic import generate_scenes

    root = tmp_path_factory.mktemp(name) / "synth"
    generate_scenes(root, num_scenes, seed, height, width, num_frames=30, num_cameras=num_cameras, quiet=True)
    return root
