"""RGB point-cloud generators: a segment's seed points and their colours, in the scene's project frame.

Every generator implements :class:`RGBPointCloudGenerator`::

    points, colours = generator.generate_pointcloud(scene, segment, input_frames=allowed)

``points`` ``[N, 3]`` float32 (project frame), ``colours`` ``[N, 3]`` float32 in [0, 1]. ``input_frames`` is the
data side's restriction (``None`` = all frames; a set of frame indices; or a predicate): frames outside it are
never read. Sources:

- :class:`MonocularRGBPointCloudGenerator` (``"depth"``): unprojects the metric depth maps of the segment's
  input frames (pixel grid ``[::downscale, ::downscale]``), coloured by their images;
- :class:`LidarRGBPointCloudGenerator` (``"lidar"``): per-frame LiDAR sweeps coloured by projecting them into
  the frame's images;
- :class:`SeedPlySource` (``"seed-ply"``): the scene's seed PLY, moved into the project frame and cropped.

**Empty clouds.** When filtering leaves no point, generation is retried with progressively fewer filters, in
this order (each stage adds to the previous ones), with a warning naming the stage that worked:

1. as configured;
2. without the depth-consistency check;
3. without the sky filter;
4. without the boxes (no crop, whole-cloud treatment);
5. with sparsity ``full`` (every *allowed* input frame of the segment).

If the cloud is still empty, :class:`EmptyPointCloudError` names the scene, the segment and the frames used.
Frames outside the input restriction are not read at any stage.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from evolsplat_ns.cameras import project_points, unproject_depth
from evolsplat_ns.data.errors import ConfigError, DataValidationError
from evolsplat_ns.data.records import ImageRecord, SceneRecord
from evolsplat_ns.data.scene_index import Segment
from evolsplat_ns.pointcloud import filters
from evolsplat_ns.pointcloud.options import (
    InputFrames,
    PointCloudOptions,
    allowed_predicate,
    default_boxes,
    inside_box,
    restricted_frames,
    segment_input_frames,
)

logger = logging.getLogger(__name__)

#: ``scene.metadata[LIDAR_LOADER_KEY](frame_index) -> [M, 3+]`` points of one sweep in the project frame.
LIDAR_LOADER_KEY = "lidar_loader"
LidarLoader = Callable[[int], np.ndarray]


class EmptyPointCloudError(RuntimeError):
    """A segment's point cloud is empty after every fallback."""


@dataclass
class GenerationReport:
    """What the last ``generate_pointcloud`` call did."""

    scene: str
    segment_id: int
    frames: List[int]
    stage: str
    num_raw: int
    num_points: int
    seconds: float
    fallbacks: List[str] = field(default_factory=list)


def _read_rgb(path: Path) -> np.ndarray:
    from evolsplat_ns.data.views import read_image

    return read_image(path)


def _read_depth(path: Path, non_finite: str = "error") -> np.ndarray:
    from evolsplat_ns.data.views import read_depth

    return read_depth(path, non_finite=non_finite)


def _fit(arr: np.ndarray, rec: ImageRecord, path: Path) -> np.ndarray:
    """A decoded array at the record's size (scenes down-scaled on load; see ``views.fit_to_record``)."""
    from evolsplat_ns.data.views import fit_to_record

    return fit_to_record(arr, rec, path)


def _depth_provider(scene: SceneRecord):
    from evolsplat_ns.data.views import depth_provider

    return depth_provider(scene)


def _empty() -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 3), dtype=np.float32), np.zeros((0, 3), dtype=np.float32)


_FALLBACKS: Tuple[Tuple[str, Dict[str, object]], ...] = (
    ("as configured", {}),
    ("without depth consistency", {"depth_consistency": False}),
    ("without sky filter", {"depth_consistency": False, "filter_sky": False}),
    ("without boxes", {"depth_consistency": False, "filter_sky": False, "use_bbx": False}),
    ("all allowed input frames", {"depth_consistency": False, "filter_sky": False, "use_bbx": False,
                                  "sparsity": "full"}),
)


class RGBPointCloudGenerator(abc.ABC):
    """Builds a segment's RGB point cloud (project frame). See the module docstring."""

    name: ClassVar[str] = "abstract"

    def __init__(self, options: Optional[PointCloudOptions] = None, **overrides) -> None:
        opts = options if options is not None else PointCloudOptions(generator=self.name)  # type: ignore[arg-type]
        if overrides:
            opts = opts.replace(**overrides)
        if opts.generator != self.name:
            opts = opts.replace(generator=self.name)
        self.options = opts.validate()
        self.last_report: Optional[GenerationReport] = None

    # ------------------------------------------------------------------------------------------------ frames
    def cameras(self, scene: SceneRecord) -> List[int]:
        ids = self.options.chosen_cam_ids
        if ids is None:
            return list(scene.camera_ids)
        missing = [c for c in ids if c not in scene.camera_ids]
        if missing:
            raise ConfigError(
                f"chosen_cam_ids {tuple(ids)}: scene {scene.scene_id} ({scene.name}) has no camera {missing} "
                f"(cameras: {scene.camera_ids})"
            )
        return [int(c) for c in ids]

    def frames_for(self, scene: SceneRecord, segment: Segment, input_frames: InputFrames = None,
                   options: Optional[PointCloudOptions] = None) -> List[int]:
        """Frames whose data feed the segment's cloud (sparsity, then the input restriction)."""
        opts = options or self.options
        return segment_input_frames(segment.frame_indices, opts.sparsity, input_frames)

    def cache_key(self, scene: SceneRecord, segment: Segment, input_frames: InputFrames = None) -> Dict[str, object]:
        """Everything the cloud depends on, JSON-able (the cache hashes it)."""
        allowed = allowed_predicate(input_frames)
        return {
            "generator": self.name,
            "options": self.options.to_key(),
            "frames": self.frames_for(scene, segment, input_frames),
            "allowed_frames": [int(t) for t in segment.frame_indices if allowed(t)],
            "cameras": self.cameras(scene),
            "segment": {"frames": [int(t) for t in segment.frame_indices],
                        "aabb": [[float(x) for x in v] for v in segment.aabb]},
            "scene": {"name": scene.name, "num_frames": scene.num_frames, **_file_stamps(self._source_files(scene))},
        }

    def _source_files(self, scene: SceneRecord) -> List[Path]:
        tf = scene.metadata.get("transforms") if isinstance(scene.metadata, dict) else None
        return [Path(tf)] if tf else []

    # ------------------------------------------------------------------------------------------------ generation
    def generate_pointcloud(
        self, scene: SceneRecord, segment: Segment, input_frames: InputFrames = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``(points [N, 3] float32, colours [N, 3] float32 in [0, 1])`` in the project frame."""
        t0 = time.perf_counter()
        if segment.scene_id != scene.scene_id:
            raise ValueError(f"segment {segment.key} does not belong to scene {scene.scene_id} ({scene.name})")
        tried: List[str] = []
        seen = set()
        for stage, changes in _FALLBACKS:
            opts = self.options.replace(**changes)
            frames = self.frames_for(scene, segment, input_frames, opts)
            sig = (tuple(frames), opts.depth_consistency, opts.filter_sky, opts.use_bbx)
            if sig in seen:
                continue
            seen.add(sig)
            pts, cols = self._raw(scene, segment, frames, opts, input_frames)
            n_raw = len(pts)
            pts, cols = self._postprocess(scene, segment, frames, pts, cols, opts)
            if len(pts) > 0:
                pts, cols = filters.random_subsample(pts, cols, opts.max_points, opts.seed)
                if tried:
                    logger.warning(
                        "scene %d (%s) segment %d: empty point cloud %s; built it %s (%d points)",
                        scene.scene_id, scene.name, segment.segment_id, " / ".join(tried), stage, len(pts),
                    )
                self.last_report = GenerationReport(scene.name, segment.segment_id, frames, stage, n_raw, len(pts),
                                                    time.perf_counter() - t0, tried)
                return (np.ascontiguousarray(pts, dtype=np.float32),
                        np.ascontiguousarray(np.clip(cols, 0.0, 1.0), dtype=np.float32))
            tried.append(stage)
        raise EmptyPointCloudError(
            f"scene {scene.scene_id} ({scene.name}) segment {segment.segment_id}: the {self.name} point cloud is "
            f"empty after every fallback ({', '.join(tried)}); input frames "
            f"{self.frames_for(scene, segment, input_frames, self.options.replace(sparsity='full'))}, "
            f"cameras {self.cameras(scene)}"
        )

    def _postprocess(self, scene, segment, frames, pts, cols, opts):
        centers = [scene.image(t, c).center for t in frames for c in self.cameras(scene)]
        crop, inner = default_boxes(segment.aabb, np.array(centers).reshape(-1, 3), opts)
        return filters.postprocess(pts, cols, opts, crop, inner)

    @abc.abstractmethod
    def _raw(self, scene: SceneRecord, segment: Segment, frames: Sequence[int], opts: PointCloudOptions,
             input_frames: InputFrames) -> Tuple[np.ndarray, np.ndarray]:
        """Unfiltered points and colours of ``frames`` (before boxes, outlier removal, subsampling)."""


def _file_stamps(paths: Sequence[Path]) -> Dict[str, object]:
    out = {}
    for p in paths:
        try:
            st = Path(p).stat()
            out[str(Path(p).name)] = [int(st.st_mtime_ns), int(st.st_size)]
        except OSError:
            out[str(Path(p).name)] = None
    return out


# ----------------------------------------------------------------------------------------------------------------
# depth maps
# ----------------------------------------------------------------------------------------------------------------


class _DepthCache:
    """A few decoded depth maps (a frame is compared with its neighbour, then becomes the neighbour)."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._d: "OrderedDict[Tuple[int, int], np.ndarray]" = OrderedDict()

    def get(self, scene: SceneRecord, rec: ImageRecord) -> np.ndarray:
        key = (rec.frame_index, rec.camera_id)
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        if rec.depth_path is None and _depth_provider(scene) is not None:
            d = _depth_provider(scene)(rec)  # no depth file: the layout's (LiDAR-derived) depth at the record's size
            self._d[key] = d
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
            return d
        if rec.depth_path is None:
            raise DataValidationError(
                scene.root, f"frame {rec.timestep} camera {rec.camera_id}: depth_file_path",
                "a metric depth map for every image (the depth point-cloud generator unprojects them)",
            )
        policy = scene.metadata.get("non_finite_depth", "error")
        d = _read_depth(rec.depth_path) if policy == "error" else _read_depth(rec.depth_path, non_finite=policy)
        d = _fit(d, rec, rec.depth_path)
        if d.shape != (rec.height, rec.width):
            raise DataValidationError(rec.depth_path, "depth", f"a depth map of {rec.height}x{rec.width}", d.shape)
        self._d[key] = d
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return d


class MonocularRGBPointCloudGenerator(RGBPointCloudGenerator):
    """Unprojected metric depth maps of the segment's input frames (see the module docstring).

    Per camera, frames are visited in time order; with ``depth_consistency`` each frame is checked against the
    previous kept frame of the same camera (the first one against the next kept frame, so that a moving object in
    the first frame is caught too).
    """

    name = "depth"

    def _raw(self, scene, segment, frames, opts, input_frames):
        if not frames:
            return _empty()
        ds = int(opts.downscale)
        pts_all, cols_all = [], []
        depths = _DepthCache()
        warned_no_mask = False
        for cam in self.cameras(scene):
            for i, t in enumerate(frames):
                rec = scene.image(t, cam)
                depth = depths.get(scene, rec)
                world = unproject_depth(torch.from_numpy(depth.astype(np.float64)),
                                        torch.as_tensor(rec.c2w, dtype=torch.float64),
                                        torch.as_tensor(rec.K, dtype=torch.float64)).numpy()
                world = world[::ds, ::ds]
                d = depth[::ds, ::ds]
                valid = np.isfinite(d) & (d > 0)
                if opts.filter_sky:
                    if rec.sky_mask_path is not None:
                        mask = _fit(filters.read_mask(rec.sky_mask_path), rec, rec.sky_mask_path)
                        if mask.shape != depth.shape:
                            raise DataValidationError(rec.sky_mask_path, "sky mask",
                                                      f"a mask of {depth.shape[1]}x{depth.shape[0]}", mask.shape)
                        valid &= ~filters.sky_from_mask(mask, scene.sky_mask_convention)[::ds, ::ds]
                    elif not warned_no_mask:
                        warned_no_mask = True
                        logger.warning("scene %s: images without sky mask; sky filtering skipped for them", scene.name)
                if not valid.any():
                    continue
                pts = world[valid]
                rgb = _fit(_read_rgb(rec.image_path), rec, rec.image_path)
                if rgb.shape[:2] != depth.shape:
                    raise DataValidationError(rec.image_path, "image", f"an image of {depth.shape[1]}x{depth.shape[0]}",
                                              rgb.shape[:2])
                cols = rgb[::ds, ::ds][valid].astype(np.float32) / 255.0
                if opts.depth_consistency and len(frames) > 1:
                    ref_t = frames[i - 1] if i > 0 else frames[1]
                    ref = scene.image(ref_t, cam)
                    keep = filters.depth_consistency_mask(pts, depths.get(scene, ref), ref.c2w, ref.K)
                    pts, cols = pts[keep], cols[keep]
                pts_all.append(pts)
                cols_all.append(cols)
        if not pts_all:
            return _empty()
        return np.concatenate(pts_all).astype(np.float32), np.concatenate(cols_all).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# LiDAR
# ----------------------------------------------------------------------------------------------------------------


def lidar_loader(scene: SceneRecord) -> LidarLoader:
    """The scene's LiDAR hook: ``scene.metadata["lidar_loader"](frame_index) -> [M, 3+]`` (project frame)."""
    loader = scene.metadata.get(LIDAR_LOADER_KEY) if isinstance(scene.metadata, dict) else None
    if loader is None or not callable(loader):
        raise ConfigError(
            f"scene {scene.scene_id} ({scene.name}) has no LiDAR: the lidar generator needs "
            f"scene.metadata['{LIDAR_LOADER_KEY}'] = callable(frame_index) -> [M, 3] points in the project frame"
        )
    return loader


def colour_points_from_images(
    points: np.ndarray, recs: Sequence[ImageRecord], images: Sequence[np.ndarray],
    sky: Optional[Sequence[Optional[np.ndarray]]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Colour world points by the nearest camera (by distance to its centre) that sees them.

    Returns ``(keep [N] bool, colours [keep.sum(), 3] float32)``: points seen by no camera are dropped, and so are
    points whose chosen pixel is sky when ``sky`` masks (True = sky) are given.
    """
    n = len(points)
    if n == 0 or not recs:
        return np.zeros(n, dtype=bool), np.zeros((0, 3), dtype=np.float32)
    c2w = torch.as_tensor(np.stack([r.c2w for r in recs]), dtype=torch.float64)
    K = torch.as_tensor(np.stack([r.K for r in recs]), dtype=torch.float64)
    uv, z = project_points(torch.as_tensor(points[:, :3], dtype=torch.float64), c2w, K)
    uv, z = uv.numpy(), z.numpy()  # [V, N, 2], [V, N]
    col = np.floor(uv[..., 0])
    row = np.floor(uv[..., 1])
    W = np.array([r.width for r in recs])[:, None]
    H = np.array([r.height for r in recs])[:, None]
    sees = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    centers = np.stack([r.center for r in recs])  # [V, 3]
    dist = np.linalg.norm(points[None, :, :3] - centers[:, None, :], axis=-1)
    dist = np.where(sees, dist, np.inf)
    best = np.argmin(dist, axis=0)  # [N]
    keep = np.isfinite(dist[best, np.arange(n)])
    colours = np.zeros((n, 3), dtype=np.float32)
    for v, img in enumerate(images):
        sel = keep & (best == v)
        if not sel.any():
            continue
        r_, c_ = row[v, sel].astype(np.int64), col[v, sel].astype(np.int64)
        colours[sel] = img[r_, c_].astype(np.float32) / 255.0
        if sky is not None and sky[v] is not None:
            on_sky = sky[v][r_, c_]
            idx = np.nonzero(sel)[0]
            keep[idx[on_sky]] = False
    return keep, colours[keep]


class LidarRGBPointCloudGenerator(RGBPointCloudGenerator):
    """LiDAR sweeps of the segment's input frames, coloured by the frame's images (nearest camera that sees the
    point); points seen by no camera are dropped. ``depth_consistency`` and ``downscale`` do not apply."""

    name = "lidar"

    def cache_key(self, scene, segment, input_frames=None):
        key = super().cache_key(scene, segment, input_frames)
        key["lidar"] = {"paths": [str(p) if p else None for p in (scene.lidar_paths or [])],
                        "version": str(scene.metadata.get("lidar_version", ""))}
        return key

    def _raw(self, scene, segment, frames, opts, input_frames):
        if not frames:
            return _empty()
        load = lidar_loader(scene)
        cams = self.cameras(scene)
        pts_all, cols_all = [], []
        for t in frames:
            pts = np.asarray(load(int(t)), dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] < 3:
                raise DataValidationError(scene.root, f"lidar frame {t}", "an [M, 3+] array of points", pts.shape)
            pts = pts[:, :3]
            pts = pts[np.all(np.isfinite(pts), axis=1)]
            recs = [scene.image(t, c) for c in cams]
            images = [_fit(_read_rgb(r.image_path), r, r.image_path) for r in recs]
            sky = None
            if opts.filter_sky:
                sky = [filters.sky_from_mask(_fit(filters.read_mask(r.sky_mask_path), r, r.sky_mask_path),
                                             scene.sky_mask_convention)
                       if r.sky_mask_path is not None else None for r in recs]
            keep, cols = colour_points_from_images(pts, recs, images, sky)
            pts_all.append(pts[keep])
            cols_all.append(cols)
        if not pts_all:
            return _empty()
        return np.concatenate(pts_all).astype(np.float32), np.concatenate(cols_all).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# seed PLY
# ----------------------------------------------------------------------------------------------------------------


class SeedPlySource(RGBPointCloudGenerator):
    """The scene's seed PLY (data world frame), moved into the project frame by ``scene.align`` and cropped to
    ``crop_aabb`` (default: the segment's box). It is a finished cloud: no outlier removal or down-sampling, only
    ``max_points``. Frame options do not apply; since the PLY may hold points of frames the data side holds out,
    a restricted segment is refused unless ``seed_ply_ignores_holdout``."""

    name = "seed-ply"

    def _source_files(self, scene):
        return super()._source_files(scene) + ([Path(scene.seed_ply_path)] if scene.seed_ply_path else [])

    def cache_key(self, scene, segment, input_frames=None):
        key = super().cache_key(scene, segment, input_frames)
        key["frames"] = []
        key["seed_ply"] = str(scene.seed_ply_path)
        return key

    def generate_pointcloud(self, scene, segment, input_frames=None):
        t0 = time.perf_counter()
        if scene.seed_ply_path is None:
            raise ConfigError(f"scene {scene.scene_id} ({scene.name}) has no seed PLY (ply_file_path)")
        held = restricted_frames(segment.frame_indices, input_frames)
        if held and not self.options.seed_ply_ignores_holdout:
            raise ConfigError(
                f"scene {scene.scene_id} ({scene.name}) segment {segment.segment_id}: the data side holds out frames "
                f"{held[:8]}{' ...' if len(held) > 8 else ''} but the seed PLY may contain their points; use the depth "
                f"generator, or set seed_ply_ignores_holdout"
            )
        from evolsplat_ns.pointcloud.plyio import read_ply

        pts, cols = read_ply(scene.seed_ply_path)
        A = np.asarray(scene.align, dtype=np.float64)
        pts = (pts.astype(np.float64) @ A[:3, :3].T + A[:3, 3]).astype(np.float32)
        opts = self.options
        crop = default_boxes(segment.aabb, np.zeros((0, 3)), opts)[0]
        keep = inside_box(pts, crop)
        n_raw = len(pts)
        pts, cols = pts[keep], cols[keep]
        if len(pts) == 0:
            raise EmptyPointCloudError(
                f"scene {scene.scene_id} ({scene.name}) segment {segment.segment_id}: no point of the seed PLY "
                f"{scene.seed_ply_path} ({n_raw} points) lies in the box {crop.tolist()} (project frame)"
            )
        pts, cols = filters.random_subsample(pts, cols, opts.max_points, opts.seed)
        self.last_report = GenerationReport(scene.name, segment.segment_id, [], "as configured", n_raw, len(pts),
                                            time.perf_counter() - t0)
        return np.ascontiguousarray(pts, dtype=np.float32), np.ascontiguousarray(cols, dtype=np.float32)

    def _raw(self, scene, segment, frames, opts, input_frames):  # pragma: no cover - generate_pointcloud overrides
        raise NotImplementedError


GENERATOR_CLASSES: Dict[str, type] = {
    "depth": MonocularRGBPointCloudGenerator,
    "lidar": LidarRGBPointCloudGenerator,
    "seed-ply": SeedPlySource,
}


def make_generator(options: Optional[PointCloudOptions] = None, **overrides) -> RGBPointCloudGenerator:
    """The generator named by ``options.generator`` (``depth`` | ``lidar`` | ``seed-ply``)."""
    opts = options if options is not None else PointCloudOptions()
    if overrides:
        opts = opts.replace(**overrides)
    opts.validate()
    return GENERATOR_CLASSES[opts.generator](opts)
