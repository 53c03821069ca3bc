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
2. without the depth-consistency check (and the LiDAR free-space test);
3. without the sky filter;
4. without the boxes (no crop, whole-cloud treatment);
5. with sparsity ``full`` (every *allowed* input frame of the segment).

If the cloud is still empty, :class:`EmptyPointCloudError` names the scene, the segment and the frames used.
Frames outside the input restriction are not read at any stage.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch

from evolsplat_ns.cameras import rigid_inverse, unproject_depth
from evolsplat_ns.errors import ConfigError, DataValidationError, EmptyPointCloudError
from evolsplat_ns.data.records import ImageRecord, SceneRecord
from evolsplat_ns.data.scene_index import Segment
from evolsplat_ns.pointcloud import filters
from evolsplat_ns.pointcloud.options import (
    InputFrames,
    PointCloudOptions,
    allowed_predicate,
    default_boxes,
    inside_box,
    resolve_backend,
    restricted_frames,
    segment_input_frames,
)
from evolsplat_ns.threads import torch_threads

logger = logging.getLogger(__name__)

#: ``scene.metadata[LIDAR_LOADER_KEY](frame_index) -> [M, 3+]`` points of one sweep in the project frame.
LIDAR_LOADER_KEY = "lidar_loader"
LidarLoader = Callable[[int], np.ndarray]


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
    stages: Dict[str, float] = field(default_factory=dict)
    """Seconds per stage (every fallback stage tried included): ``read`` (waiting for the reader threads: files,
    decoding), ``colour`` (LiDAR: host-to-device copies and colouring), ``free space`` (LiDAR: moving objects),
    ``depth maps`` (depth generator: reading, unprojection, consistency), ``crop``, ``outlier removal``, ``down-sampling``, ``subsample``, ``to host``."""
    backend: str = ""
    device: str = ""


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


def _sized(arr: np.ndarray, rec: ImageRecord, path: Path, what: str) -> np.ndarray:
    """``arr`` if it has the record's size (pixels are looked up by flat index), else a one-line error."""
    if arr.shape[:2] != (int(rec.height), int(rec.width)):
        raise DataValidationError(path, what, f"{int(rec.width)}x{int(rec.height)} pixels (the camera's size)",
                                  f"{arr.shape[1]}x{arr.shape[0]}")
    return arr


def _depth_provider(scene: SceneRecord):
    from evolsplat_ns.data.views import depth_provider

    return depth_provider(scene)


def _empty() -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 3), dtype=np.float32), np.zeros((0, 3), dtype=np.float32)


def _numpy(x: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


READ_WORKERS = min(16, os.cpu_count() or 1)
"""Threads that read and decode a segment's files (sweeps, images, masks): gzip, JPEG / PNG decoding and resizing
release the GIL, so a 16-core machine reads a 40-frame segment about 10x faster than one thread."""


_T = TypeVar("_T")
_R = TypeVar("_R")


def prefetch_ordered(fn: Callable[[_T], _R], items: Iterable[_T], workers: Optional[int] = None,
                     ahead: Optional[int] = None) -> Iterator[_R]:
    """``fn`` over ``items`` in ``workers`` threads (default ``READ_WORKERS``), results in the order of ``items``, at
    most ``ahead`` (default 2 x workers) results waiting (bounded memory). The first exception is raised where its
    result is due."""
    items = list(items)
    workers = READ_WORKERS if workers is None else int(workers)
    if workers <= 1 or len(items) <= 1:
        yield from (fn(x) for x in items)
        return
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evolsplat-read") as ex:
        pending = deque(ex.submit(fn, x) for x in items[:ahead])
        nxt = len(pending)
        try:
            while pending:
                result = pending.popleft().result()
                if nxt < len(items):  # keep the workers busy while the caller uses this result
                    pending.append(ex.submit(fn, items[nxt]))
                    nxt += 1
                yield result
        finally:  # an exception, or the caller stopped early: drop what has not started
            for p in pending:
                p.cancel()


_FALLBACKS: Tuple[Tuple[str, Dict[str, object]], ...] = (
    ("as configured", {}),
    ("without depth consistency", {"depth_consistency": False, "lidar_free_space": False}),
    ("without sky filter", {"depth_consistency": False, "lidar_free_space": False, "filter_sky": False}),
    ("without boxes", {"depth_consistency": False, "lidar_free_space": False, "filter_sky": False, "use_bbx": False}),
    ("all allowed input frames", {"depth_consistency": False, "lidar_free_space": False, "filter_sky": False,
                                  "use_bbx": False, "sparsity": "full"}),
)


class RGBPointCloudGenerator(abc.ABC):
    """Builds a segment's RGB point cloud (project frame). See the module docstring."""

    name: ClassVar[str] = "abstract"

    def __init__(self, options: Optional[PointCloudOptions] = None, device: Union[str, torch.device, None] = None,
                 **overrides) -> None:
        opts = options if options is not None else PointCloudOptions(generator=self.name)  # type: ignore[arg-type]
        if overrides:
            opts = opts.replace(**overrides)
        if opts.generator != self.name:
            opts = opts.replace(generator=self.name)
        self.options = opts.validate()
        self.device = device
        """The caller's device (e.g. the model's): the torch backend runs there unless ``options.device`` says."""
        self.last_report: Optional[GenerationReport] = None
        self._timer = filters.StageTimes()

    def backend(self) -> Tuple[str, torch.device]:
        """``(backend, device)`` of the work (see :func:`evolsplat_ns.pointcloud.options.resolve_backend`)."""
        return resolve_backend(self.options, self.device)

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
            # colours (and depth-map pixels) are read at the records' size: a scene loaded with another downscale
            # (or intrinsics) builds another cloud
            "images": [[int(r.width), int(r.height), *(round(float(x), 6) for x in np.asarray(r.K).reshape(-1)[:6])]
                       for r in (scene.image(segment.frame_indices[0], c) for c in self.cameras(scene))],
            "segment": {"frames": [int(t) for t in segment.frame_indices],
                        "aabb": [[float(x) for x in v] for v in segment.aabb]},
            "scene": {"name": scene.name, "num_frames": scene.num_frames, **_file_stamps(self._source_files(scene))},
            # every file the cloud may read (size and modification time): changed inputs build a new entry
            "inputs": _stamps_digest(scene.root, self._input_files(scene, segment, input_frames)),
        }

    def _source_files(self, scene: SceneRecord) -> List[Path]:
        tf = scene.metadata.get("transforms") if isinstance(scene.metadata, dict) else None
        return [Path(tf)] if tf else []

    def _input_files(self, scene: SceneRecord, segment: Segment, input_frames: InputFrames = None) -> List[Path]:
        """The per-frame files the cloud may read: of every segment frame allowed as input (the fallbacks may use
        more frames than the sparsity picks), every camera's image, depth map and sky mask."""
        allowed = allowed_predicate(input_frames)
        out: List[Path] = []
        for t in segment.frame_indices:
            if not allowed(t):
                continue
            for r in scene.frame_images(int(t)):
                out += [p for p in (r.image_path, r.depth_path, r.sky_mask_path) if p]
        return out

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
        backend, device = self.backend()
        timer = self._timer = filters.StageTimes(device)
        for stage, changes in _FALLBACKS:
            opts = self.options.replace(**changes)
            frames = self.frames_for(scene, segment, input_frames, opts)
            sig = (tuple(frames), opts.depth_consistency, opts.lidar_free_space, opts.filter_sky, opts.use_bbx)
            if sig in seen:
                continue
            seen.add(sig)
            pts, cols = self._raw(scene, segment, frames, opts, input_frames)
            n_raw = len(pts)
            pts, cols = self._postprocess(scene, segment, frames, pts, cols, opts)
            if len(pts) > 0:
                with timer("subsample"):
                    pts, cols = filters.random_subsample(pts, cols, opts.max_points, opts.seed)
                if tried:
                    logger.warning(
                        "scene %d (%s) segment %d: empty point cloud %s; built it %s (%d points)",
                        scene.scene_id, scene.name, segment.segment_id, " / ".join(tried), stage, len(pts),
                    )
                with timer("to host"):
                    pts = np.ascontiguousarray(_numpy(pts), dtype=np.float32)
                    cols = np.ascontiguousarray(np.clip(_numpy(cols), 0.0, 1.0), dtype=np.float32)
                self.last_report = GenerationReport(scene.name, segment.segment_id, frames, stage, n_raw, len(pts),
                                                    time.perf_counter() - t0, tried, dict(timer.seconds), backend,
                                                    str(device))
                return pts, cols
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
        backend, device = self.backend()
        if backend == "torch":  # crop, outlier removal and down-sampling on the device
            with self._timer("colour"):
                pts = torch.as_tensor(pts).to(device)
                cols = torch.as_tensor(cols).to(device)
        return filters.postprocess(pts, cols, opts, crop, inner, backend=backend, timer=self._timer)

    @abc.abstractmethod
    def _raw(self, scene: SceneRecord, segment: Segment, frames: Sequence[int], opts: PointCloudOptions,
             input_frames: InputFrames) -> Tuple[Union[np.ndarray, torch.Tensor], Union[np.ndarray, torch.Tensor]]:
        """Unfiltered float32 points and colours of ``frames`` (before boxes, outlier removal, subsampling): numpy
        arrays, or tensors on the backend's device."""


def _stamps_digest(root, paths: Sequence[Path]) -> str:
    """One digest of ``[relative path, mtime ns, size]`` of each of ``paths`` (None for a missing file)."""
    import hashlib

    h = hashlib.sha1()
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
            stamp = f"{int(st.st_mtime_ns)}:{int(st.st_size)}"
        except OSError:
            stamp = "missing"
        try:
            name = str(p.relative_to(root))
        except ValueError:
            name = str(p)
        h.update(f"{name}|{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


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
        with self._timer("depth maps"):
            return self._raw_depth(scene, segment, frames, opts)

    def _raw_depth(self, scene, segment, frames, opts):
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
                        mask = _fit(filters.read_mask(rec.sky_mask_path, scene.sky_mask_convention), rec,
                                    rec.sky_mask_path)
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
    points: torch.Tensor, recs: Sequence[ImageRecord], images: Sequence[torch.Tensor],
    sky: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Colour world points by the nearest camera (by distance to its centre) that sees them.

    Args:
        points: ``[N, 3]`` float64 world points (project frame), on the device of the work.
        recs: the cameras (``c2w``, ``K``, ``width``, ``height``, ``center``).
        images: per camera ``[H, W, 3]`` uint8, same device.
        sky: per camera ``[H, W]`` bool (True = sky) or None.

    Returns:
        ``(keep [N] bool, colours [keep.sum(), 3] float32 in [0, 1])``: points seen by no camera are dropped, and so
        are points whose chosen pixel is sky. A point lands on the pixel containing its projection.

    The projection is written out element by element in float64 (no matrix products), so that every device
    computes the same pixels.
    """
    dev = points.device
    n = int(points.shape[0])
    if n == 0 or not recs:
        return torch.zeros(n, dtype=torch.bool, device=dev), torch.zeros((0, 3), dtype=torch.float32, device=dev)
    col, rw, z = filters.project_to_pixels(points, recs)
    x, y, z0 = points[:, 0][None], points[:, 1][None], points[:, 2][None]  # [1, N]
    W = torch.tensor([float(r.width) for r in recs], dtype=torch.float64, device=dev)[:, None]
    H = torch.tensor([float(r.height) for r in recs], dtype=torch.float64, device=dev)[:, None]
    sees = (z > 0) & (col >= 0) & (col < W) & (rw >= 0) & (rw < H)  # [V, N]
    centers = torch.as_tensor(np.stack([np.asarray(r.center, dtype=np.float64) for r in recs]), device=dev)  # [V, 3]
    d2 = (x - centers[:, 0, None]) ** 2 + (y - centers[:, 1, None]) ** 2 + (z0 - centers[:, 2, None]) ** 2
    d2 = torch.where(sees, d2, torch.full_like(d2, torch.inf))
    best = torch.argmin(d2, dim=0)  # [N] the first of equals, as numpy
    keep = sees.any(0)
    colours = torch.zeros((n, 3), dtype=torch.float32, device=dev)
    for vi, img in enumerate(images):
        sel = keep & (best == vi)
        idx = sel.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        flat = rw[vi, idx].to(torch.int64) * int(recs[vi].width) + col[vi, idx].to(torch.int64)
        colours[idx] = img.reshape(-1, 3)[flat].to(torch.float32) / 255.0
        if sky is not None and sky[vi] is not None:
            keep[idx[sky[vi].reshape(-1)[flat]]] = False
    return keep, colours[keep]


class LidarRGBPointCloudGenerator(RGBPointCloudGenerator):
    """LiDAR sweeps of the segment's input frames, coloured by the frame's images (nearest camera that sees the
    point); points seen by no camera are dropped. With ``lidar_free_space``, points that other frames' cameras see
    through (moving cars, pedestrians: :func:`filters.transient_mask`) are dropped too. ``depth_consistency`` and
    ``downscale`` do not apply."""

    name = "lidar"

    def cache_key(self, scene, segment, input_frames=None):
        key = super().cache_key(scene, segment, input_frames)
        key["lidar"] = {"paths": [str(p) if p else None for p in (scene.lidar_paths or [])],
                        "version": str(scene.metadata.get("lidar_version", ""))}
        return key

    def _input_files(self, scene, segment, input_frames=None):
        paths = scene.lidar_paths or []
        sweeps = [paths[int(t)] for t in segment.frame_indices if int(t) < len(paths) and paths[int(t)]]
        return super()._input_files(scene, segment, input_frames) + list(dict.fromkeys(sweeps))

    def _raw(self, scene, segment, frames, opts, input_frames):
        if not frames:
            return _empty()
        load = lidar_loader(scene)
        cams = self.cameras(scene)
        _, device = self.backend()

        def read(t: int):  # in a reader thread: files -> arrays (decoding dominates, and releases the GIL)
            pts = np.asarray(load(int(t)), dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] < 3:
                raise DataValidationError(scene.root, f"lidar frame {t}", "an [M, 3+] array of points", pts.shape)
            pts = pts[:, :3]
            pts = pts[np.all(np.isfinite(pts), axis=1)]
            recs = [scene.image(t, c) for c in cams]
            images = [_sized(_fit(_read_rgb(r.image_path), r, r.image_path), r, r.image_path, "image") for r in recs]
            sky = None
            if opts.filter_sky:
                sky = [filters.sky_from_mask(_sized(_fit(filters.read_mask(r.sky_mask_path, scene.sky_mask_convention),
                                                         r, r.sky_mask_path), r, r.sky_mask_path, "sky mask"),
                                             scene.sky_mask_convention)
                       if r.sky_mask_path is not None else None for r in recs]
            return pts, recs, images, sky

        frames_read = prefetch_ordered(read, frames)
        # torch's OpenMP workers would spin on the cores the reader threads decode on (2-3x slower)
        with torch_threads(1 if device.type == "cpu" and READ_WORKERS > 1 else None):
            return self._colour_all(frames_read, device, self._timer, opts.lidar_free_space)

    @staticmethod
    def _colour_all(frames_read, device, timer, static_only: bool = False):
        """Each frame (as the readers deliver them) onto the device and coloured; with ``static_only`` the points
        that other frames see through are dropped; the frames' points concatenated."""
        pts_all, cols_all, recs_all = [], [], []
        while True:
            with timer("read"):  # what the reader threads have not hidden
                item = next(frames_read, None)
            if item is None:
                break
            pts, recs, images, sky = item
            with timer("colour"):
                p = torch.from_numpy(np.ascontiguousarray(pts)).to(device)
                imgs = [torch.from_numpy(np.ascontiguousarray(im)).to(device) for im in images]
                masks = None if sky is None else [None if m is None else torch.from_numpy(m).to(device) for m in sky]
                keep, cols = colour_points_from_images(p, recs, imgs, masks)
                pts_all.append(p[keep])
                cols_all.append(cols)
                recs_all.append(recs)
        if static_only and pts_all:
            with timer("free space"):
                keeps = filters.transient_mask(pts_all, recs_all)
                pts_all = [p[k] for p, k in zip(pts_all, keeps)]
                cols_all = [c[k] for c, k in zip(cols_all, keeps)]
        with timer("colour"):
            return torch.cat(pts_all).to(torch.float32), torch.cat(cols_all)


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

        # world frame: exact until aligned; a bad file is named (never read as fewer points or zeros)
        pts, cols = read_ply(scene.seed_ply_path, points_dtype=np.float64, field="seed PLY")
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


def make_generator(options: Optional[PointCloudOptions] = None, device: Union[str, torch.device, None] = None,
                   **overrides) -> RGBPointCloudGenerator:
    """The generator named by ``options.generator`` (``depth`` | ``lidar`` | ``seed-ply``); ``device``: the
    caller's device, where the torch backend runs unless ``options.device`` is set."""
    opts = options if options is not None else PointCloudOptions()
    if overrides:
        opts = opts.replace(**overrides)
    opts.validate()
    return GENERATOR_CLASSES[opts.generator](opts, device=device)
