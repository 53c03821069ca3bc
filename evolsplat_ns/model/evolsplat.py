"""The EVolSplat model (nerfstudio ``Model``): encoder -> Gaussian heads -> renderer.

Per batch (``extract_shared``, once): voxelise the segment's seed points, run the sparse U-Net, sample its
features trilinearly at ``point + cached offset`` straight from the sparse voxels, sample the image-window
features of every point in the source views, keep the points seen by enough source samples (projection mask),
and predict the offset (written back to the segment's offset cache during training).

Per target view (``render_view``): distance and direction from the target camera, the colour / geometry /
opacity heads, the foreground Gaussians rasterized, the background hemisphere rasterized, composited
``fg + (1 - alpha_fg) * bg`` and clamped to [0, 1].

Only ``f3`` (volume features of the kept points) and ``means`` (points + predicted offset) carry gradient from
the shared part to the per-view part; the train step cuts the graph there (``evolsplat_ns.pipeline``).
"""

from __future__ import annotations

import logging
import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, ContextManager, Dict, List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.base_model import Model, ModelConfig
from torch import Tensor
from torch.nn import Parameter

from evolsplat_ns.cameras import from_nerfstudio_cameras
from evolsplat_ns.data.batch import SegmentBatch, Views
from evolsplat_ns.data.plausibility import ssim_window as _ssim_window  # the rule start-up checks
from evolsplat_ns.model.background import HemisphereBackground
from evolsplat_ns.model.heads import GaussianHeads, view_inputs
from evolsplat_ns.model.render import visible_gaussians
from evolsplat_ns.pointcloud.options import PointCloudOptions

logger = logging.getLogger(__name__)

CULL_MIN_FRACTION = 0.8
"""View culling gathers the visible rows only when it drops at least 20 % of the points (a copy of the 100+-wide
window features of a million points costs about as much as the colour head it saves)."""
DOME_SORT_SCALE = 1000.0
"""Joint compositing renders the background dome scaled by this factor about the target camera (see render_view)."""


@dataclass
class EvolSplatModelConfig(ModelConfig):
    """EVolSplat: sparse volume encoder + image-window features + Gaussian heads + background."""

    _target: Type = field(default_factory=lambda: EvolSplatModel)
    enable_collider: bool = False
    voxel_size: float = 0.1
    """Voxel size of the sparse feature volume (metres)."""
    volume_dim: int = 16
    """Channels of the sparse U-Net output."""
    local_radius: int = 1
    """Window radius R of the image-window features ((2R+1)^2 samples per source view)."""
    visibility_depth: Literal["seed-cloud", "data"] = "seed-cloud"
    """Source depth D behind the window features' visibility channel (z - D): 'seed-cloud' = the segment's seed
    points z-buffered into each source view at each point's footprint (defined wherever a point projects: works with
    sparse LiDAR depth or none); 'data' = the data's depth maps (the reference, which has dense monocular depth), the
    points' z-buffer where a map has no value. Unknown depth is never read as 0."""
    colour_residual: bool = True
    """The colour head corrects a base colour from the source views (the visibility-weighted window-centre colours;
    its last layer starts at zero) instead of predicting colour from scratch as the reference does."""
    sh_degree: int = 1
    """Spherical-harmonics degree of the decoded colour."""
    offset_max: float = 0.1
    """Bound of the predicted per-point offset (metres)."""
    sparse_backend: Literal["torch", "torchsparse", "spconv"] = "torch"
    """Sparse U-Net backend: the project's own ('torch', needs nothing beyond torch), or torchsparse 2.1 / spconv 2.3
    when importable (same weights and outputs; docs/BENCHMARKS.md B5 compares them)."""
    sparse_conv_impl: Literal["auto", "gather", "igemm"] = "auto"
    """How the project's own backend runs a convolution: 'igemm' = Triton implicit-GEMM kernels (CUDA), 'gather' =
    gather-matmul-scatter in pure PyTorch (any device), 'auto' = igemm on CUDA when Triton is importable, else
    gather. Same results up to float rounding."""
    fused_kernel_maps: bool = True
    """On CUDA, a segment's kernel maps (built on its first reconstruction) come from a few Triton kernels instead of
    ~40-60 PyTorch operations per map, and the volume's trilinear corners are looked up in one kernel (every
    reconstruction). Same maps and samples (tested against the PyTorch twin on the GPU). H200, KITTI-360 size: a
    first-time segment 15.0 ms instead of 21.2 (docs/BENCHMARKS.md, session 13). Other devices, or False: PyTorch."""
    volume_sampling: Literal["sparse", "dense"] = "sparse"
    """Sample the feature volume straight from the sparse voxels, or densify it like the reference."""
    volume_aabb: Optional[Tuple[float, float, float, float, float, float]] = None
    """Crop box (xmin, ymin, zmin, xmax, ymax, zmax, project frame) of the feature volume; None = the bounds of the
    segment's points. Points outside sample zero features. Dense sampling allocates this whole box."""
    freeze_volume: bool = False
    """Compute a segment's feature volume once (no gradient to the U-Net) and reuse it for its later batches."""
    reuse_volume: bool = True
    """In inference (eval mode, no gradient), a segment reconstructed again with other source views reuses its
    feature volume, then (from the third reconstruction) its volume features and offsets at every point: they depend
    only on the segment's seed cloud and the network's weights, not on the source images. One segment is kept (the
    last one reconstructed); a change of weights (an optimizer step, a loaded checkpoint), of the segment's offsets
    or of an option that shapes the volume recomputes it."""
    num_source_views: Optional[int] = None
    """Source views per batch (source keyframes x cameras); taken from the data when None."""
    bg_num_points: int = 700 * 700
    """Points of the full Fibonacci sphere whose upper half is the background hemisphere."""
    bg_shapes: Literal["auto", "compact", "fixed"] = "auto"
    """Which dome points a view decodes and rasterizes: 'compact' = only those the target camera can see and a source
    view sees (two host syncs per view to compact them), 'fixed' = all of them, opacity 0 where 'compact' drops one
    (the same image; fixed shapes, no host sync), 'auto' = fixed on CUDA (where decoding the whole dome costs less than
    the syncs), compact elsewhere."""
    bg_radius: float = 100.0
    bg_center: Tuple[float, float, float] = (0.0, 3.8, 5.6)
    """Hemisphere centre in the OpenCV frame of the segment's middle source camera (metres)."""
    ssim_lambda: float = 0.2
    """Loss = (1 - ssim_lambda) L1 + ssim_lambda (1 - SSIM)."""
    entropy_weight: float = 0.1
    entropy_every: int = 10
    """The accumulation-entropy term is added every this many steps."""
    composite: Literal["separate", "joint"] = "separate"
    """How foreground and background meet in training and plain renders. 'separate' (the reference): rasterize
    them apart and composite ``fg + (1 - alpha_fg) bg``. 'joint': one rasterization of both (the dome sorted
    behind the segment), faster since covered pixels skip the dome; it differs where the foreground is nearly
    opaque, because the rasterizer stops a pixel before the Gaussian that would take its transmittance below
    1e-4 (up to ``1 - alpha_fg`` of the dome is dropped there). Renders with depth (viewer, eval) use 'separate'."""
    view_cull: bool = True
    """Per target view, Gaussians that cannot reach the image (behind the near plane, or 3 sigma outside it, by a
    conservative bound) skip the colour head and the rasterizer. The image is unchanged (tested)."""
    tf32_matmul: bool = False
    """Let every CUDA matmul (heads, sparse convolutions), training included, use TF32 tensor cores. A process-wide
    torch setting, so it is off by default (it would also change the precision of the user's code); renders without
    gradient use TF32 anyway with ``render_tf32``."""
    render_tf32: bool = True
    """Renders without gradient on CUDA (viewer, evaluation, inference, B2) run their matmuls (the heads) on TF32
    tensor cores, the torch flag set for the render and restored after it: ~1.5-2.5 ms less per KITTI-360-size view
    (B2), colours within ~1e-3. Training, and everything outside a render, keep full float32."""
    compile_decode: Literal["off", "fuse", "graphs"] = "off"
    """Renders without gradient on CUDA (viewer, evaluation, inference): decode every point's Gaussian with the
    heads compiled by ``torch.compile`` ('fuse': fused kernels; 'graphs': also CUDA graphs, mode reduce-overhead),
    instead of view culling + eager heads. The first render of each point count compiles (seconds). Training is
    always eager. Tested against the eager decode on the GPU machine."""
    rasterizer: Literal["auto", "gsplat", "torch"] = "auto"
    """gsplat on CUDA, the pure-PyTorch reference rasterizer on the CPU (slow; tests and small demos)."""
    raster_tile_size: int = 8
    """Pixel tile size of the rasterizer. A street's vanishing point gathers tens of thousands of tiny Gaussians in a
    few tiles, and the rasterizer's time is that of its longest tile: 8 renders a KITTI-360-size view's foreground
    2.2x faster than gsplat's default 16 (docs/BENCHMARKS.md). Images differ only by the 3-sigma cut (alpha < 0.011)."""
    pointcloud: PointCloudOptions = field(default_factory=PointCloudOptions)
    """How each segment's seed point cloud is built (generator, sparsity, sky filter, boxes, max_points...)."""
    pointcloud_cache_dir: Optional[Path] = None
    """Where segment clouds are cached (default: <data>/.evolsplat_cache); reused across runs."""
    resident_segments: int = 2
    """Segments whose state stays on the GPU; the others wait on the CPU."""


@dataclass(frozen=True)
class SharedState:
    """What ``extract_shared`` computes once per batch, for the M kept points of the active segment.

    Only :attr:`GRAD_FIELDS` (``f3`` and ``means``) carry gradient to the shared parameters (the sparse U-Net and the
    offset head); the train step cuts the graph there (:meth:`cut`) and renders every target view from the cut
    state, whose ``f3`` / ``means`` are leaves. Everything else is constant for the batch.
    """

    f3: Tensor
    """[M, C] volume features of the kept points (graph to the U-Net)."""
    means: Tensor
    """[M, 3] points + predicted offset, project frame (graph to the offset head and the U-Net)."""
    fw: Tensor
    """[M, V (2R+1)^2 4] image-window features (colour and visibility of each window sample in each source view)."""
    base_log_scale: Tensor
    """[M, 3] log scale of the initial Gaussians (KNN spacing)."""
    mask: Tensor
    """[N] bool, the segment's points kept by the projection mask (M of them)."""
    ref_c2w: Tensor
    """[4, 4] OpenCV c2w of the middle source frame's first camera: the background's reference."""
    source: Views
    """The source views the state was extracted from (the background samples them per target view)."""
    base_rgb: Optional[Tensor] = None
    """[M, 3] the sources' colour of each point (with ``colour_residual``), else None."""

    GRAD_FIELDS: ClassVar[Tuple[str, ...]] = ("f3", "means")

    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    def outputs(self) -> Dict[str, Tensor]:
        """The fields that carry gradient, by name (what :func:`~evolsplat_ns.pipeline.multiview_backward`
        backpropagates through once)."""
        return {k: getattr(self, k) for k in self.GRAD_FIELDS}

    def with_outputs(self, outputs: Dict[str, Tensor]) -> "SharedState":
        """This state with its gradient-carrying fields replaced (e.g. by the cut leaves)."""
        unknown = set(outputs) - set(self.GRAD_FIELDS)
        if unknown:
            raise KeyError(f"SharedState.with_outputs: not gradient fields: {sorted(unknown)}")
        return dataclasses.replace(self, **outputs)

    def detached(self) -> "SharedState":
        """A copy without graph (for display / evaluation after the train step)."""
        return self.with_outputs({k: v.detach() for k, v in self.outputs().items()})


class EvolSplatModel(Model):
    """See the module docstring."""

    config: EvolSplatModelConfig

    def populate_modules(self) -> None:
        from evolsplat_ns.model.render import check_tile_size
        from evolsplat_ns.model.segment_state import SegmentStateStore
        from evolsplat_ns.model.sparse import build_unet

        check_tile_size(self.config.raster_tile_size, "--pipeline.model.raster-tile-size")  # before any long work
        meta = self.kwargs.get("metadata") or {}
        V = self.config.num_source_views or int(meta.get("num_source_views", 3))
        self.num_source_views = V
        window = (2 * self.config.local_radius + 1) ** 2
        self.encoder = build_unet(self.config.sparse_backend, in_channels=3, out_channels=self.config.volume_dim,
                                  impl=self.config.sparse_conv_impl)
        self.heads = GaussianHeads(self.config.volume_dim, V * window * 4, self.config.sh_degree,
                                   self.config.offset_max, colour_residual=self.config.colour_residual)
        self.background = HemisphereBackground(V, self.config.bg_num_points, self.config.bg_radius,
                                               self.config.bg_center)
        # Checkpoints keep only the offsets; the rest of a segment is rebuilt deterministically from its cached cloud.
        self.segments = SegmentStateStore(resident_segments=self.config.resident_segments, persist=("offset",))
        self.step = 0
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self._lpips = None
        self._lpips_failed = False
        self._display: Optional[Tuple[SharedState, Tuple[int, int]]] = None
        self._compiled: Optional[Tuple[str, Callable]] = None
        self.display_provider: Optional[Callable[[], None]] = None
        """Called by a render when nothing is displayed yet; it should reconstruct a segment and ``set_display`` it
        (the pipeline's: the viewer's choice, else the first evaluation segment)."""
        if self.config.tf32_matmul and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

    # ----------------------------------------------------------------------------------------------- nerfstudio
    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {
            "networks": list(self.heads.parameters()) + list(self.background.parameters()),
            "sparse_conv": list(self.encoder.parameters()),
        }

    def step_cb(self, step: int) -> None:
        self.step = step

    def get_training_callbacks(self, training_callback_attributes):
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        return [TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.step_cb)]

    def update_to_step(self, step: int) -> None:
        self.step = step

    # ----------------------------------------------------------------------------------------------- segments
    def init_segment(self, scene, segment, input_frames, data_root) -> Dict[str, Tensor]:
        """State of a segment seen for the first time: its cloud (cached on disk) -> initial Gaussians.

        The cloud and its KNN scales are built on the model's device (``pointcloud.backend`` auto: the torch backend
        on CUDA; see :class:`PointCloudOptions`)."""
        from evolsplat_ns.pointcloud.cache import segment_pointcloud
        from evolsplat_ns.pointcloud.init import init_gaussians

        pc = segment_pointcloud(scene, segment, self.config.pointcloud, input_frames,
                                cache_dir=self.config.pointcloud_cache_dir, data_root=data_root, device=self.device)
        return init_gaussians(pc.points, pc.colours, sh_degree=self.config.sh_degree, knn_distance=pc.knn_distance(),
                              seed=self.config.pointcloud.seed + 1000 * segment.scene_id + segment.segment_id,
                              device=self.device, keys=("means", "colours", "log_scales", "offset"))

    # ----------------------------------------------------------------------------------------------- shared part
    def extract_shared(self, batch: SegmentBatch, stage: Optional[Callable[[str], ContextManager]] = None
                       ) -> SharedState:
        """Shared extraction of one batch (the active segment's points and the batch's source views).

        ``stage(name)``, if given, wraps each step in a context manager (``window_features``, ``voxelize``, ``unet``,
        ``volume_sampling``, ``offset_head``): the benchmarks time the stages of this very code through it."""
        from evolsplat_ns.model.sparse import voxelize
        from evolsplat_ns.model.window_features import sample_window_features, source_colour

        stage = stage or _no_stage
        seg = self.segments.current
        means0: Tensor = seg["means"]
        src = batch.source
        spacing = torch.exp(seg["log_scales"][:, 0])  # the points' neighbour spacing: their z-buffer footprint
        depths = src.depth if self.config.visibility_depth == "data" else None
        with stage("window_features"):
            fw_all, valid, mask = sample_window_features(means0, src.image, src.extrinsics, src.intrinsics, depths,
                                                         radius=self.config.local_radius, spacing=spacing)
        box = self.config.volume_aabb
        with stage("voxelize"):
            vox = self.segments.cached("voxels", lambda: voxelize(
                means0, seg["colours"], self.config.voxel_size, *((box[:3], box[3:]) if box is not None else ()),
                fused_lookup=self.config.fused_kernel_maps and means0.is_cuda))
        idx, f3, new_offset = self._volume_features(seg, vox, mask, stage)
        if self.training:
            self.segments.update_offset(idx, new_offset.detach())
        means = means0[idx] + new_offset
        n_frames = int(src.keyframe_indices.shape[0])
        mid = (n_frames // 2) * (len(src) // n_frames)  # front camera of the middle source frame
        fw = fw_all[idx]
        base_rgb = None
        if self.config.colour_residual:
            base_rgb = source_colour(fw, valid[idx], len(src), self.config.local_radius, fallback=seg["colours"][idx])
        return SharedState(f3=f3, means=means, fw=fw, base_log_scale=seg["log_scales"][idx], mask=mask,
                           ref_c2w=src.extrinsics[mid], source=src, base_rgb=base_rgb)

    def _volume_features(self, seg: Dict[str, Tensor], vox, mask: Tensor, stage) -> Tuple[Tensor, Tensor, Tensor]:
        """Indices ``idx [M]`` of the segment's points kept by ``mask [N]``, their volume features ``[M, C]`` and
        predicted offsets ``[M, 3]``.

        In inference (``reuse_volume``, eval mode, no gradient) they are reused across reconstructions of the same
        segment, whatever its source views: the first keeps the feature volume (its cost is unchanged), the second
        samples the volume and predicts the offsets at every point of the segment once, and the later ones only
        gather those rows. One segment's are kept; the key (:meth:`_volume_version`) holds ints, so the segment
        store drops the entry when it moves the segment between devices and leaves it out of checkpoints."""
        from evolsplat_ns.model.sparse import sample_volume

        mode = self.config.volume_sampling
        reuse = self.config.reuse_volume and not self.training and not torch.is_grad_enabled()
        key = self._volume_version(seg) if reuse else None
        hit = self.segments.get_cache("volume_points") if reuse else None
        volume, f3_all, offset_all = hit[1:] if hit is not None and hit[0] == key else (None, None, None)
        if volume is None and f3_all is None:
            with stage("unet"):
                if self.config.freeze_volume:
                    volume = self.segments.cached("frozen_volume", lambda: self._encode_frozen(vox))
                else:
                    volume = self.encoder(vox.tensor(), cache=vox.kernel_maps)
            if reuse:
                self.segments.clear_caches("volume_points")  # one segment's at a time
                self.segments.set_cache("volume_points", (key, volume, None, None))
        elif f3_all is None:  # the segment's second reconstruction: every point, once
            with stage("volume_sampling"):
                f3_all = sample_volume(volume, vox, seg["means"] + seg["offset"], mode=mode)
            with stage("offset_head"):
                offset_all = self.heads.predict_offset(f3_all)
            self.segments.set_cache("volume_points", (key, None, f3_all, offset_all))
        with stage("volume_sampling"):
            idx = mask.nonzero().squeeze(-1)
            if f3_all is not None:
                return idx, f3_all[idx], offset_all[idx]
            f3 = sample_volume(volume, vox, seg["means"][idx] + seg["offset"][idx], mode=mode)
        with stage("offset_head"):
            return idx, f3, self.heads.predict_offset(f3)

    def _volume_version(self, seg: Dict[str, Tensor]) -> tuple:
        """What the reused volume features depend on besides the segment: the options that shape the volume, and the
        storage and in-place version of every parameter and buffer of the encoder and the heads (an optimizer step
        or a loaded checkpoint changes them) and of the segment's points, colours and offsets."""
        c = self.config
        tensors = [*self.encoder.parameters(), *self.encoder.buffers(), *self.heads.parameters(),
                   seg["means"], seg["offset"], seg["colours"]]
        options = (c.voxel_size, c.volume_aabb, c.volume_sampling, c.freeze_volume, self.heads.offset_max)
        return (options, *((t.data_ptr(), t._version) for t in tensors))

    @torch.no_grad()
    def _encode_frozen(self, vox):
        return self.encoder(vox.tensor(), cache=vox.kernel_maps).detach()

    # ----------------------------------------------------------------------------------------------- per view
    def render_view(self, shared: SharedState, c2w: Tensor, K: Tensor, height: int, width: int,
                    render_depth: bool = False) -> Dict[str, Tensor]:
        """Render one target view (OpenCV ``c2w`` [4,4], ``K`` [3|4,3|4]) of a reconstruction (or of a copy whose ``f3`` /
        ``means`` are the train step's cut leaves, :meth:`SharedState.with_outputs`: they collect this view's gradient).

        Returns ``rgb`` [H, W, 3] (composite, clamped to [0, 1]) and ``accumulation`` [H, W, 1] (foreground
        opacity); with ``render_depth`` or ``composite="separate"`` also the ``foreground`` and ``background``
        layers [H, W, 3], and with ``render_depth`` the foreground ``depth`` [H, W, 1].
        """
        tf32 = self.config.render_tf32 and not torch.is_grad_enabled() and self.device.type == "cuda"
        with tf32_matmuls() if tf32 else contextlib.nullcontext():
            return self._render_view(shared, c2w, K, height, width, render_depth)

    def _render_view(self, shared: SharedState, c2w: Tensor, K: Tensor, height: int, width: int,
                     render_depth: bool) -> Dict[str, Tensor]:
        from evolsplat_ns.model.render import render_gaussians
        from evolsplat_ns.model.rasterize_torch import sh_to_rgb

        f3, means, fw, base_rgb = shared.f3, shared.means, shared.fw, shared.base_rgb
        dist, direction = view_inputs(means, c2w[:3, 3])
        vd = torch.cat([dist, direction], dim=-1)
        compiled = self.compiled_decode()
        if compiled is not None:  # no gradient on CUDA: every point through the compiled decode, no host sync (the
            # background keeps fixed shapes too: its dropped points get opacity 0)
            scales, quats, opa, sh = compiled(f3, fw, vd, base_rgb, shared.base_log_scale)
        else:
            dlog, quats, opa = self.heads.predict_geometry(f3, vd)
            scales = torch.exp(dlog + shared.base_log_scale)
            if self.config.view_cull:  # only Gaussians that can reach this image go through the colour head
                keep = visible_gaussians(means, scales, c2w, K, height, width)
                if keep.numel() < CULL_MIN_FRACTION * means.shape[0]:  # else gathering costs more than it saves
                    means, scales, quats, opa, fw, vd, direction = (
                        x[keep] for x in (means, scales, quats, opa, fw, vd, direction))
                    base_rgb = base_rgb[keep] if base_rgb is not None else None
            sh = self.heads.predict_colour(fw, vd, base_rgb)
            opa = torch.sigmoid(opa)
        K3 = K[:3, :3]
        backend, tile = self.config.rasterizer, self.config.raster_tile_size
        src = shared.source
        cull = (K, height, width) if self.config.view_cull else (None, None, None)
        shapes = self.config.bg_shapes
        compact = compiled is None and (shapes == "compact" or (shapes == "auto" and means.device.type != "cuda"))
        bg_means, bg_rgb, bg_scales, bg_opa = self.background(shared.ref_c2w, c2w, src.image, src.extrinsics,
                                                               src.intrinsics, *cull, compact=compact)
        bg_quats = torch.zeros(bg_means.shape[0], 4, device=bg_means.device, dtype=bg_means.dtype)
        bg_quats[:, 0] = 1.0
        if self.config.composite == "joint" and not render_depth:
            # One rasterization of foreground and background together: if every dome Gaussian sorts behind every
            # foreground one, depth-sorted compositing is exactly fg + (1 - alpha_fg) bg, and pixels the foreground
            # covers skip the dome. The rasterizer sorts by camera z, and an oblique dome point (z = r cos angle) can
            # be nearer than a far segment point, so the dome is scaled about the camera centre by DOME_SORT_SCALE
            # (means and scales alike): its projection is unchanged (EWA is invariant under that scaling) and it
            # sorts last. A 4th channel (1 for foreground Gaussians, 0 for the dome) accumulates alpha_fg.
            fg_rgb = sh_to_rgb(self.config.sh_degree, direction, sh)
            ones, zeros = torch.ones_like(fg_rgb[:, :1]), torch.zeros_like(bg_rgb[:, :1])
            centre = c2w[:3, 3].reshape(1, 3)
            bg_means = centre + DOME_SORT_SCALE * (bg_means - centre)
            bg_scales = DOME_SORT_SCALE * bg_scales
            out = render_gaussians(
                torch.cat([means, bg_means]), torch.cat([quats, bg_quats]), torch.cat([scales, bg_scales]),
                torch.cat([opa, bg_opa]),
                torch.cat([torch.cat([fg_rgb, ones], -1), torch.cat([bg_rgb, zeros], -1)]),
                c2w, K3, width, height, backend=backend, tile_size=tile)
            return {"rgb": torch.clamp(out["rgb"][..., :3], 0.0, 1.0), "accumulation": out["rgb"][..., 3:]}
        fg = render_gaussians(means, quats, scales, opa, sh, c2w, K3, width, height,
                              sh_degree=self.config.sh_degree, render_depth=render_depth, backend=backend,
                              tile_size=tile)
        bg = render_gaussians(bg_means, bg_quats, bg_scales, bg_opa, bg_rgb, c2w, K3, width, height,
                              backend=backend, tile_size=tile)
        alpha = fg["alpha"]
        rgb = torch.clamp(fg["rgb"] + (1.0 - alpha) * bg["rgb"], 0.0, 1.0)
        out = {"rgb": rgb, "accumulation": alpha, "foreground": fg["rgb"], "background": bg["rgb"]}
        if render_depth:
            out["depth"] = fg["depth"]
        return out

    def compiled_decode(self):
        """The compiled per-view decode (:meth:`GaussianHeads.decode`) when ``compile_decode`` applies to this
        render (CUDA, no gradient), else None."""
        mode = self.config.compile_decode
        if mode == "off" or torch.is_grad_enabled() or self.device.type != "cuda":
            return None
        if self._compiled is None or self._compiled[0] != mode:
            fn = torch.compile(self.heads.decode, mode="reduce-overhead" if mode == "graphs" else "default")
            self._compiled = (mode, fn)
        return self._compiled[1]

    @torch.no_grad()
    def export_gaussians(self, shared: SharedState, c2w: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The foreground Gaussians as static 3DGS parameters, colour decoded for one viewpoint.

        The colour decoder is conditioned on the viewing camera; a static 3DGS file cannot be, so the SH
        coefficients decoded for ``c2w`` (default: the segment's middle source camera) are exported.
        """
        c2w = shared.ref_c2w if c2w is None else c2w
        means = shared.means
        dist, direction = view_inputs(means, c2w[:3, 3])
        sh, dlog, quats, opa = self.heads.predict_view(shared.f3, shared.fw, dist, direction, shared.base_rgb)
        return {"means": means, "sh": sh, "opacity_logit": opa, "log_scales": dlog + shared.base_log_scale,
                "quats": quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)}

    # ----------------------------------------------------------------------------------------------- losses
    def view_loss(self, outputs: Dict[str, Tensor], gt: Tensor, step: Optional[int] = None) -> Dict[str, Tensor]:
        """0.8 L1 + 0.2 (1 - SSIM), plus the accumulation entropy every ``entropy_every`` steps."""
        from pytorch_msssim import ssim

        pred = outputs["rgb"]
        l1 = (pred - gt).abs().mean()
        s = ssim(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0, size_average=True,
                 win_size=_ssim_window(pred.shape[0], pred.shape[1]))
        lam = self.config.ssim_lambda
        losses = {"main_loss": (1 - lam) * l1 + lam * (1 - s)}
        step = self.step if step is None else step
        if self.config.entropy_weight > 0 and step % self.config.entropy_every == 0:
            a = outputs["accumulation"].clamp(1e-6, 1 - 1e-6)
            ent = -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()
            losses["entropy_loss"] = self.config.entropy_weight * ent
        return losses

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        return self.view_loss(outputs, batch["image"])

    @torch.no_grad()
    def image_metrics(self, pred: Tensor, gt: Tensor) -> Dict[str, float]:
        """PSNR, SSIM and (when its weights are available locally) LPIPS of one image pair [H, W, 3]."""
        from pytorch_msssim import ssim

        p, g = pred.permute(2, 0, 1)[None].clamp(0, 1), gt.permute(2, 0, 1)[None]
        out = {
            "psnr": float(self.psnr(p, g)),
            "ssim": float(ssim(p, g, data_range=1.0, size_average=True, win_size=_ssim_window(*pred.shape[:2]))),
        }
        lp = self._lpips_metric()
        if lp is not None:
            out["lpips"] = float(lp(p * 2 - 1, g * 2 - 1))
        return out

    def _lpips_metric(self):
        if self._lpips is None and not self._lpips_failed:
            import os

            # torchmetrics' LPIPS loads torchvision's AlexNet weights from the hub cache, downloading them if
            # missing; without network that fails (slowly). Only try when they are already there.
            hub = os.path.join(torch.hub.get_dir(), "checkpoints")
            if not (os.path.isdir(hub) and any(f.startswith("alexnet") for f in os.listdir(hub))):
                self._lpips_failed = True
                logger.warning("LPIPS skipped: torchvision's AlexNet weights are not in %s (no download here)", hub)
                return None
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._lpips = LearnedPerceptualImagePatchSimilarity(normalize=False).to(self.device)
            except Exception as e:  # noqa: BLE001 - weights missing offline: skip the metric, once, loudly
                self._lpips_failed = True
                logger.warning("LPIPS skipped: its AlexNet weights are not available locally (%s)", type(e).__name__)
        return self._lpips

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        return {"psnr": self.psnr(outputs["rgb"].permute(2, 0, 1)[None], batch["image"].permute(2, 0, 1)[None])}

    # ----------------------------------------------------------------------------------------------- viewer / eval
    def set_display(self, shared: SharedState, key: Tuple[int, int]) -> None:
        """The reconstruction that ``get_outputs_for_camera`` renders (viewer, ns-eval)."""
        self._display = (shared, key)

    def clear_display(self) -> None:
        """Forget the displayed reconstruction: the next render asks ``display_provider`` for a new one."""
        self._display = None

    @property
    def displayed_segment(self) -> Optional[Tuple[int, int]]:
        """``(scene_id, segment_id)`` of the displayed reconstruction, or None."""
        return None if self._display is None else self._display[1]

    def forward(self, ray_bundle=None, *, ddp_sync: Optional[List[Tensor]] = None):
        """nerfstudio's forward (render a camera); with ``ddp_sync``, those tensors unchanged: the multi-GPU train
        step passes the shared outputs through DDP's forward right before the one synchronised backward
        (:func:`evolsplat_ns.pipeline.distributed.final_backward`)."""
        if ddp_sync is not None:
            return list(ddp_sync)
        return super().forward(ray_bundle)

    def get_outputs(self, ray_bundle) -> Dict[str, Tensor]:
        if not isinstance(ray_bundle, Cameras):
            raise TypeError("EvolSplatModel renders cameras, not ray bundles")
        return self.get_outputs_for_camera(ray_bundle)

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> Dict[str, Tensor]:
        if self._display is None and self.display_provider is not None:
            self.display_provider()
        if self._display is None:
            raise RuntimeError("no reconstructed segment to display yet: the pipeline sets one (set_display)")
        shared, _ = self._display
        c2w, K = from_nerfstudio_cameras(camera.to(self.device))
        H, W = int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0])
        out = self.render_view(shared, c2w[0].float(), K[0].float(), H, W, render_depth=True)
        # Layers: rgb (composite), foreground, background, accumulation (foreground opacity) and depth, the expected
        # depth of the composite (the dome counted at its radius). With foreground depth alone, uncovered pixels
        # would have depth 0, and the browser viewer, which composites its frustums and grid by this depth, would
        # draw the sky in front of them.
        a = out["accumulation"]
        out["depth"] = a * out["depth"] + (1.0 - a) * self.config.bg_radius
        return out

    def get_image_metrics_and_images(self, outputs, batch):
        gt = batch["image"].to(outputs["rgb"].device)
        m = self.image_metrics(outputs["rgb"], gt)
        return m, {"img": torch.cat([gt, outputs["rgb"]], dim=1), "accumulation": outputs["accumulation"]}


@contextlib.contextmanager
def tf32_matmuls():
    """CUDA float32 matmuls on TF32 tensor cores inside the block; torch's process-wide flag is restored after it."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _no_stage(name: str) -> ContextManager:
    return contextlib.nullcontext()
