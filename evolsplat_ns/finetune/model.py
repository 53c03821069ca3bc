"""``evolsplat-ft``: nerfstudio's splatfacto, started from given Gaussians instead of a sparse point cloud.

The model is splatfacto's (its losses, optimisers, densification strategy, viewer and export support), with these
differences:

* **Initialisation** from a standard 3DGS PLY (``init_ply``): means, scales, rotations, opacities and SH
  coefficients as written (degree up to splatfacto's ``sh_degree``; higher bands start at zero). The feed-forward
  reconstruction of a scene (:mod:`evolsplat_ns.finetune.merge`) is such a file.
* **Rendering** through :func:`evolsplat_ns.model.render.render_gaussians`: gsplat on CUDA, exactly as splatfacto
  calls it (its ``info`` feeds the densification strategy), and the project's pure-PyTorch rasterizer on the CPU,
  where gsplat has no kernels (densification is then skipped: the reference rasterizer keeps no screen-space
  gradients; the CPU path is for tests and tiny scenes).
* **Steps that do not wait for the device** (``sync_free``, same values) and torch's fused Adam
  (:mod:`evolsplat_ns.engine.optimizers`): short fine-tuning runs on a wall-clock budget make more steps.

splatfacto builds torchmetrics' LPIPS when it is set up; that downloads AlexNet weights, which fails offline. When the
weights are not in torch's hub cache, a stand-in is used and the ``lpips`` metric reads NaN (said once, as a warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from gsplat.strategy import DefaultStrategy
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig

logger = logging.getLogger(__name__)


@dataclass
class EvolSplatFinetuneModelConfig(SplatfactoModelConfig):
    """splatfacto, initialised from a 3DGS PLY; defaults for refining a good start rather than growing from points."""

    _target: Type = field(default_factory=lambda: EvolSplatFinetuneModel)
    init_ply: Optional[Path] = None
    """A standard 3DGS PLY whose Gaussians are the starting point (required)."""
    num_downscales: int = 0
    """Full resolution from the first step (splatfacto starts at 1/4: right for growing from points, not here)."""
    sh_degree_interval: int = 0
    """Every SH band is rendered from the first step, so the start renders exactly the initial Gaussians
    (splatfacto adds one band every 1000 steps; a positive value does that here too)."""
    rasterizer: str = "auto"
    """'auto' (gsplat on CUDA, the PyTorch reference rasterizer on the CPU), 'gsplat' or 'torch'."""
    raster_tile_size: int = 16
    """Pixel tile size of the rasterizer (gsplat's default 16; see the feed-forward model's option of that name)."""
    sync_free: bool = True
    """No host synchronisation in a training step of this model: each training camera's image size is read once
    and kept on the host; splatfacto's loss is computed without copies from the host (its zero ``scale_reg`` is a
    host tensor copied over, and pytorch_msssim copies its window in every call: each copy waits for the device);
    the densification statistics are accumulated with masks (:class:`DenseStatsStrategy`; gsplat's selects the
    visible Gaussians with ``torch.where``, which waits too). The values are the same; the host can queue the next
    step while the device runs this one (``benchmarks/profile_finetune_step.py`` lists what a step waits for)."""
    start_cull_alpha: float = 0.0
    """Drop the starting Gaussians whose opacity is below this before the first step (0: keep them all). splatfacto
    culls below ``cull_alpha_thresh`` at its first refinement (step ``warmup_length``) anyway; the feed-forward
    start of a real street holds many faint Gaussians, and until that step every one of them is rasterized (on
    PandaSet 002: ~15 ms a step before the first cull, ~6 ms after it). A knob for the fine-tuning sweep."""
    budget_refine_stop: float = 0.5
    """On a wall-clock budget (``evolsplat-ns-infer --finetune-seconds`` with its default schedule 'budget'):
    densification (growing, pruning, opacity resets) stops after this fraction of the budget, as splatfacto stops
    it at step 15,000 of 30,000; the rest of the budget refines a fixed set while the learning rates decay."""


class _NaNMetric(torch.nn.Module):
    """Stands in for LPIPS when its weights cannot be loaded: returns NaN."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))


@contextlib.contextmanager
def _lpips_without_download():
    """splatfacto's LPIPS, unless its AlexNet weights would have to be downloaded (then a NaN stand-in)."""
    import torchmetrics.image.lpip as lpip_module

    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if os.path.isdir(hub) and any(f.startswith("alexnet") for f in os.listdir(hub)):
        yield
        return
    logger.warning("LPIPS reads NaN: torchvision's AlexNet weights are not in %s (no download here)", hub)
    real = lpip_module.LearnedPerceptualImagePatchSimilarity
    lpip_module.LearnedPerceptualImagePatchSimilarity = _NaNMetric
    try:
        yield
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = real


@dataclass
class DenseStatsStrategy(DefaultStrategy):
    """gsplat's default densification strategy, with its running statistics (screen-space gradient norm, visibility
    count, largest screen radius) accumulated over all Gaussians with masks instead of over the visible ones'
    indices. The sums are the same (one camera per step: each Gaussian gets at most one term); the indices would
    need ``torch.where``, a host synchronisation on every step."""

    def _update_state(self, params, state: Dict, info: Dict, packed: bool = False) -> None:
        if packed:
            return super()._update_state(params, state, info, packed=True)
        grads = info[self.key_for_gradient].absgrad if self.absgrad else info[self.key_for_gradient].grad
        sx, sy = info["width"] / 2.0 * info["n_cameras"], info["height"] / 2.0 * info["n_cameras"]
        n = len(list(params.values())[0])
        for name in ("grad2d", "count") + (("radii",) if self.refine_scale2d_stop_iter > 0 else ()):
            if state[name] is None:
                state[name] = torch.zeros(n, device=grads.device)
        seen = info["radii"] > 0.0  # [C, N]
        norm = torch.stack([grads[..., 0] * sx, grads[..., 1] * sy], dim=-1).norm(dim=-1)  # [C, N]
        state["grad2d"] += torch.where(seen, norm, 0.0).sum(0)
        state["count"] += seen.sum(0, dtype=torch.float32)
        if self.refine_scale2d_stop_iter > 0:
            radii = torch.where(seen, info["radii"] / float(max(info["width"], info["height"])), 0.0).amax(0)
            torch.maximum(state["radii"], radii, out=state["radii"])


class EvolSplatFinetuneModel(SplatfactoModel):
    config: EvolSplatFinetuneModelConfig

    def __init__(self, *args, **kwargs) -> None:
        kwargs["seed_points"] = None  # splatfacto's point initialisation is replaced (populate_modules)
        super().__init__(*args, **kwargs)

    def populate_modules(self) -> None:
        from evolsplat_ns.errors import ConfigError
        from evolsplat_ns.export.ply import read_gaussian_ply

        if self.config.init_ply is None:
            raise ConfigError("evolsplat-ft needs --pipeline.model.init-ply (a 3DGS PLY of the starting Gaussians)")
        if not 0.0 <= self.config.budget_refine_stop <= 1.0:
            raise ConfigError(f"--pipeline.model.budget-refine-stop is a fraction of the budget in [0, 1], got "
                              f"{self.config.budget_refine_stop}")
        if not 0.0 <= self.config.start_cull_alpha < 1.0:
            raise ConfigError(f"--pipeline.model.start-cull-alpha is an opacity in [0, 1), got "
                              f"{self.config.start_cull_alpha}")
        g = read_gaussian_ply(self.config.init_ply)  # before splatfacto's set-up: a bad file costs nothing
        if self.config.start_cull_alpha > 0:
            keep = torch.sigmoid(g["opacity_logit"].reshape(-1)) >= self.config.start_cull_alpha
            if not bool(keep.any()):
                raise ConfigError(f"--pipeline.model.start-cull-alpha {self.config.start_cull_alpha} drops every "
                                  f"Gaussian of {self.config.init_ply} (largest opacity "
                                  f"{float(torch.sigmoid(g['opacity_logit']).max()):.3f})")
            g = {k: v[keep] for k, v in g.items()}
        num_random = self.config.num_random
        self.config.num_random = 8  # splatfacto's random start is built, then replaced: keep it tiny
        try:
            with _lpips_without_download():
                super().populate_modules()
        finally:
            self.config.num_random = num_random
        k = (self.config.sh_degree + 1) ** 2
        n = g["means"].shape[0]
        sh = torch.zeros(n, k, 3)
        kk = min(k, g["sh"].shape[1])
        sh[:, :kk] = g["sh"][:, :kk]
        params = {"means": g["means"], "scales": g["log_scales"], "quats": g["quats"], "features_dc": sh[:, 0],
                  "features_rest": sh[:, 1:], "opacities": g["opacity_logit"][:, None]}
        self.gauss_params = torch.nn.ParameterDict({k_: torch.nn.Parameter(v.float()) for k_, v in params.items()})
        self.info = None
        if self.config.sync_free:
            s = self.strategy
            self.strategy = DenseStatsStrategy(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})
        self._train_sizes: Dict[int, Tuple[int, int]] = {}
        """(height, width) of each training camera (``cam_idx``) seen so far (``sync_free``)."""
        self._kept_target: Optional[Tuple[tuple, torch.Tensor]] = None
        """The last ground truth :meth:`_target_image` converted, with what it was converted from."""

    def follow_budget(self, fraction: float, step: int) -> None:
        """Where a wall-clock budget stands (:func:`evolsplat_ns.finetune.run.follow_budget`): from
        ``budget_refine_stop`` of it on, densification is over (gsplat's strategy refines only before
        ``refine_stop_iter``)."""
        if fraction >= self.config.budget_refine_stop:
            self.strategy.refine_stop_iter = min(self.strategy.refine_stop_iter, step)

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        """splatfacto's metrics; in training, ``psnr`` is computed directly (the same value as torchmetrics' PSNR
        with data range 1) instead of through a torchmetrics object, whose state bookkeeping costs about a
        millisecond of host time on every step of a short fine-tuning run."""
        if not self.training or self.config.color_corrected_metrics:
            return super().get_metrics_dict(outputs, batch)
        gt = self._target_image(outputs, batch)
        metrics = {"psnr": -10.0 * torch.log10(torch.mean((outputs["rgb"] - gt) ** 2)),
                   "gaussian_count": self.num_points}
        self.camera_optimizer.get_metrics_dict(metrics)
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        """splatfacto's losses. With ``sync_free``, where splatfacto would only add a zero ``scale_reg`` (no mask, no
        bilateral grid, no scale regularisation this step), the same losses are computed here with that zero made on
        the device: splatfacto makes it on the host and copies it, which waits for the device."""
        plain = ("mask" not in batch and not self.config.use_bilateral_grid
                 and not (self.config.use_scale_regularization and self.step % 10 == 0))
        if not (self.config.sync_free and plain):
            return super().get_loss_dict(outputs, batch, metrics_dict)
        gt = self._target_image(outputs, batch)
        pred = outputs["rgb"]
        if self.ssim.win.device != pred.device:  # pytorch_msssim keeps its window on the host and copies it over
            self.ssim.win = self.ssim.win.to(pred.device)  # in every call (a wait for the device): move it once
        l1 = torch.abs(gt - pred).mean()
        ssim = 1 - self.ssim(gt.permute(2, 0, 1)[None, ...], pred.permute(2, 0, 1)[None, ...])
        loss = {"main_loss": (1 - self.config.ssim_lambda) * l1 + self.config.ssim_lambda * ssim,
                "scale_reg": torch.zeros((), device=pred.device)}
        if self.training:
            self.camera_optimizer.get_loss_dict(loss)
        return loss

    def _target_image(self, outputs, batch) -> torch.Tensor:
        """The step's ground truth as splatfacto compares it (float, downscaled as scheduled, composited with the
        step's background). nerfstudio's pipeline asks for the metrics, then the losses, of the same outputs and
        batch: the image is converted once for both (the last conversion is kept for exactly those objects)."""
        key = (batch["image"], outputs["background"], self._get_downscale_factor())
        kept = self._kept_target
        if kept is not None and kept[0][0] is key[0] and kept[0][1] is key[1] and kept[0][2] == key[2]:
            return kept[1]
        gt = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        self._kept_target = (key, gt)
        return gt

    def image_size(self, camera: Cameras) -> Tuple[int, int]:
        """(height, width) of ``camera``; a training camera's is read from the device once (``sync_free``)."""
        idx = (camera.metadata or {}).get("cam_idx") if self.training and self.config.sync_free else None
        if idx is not None and int(idx) in self._train_sizes:
            return self._train_sizes[int(idx)]
        hw = int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0])
        if idx is not None:
            self._train_sizes[int(idx)] = hw
        return hw

    def step_post_backward(self, step: int) -> None:
        if self.info is None:  # the CPU rasterizer keeps no screen-space record: no densification
            return
        super().step_post_backward(step)

    def get_outputs(self, camera: Cameras) -> Dict[str, torch.Tensor]:
        """splatfacto's outputs (``rgb``, ``depth``, ``accumulation``, ``background``) for one camera, rendered by
        :func:`~evolsplat_ns.model.render.render_gaussians` (gsplat on CUDA)."""
        from evolsplat_ns.cameras import from_nerfstudio_cameras
        from evolsplat_ns.model.render import render_gaussians, resolve_backend

        if not isinstance(camera, Cameras):
            raise TypeError("evolsplat-ft renders cameras, not ray bundles")
        if camera.device != self.device:  # the datamanager's cameras are already there; a copy costs ~0.4 ms
            camera = camera.to(self.device)
        keep = None
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(self.means).squeeze(-1)
        p = {k: (v[keep] if keep is not None else v) for k, v in self.gauss_params.items()}
        pose = self.camera_optimizer.apply_to_camera(camera) if self.training else None
        c2w, K = from_nerfstudio_cameras(camera, pose)
        scale = self._get_downscale_factor()
        H, W = (v // scale for v in self.image_size(camera))
        K = K[0].clone()
        K[:2] /= scale
        interval = self.config.sh_degree_interval
        degree = self.config.sh_degree if interval <= 0 else min(self.step // interval, self.config.sh_degree)
        depth = self.config.output_depth_during_training or not self.training
        kind = resolve_backend(self.config.rasterizer, self.device)
        out = render_gaussians(p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"])[:, 0],
                               torch.cat([p["features_dc"][:, None], p["features_rest"]], 1), c2w[0].float(),
                               K.float(), W, H, sh_degree=degree, render_depth=depth, backend=kind,
                               return_info=True, absgrad=self.strategy.absgrad,
                               tile_size=self.config.raster_tile_size)
        self.info = out["info"] if self.training else None
        if self.training and self.info is not None:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step,
                                            self.info)
        background = self._get_background_color()
        alpha = out["alpha"]
        rgb = torch.clamp(out["rgb"] + (1.0 - alpha) * background, 0.0, 1.0)
        result = {"rgb": rgb, "accumulation": alpha,
                  "background": background.expand(H, W, 3) if not self.training else background}
        if depth:
            result["depth"] = torch.where(alpha > 0, out["depth"], out["depth"].detach().max())
        return result
