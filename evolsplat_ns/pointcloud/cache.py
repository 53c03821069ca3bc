"""On-disk cache of segment point clouds.

Layout: ``<cache_dir>/<scene name>/<segment_id>-<config hash>.ply`` (project frame, colours as 8-bit RGB). The
default ``cache_dir`` is ``<data root>/.evolsplat_cache`` (a hidden folder: the dataparser ignores it). The hash
covers the generator, every option, the frames used and the frames allowed as input, the segment's frames and box,
and the size / modification time of the scene's ``transforms.json`` (and of its seed PLY for the seed-PLY source):
changing any of them makes a new entry, and switching back reuses the old one.

Hashed inputs also include the size and modification time of every file the cloud may read (the segment's images,
depth maps and sky masks of the frames allowed as input, and its LiDAR sweeps).

**An entry is complete or absent.** An entry is a binary PLY (``x y z`` float32, ``red green blue`` uint8) whose
header carries the SHA-256 of its vertex data. It is written to a temporary file, synced, read back and checked
(size and digest) before ``os.replace`` moves it into place; a write that fails (a full disk) or does not read back
leaves no entry (the run goes on with the cloud in memory, with a warning). Reading checks the file size and the
digest with a strict reader (never open3d, which pads a short file with zeros); an entry that fails is rebuilt with a
warning. Entries get the permissions of any other new file.

The backend that builds a cloud (``PointCloudOptions.backend`` / ``device``: torch on a GPU, scikit-learn or open3d
on the CPU) is not part of the hash: all backends build the same cloud and the same KNN scales (to float round-off
in the scales' last bits; tested), so an entry written by one is valid for the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from evolsplat_ns.atomic import write_atomic
from evolsplat_ns.data.records import SceneRecord
from evolsplat_ns.data.scene_index import Segment
from evolsplat_ns.errors import DataValidationError
from evolsplat_ns.pointcloud.generators import RGBPointCloudGenerator, make_generator
from evolsplat_ns.pointcloud.options import InputFrames, PointCloudOptions
from evolsplat_ns.pointcloud.plyio import check_ply, quantise_colours

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: float32 entries with a content digest; inputs' stamps in the key
DEFAULT_CACHE_DIRNAME = ".evolsplat_cache"


def config_hash(key: dict) -> str:
    """16 hex digits of the SHA-1 of the canonical JSON of ``key``."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **key}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


ENTRY_DIGEST = "evolsplat-cache sha256 "
"""Header comment of a cache entry: the SHA-256 of its vertex data follows."""


class CacheEntryError(ValueError):
    """A cache entry that is not complete (short, padded, altered or not an entry)."""


def _entry_vertices(points: np.ndarray, colours: np.ndarray) -> np.ndarray:
    v = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                     ("blue", "u1")])
    p = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    c = np.clip(np.round(np.asarray(colours, dtype=np.float64).reshape(-1, 3) * 255.0), 0, 255).astype(np.uint8)
    v["x"], v["y"], v["z"] = p[:, 0], p[:, 1], p[:, 2]
    v["red"], v["green"], v["blue"] = c[:, 0], c[:, 1], c[:, 2]
    return v


def read_entry(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(points [N, 3] float32, colours [N, 3] float32)`` of a complete entry; :class:`CacheEntryError` otherwise
    (wrong size for its header, digest mismatch, no digest, unreadable)."""
    from plyfile import PlyData

    path = Path(path)
    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"].data
    except Exception as e:  # noqa: BLE001 - whatever the reader says, the entry is not usable
        raise CacheEntryError(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
    digests = [c[len(ENTRY_DIGEST):].strip() for c in ply.comments if c.startswith(ENTRY_DIGEST)]
    if not digests:
        raise CacheEntryError("no content digest (not written by this cache)")
    expected = _entry_vertices(np.zeros((0, 3)), np.zeros((0, 3))).dtype
    if v.dtype.names != expected.names:
        raise CacheEntryError(f"fields {v.dtype.names}, expected {expected.names}")
    data = np.asarray(v).astype(expected, copy=False)
    try:
        check_ply(path)  # the file exactly as long as its header declares
    except DataValidationError as e:
        raise CacheEntryError(f"{e.got}: not what its header promises ({len(data)} vertices)") from None
    if hashlib.sha256(data.tobytes()).hexdigest() != digests[0]:
        raise CacheEntryError("content does not match its digest")
    pts = np.stack([data["x"], data["y"], data["z"]], axis=1).astype(np.float32)
    cols = (np.stack([data["red"], data["green"], data["blue"]], axis=1).astype(np.float64) / 255.0).astype(np.float32)
    return pts, cols


def write_entry(path: Path, points: np.ndarray, colours: np.ndarray) -> Path:
    """Write an entry atomically, checked by reading it back before it is moved into place (see the module
    docstring); raises (and leaves no entry) if the write fails or the file does not read back exactly."""
    from plyfile import PlyData, PlyElement

    v = _entry_vertices(points, colours)
    digest = hashlib.sha256(v.tobytes()).hexdigest()
    ply = PlyData([PlyElement.describe(v, "vertex")], text=False, byte_order="<", comments=[ENTRY_DIGEST + digest])

    def verify(tmp: Path) -> None:
        pts, _ = read_entry(tmp)  # size and digest
        if len(pts) != len(v):
            raise CacheEntryError(f"{len(pts)} points read back, {len(v)} written")

    return write_atomic(path, ply.write, verify=verify)


@dataclass
class SegmentPointCloud:
    """A segment's cloud and where it came from."""

    scene_id: int
    scene_name: str
    segment_id: int
    points: np.ndarray
    """[N, 3] float32, project frame."""
    colours: np.ndarray
    """[N, 3] float32 in [0, 1]."""
    path: Optional[Path]
    """Cache entry (None when the cache is disabled)."""
    from_cache: bool
    seconds: float
    knn_backend: str = "auto"
    """Backend of :meth:`knn_distance` (``torch`` on ``knn_device``, or ``sklearn``), as the generator resolved it."""
    knn_device: Optional[torch.device] = None

    @property
    def num_points(self) -> int:
        return int(len(self.points))

    def knn_distance(self) -> np.ndarray:
        """``[N]`` mean distance to the 3 nearest neighbours (the initial Gaussian scale), cached beside the entry.

        The KNN is the slow part of initialising a segment on the CPU (~1 s for 300 k points with scikit-learn; the
        torch backend on a GPU takes milliseconds), and it depends only on the cloud, so it is computed once per entry
        and kept in ``<entry>.knn.npy`` (written atomically; a missing, unreadable or mismatched file is recomputed).
        """
        from evolsplat_ns.pointcloud.init import knn_mean_distance

        side = self.path.with_suffix(".knn.npy") if self.path is not None else None
        if side is not None and side.exists():
            try:
                d = np.load(side)
                if d.shape == (self.num_points,) and np.all(np.isfinite(d)):
                    return d
            except Exception:  # noqa: BLE001 - recomputed below
                pass
            logger.warning("KNN cache %s does not match its cloud; recomputing it", side)
        d = knn_mean_distance(self.points, backend=self.knn_backend, device=self.knn_device)
        if side is not None:
            try:
                write_atomic(side, lambda f: np.save(f, d))
            except OSError as e:
                logger.warning("KNN scales not cached (%s: %s)", side, e)
        return d


class PointCloudCache:
    """Segment clouds on disk; see the module docstring.

    Args:
        cache_dir: cache root; default ``<data_root>/.evolsplat_cache``.
        data_root: the data root the scenes were read from; default: each scene folder's parent.
        enabled: False: always generate, never read or write.
    """

    def __init__(self, cache_dir: Union[str, Path, None] = None, data_root: Union[str, Path, None] = None,
                 enabled: bool = True) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.data_root = Path(data_root) if data_root is not None else None
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def check_folder(self, option: str) -> Optional[Path]:
        """At set-up, before any cloud is built: create the cache root (``cache_dir``, else ``<data_root>/``
        ``.evolsplat_cache``) and check that it can be written; a folder that cannot be (a file, a path through a
        file, permissions) is a ``DataValidationError`` naming it and ``option``, the option that moves it. Later
        write failures (a full disk) only warn (:meth:`get`)."""
        from evolsplat_ns.atomic import ensure_folder

        base = self.cache_dir if self.cache_dir is not None else (
            self.data_root / DEFAULT_CACHE_DIRNAME if self.data_root is not None else None)
        return ensure_folder(base, option) if self.enabled and base is not None else None

    def root_for(self, scene: SceneRecord) -> Path:
        if self.cache_dir is not None:
            base = self.cache_dir
        elif self.data_root is not None:
            base = self.data_root / DEFAULT_CACHE_DIRNAME
        else:
            base = Path(scene.root).parent / DEFAULT_CACHE_DIRNAME
        return base / scene.name

    def path_for(self, generator: RGBPointCloudGenerator, scene: SceneRecord, segment: Segment,
                 input_frames: InputFrames = None) -> Path:
        h = config_hash(generator.cache_key(scene, segment, input_frames))
        return self.root_for(scene) / f"{segment.segment_id}-{h}.ply"

    def is_built(self, generator: RGBPointCloudGenerator, scene: SceneRecord, segment: Segment,
                 input_frames: InputFrames = None) -> bool:
        """Whether the segment's entry and its KNN scales are on disk (checked by name only, without reading)."""
        if not self.enabled:
            return False
        path = self.path_for(generator, scene, segment, input_frames)
        return path.exists() and path.with_suffix(".knn.npy").exists()

    def get(self, generator: RGBPointCloudGenerator, scene: SceneRecord, segment: Segment,
            input_frames: InputFrames = None) -> SegmentPointCloud:
        """The segment's cloud: read from the cache, or generated and written to it."""
        t0 = time.perf_counter()
        backend, device = generator.backend()
        knn = {"knn_backend": "torch" if backend == "torch" else "sklearn", "knn_device": device}
        path = self.path_for(generator, scene, segment, input_frames) if self.enabled else None
        if path is not None and path.exists():
            try:
                pts, cols = read_entry(path)
                if len(pts) > 0:
                    self.hits += 1
                    return SegmentPointCloud(scene.scene_id, scene.name, segment.segment_id, pts, cols, path, True,
                                             time.perf_counter() - t0, **knn)
                logger.warning("cache entry %s is empty; rebuilding it", path)
            except (CacheEntryError, OSError) as e:  # never trusted: rebuilt
                logger.warning("cache entry %s is incomplete (%s); rebuilding it", path, e)
            path.with_suffix(".knn.npy").unlink(missing_ok=True)  # scales of the old cloud
        self.misses += 1
        pts, cols = generator.generate_pointcloud(scene, segment, input_frames)
        # what a later run reads back (float32, colours quantised to 8 bits), so that a hit and a miss agree
        pts, cols = np.asarray(pts, dtype=np.float32), quantise_colours(cols)
        if path is not None:
            try:
                write_entry(path, pts, cols)
            except (OSError, CacheEntryError) as e:
                logger.warning("segment cloud not cached (%s: %s); continuing with it in memory", path, e)
                path = None
        return SegmentPointCloud(scene.scene_id, scene.name, segment.segment_id, pts, cols, path, False,
                                 time.perf_counter() - t0, **knn)


def segment_pointcloud(
    scene: SceneRecord,
    segment: Segment,
    options: Optional[PointCloudOptions] = None,
    input_frames: InputFrames = None,
    cache_dir: Union[str, Path, None] = None,
    data_root: Union[str, Path, None] = None,
    use_cache: bool = True,
    device: Union[str, torch.device, None] = None,
) -> SegmentPointCloud:
    """One segment's cloud through the cache (the entry point for model initialisation); ``device``: the caller's
    (the model's) device, where the torch backend works unless ``options.device`` says otherwise."""
    cache = PointCloudCache(cache_dir, data_root, enabled=use_cache)
    return cache.get(make_generator(options, device=device), scene, segment, input_frames)


def progress_bar(description: str, quiet: bool = False, transient: bool = False):
    """A rich progress bar in nerfstudio's style (its console and columns: description, bar, percentage and speed,
    M/N, elapsed, remaining); a silent one when ``quiet``."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    try:
        from nerfstudio.utils.rich_utils import CONSOLE
    except ImportError:  # the console nerfstudio prints to, when it is there
        from rich.console import Console

        CONSOLE = Console(width=120)
    return Progress(
        TextColumn(f"[bold blue]{description}"),
        BarColumn(),
        TaskProgressColumn(show_speed=True),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(elapsed_when_finished=True, compact=True),
        console=CONSOLE,
        disable=quiet,
        transient=transient,
    )


def build_all(
    items: Iterable[Tuple[SceneRecord, Segment, InputFrames]],
    generator: RGBPointCloudGenerator,
    cache: PointCloudCache,
    quiet: bool = False,
    with_knn: bool = True,
    description: Optional[str] = None,
) -> List[SegmentPointCloud]:
    """Build (or read back) the clouds of many segments, and with ``with_knn`` their KNN scales (the other slow part
    of a first-seen segment, cached beside the cloud), with a progress bar and one line per segment."""
    items = list(items)
    out: List[SegmentPointCloud] = []
    progress = progress_bar(description or f"Segment point clouds ({generator.name})", quiet=quiet)
    with progress:
        task = progress.add_task("", total=len(items))
        for scene, segment, input_frames in items:
            t0 = time.perf_counter()
            res = cache.get(generator, scene, segment, input_frames)
            if with_knn:
                res.knn_distance()
                res.seconds = time.perf_counter() - t0
            out.append(res)
            msg = (f"scene {scene.scene_id} ({scene.name}) segment {segment.segment_id}: {res.num_points} points, "
                   f"{res.seconds:.2f} s ({'cache' if res.from_cache else 'built'})")
            if quiet:
                logger.info(msg)
            else:
                logger.debug(msg)
                progress.console.print(msg, soft_wrap=True, highlight=False)
            progress.advance(task)
    return out


def build_missing(
    items: Iterable[Tuple[SceneRecord, Segment, InputFrames]],
    generator: RGBPointCloudGenerator,
    cache: PointCloudCache,
    quiet: bool = False,
    description: Optional[str] = None,
) -> int:
    """:func:`build_all` (with KNN scales) for those of ``items`` that ``cache`` lacks (duplicates once); returns
    how many were built."""
    todo, seen = [], set()
    for scene, segment, input_frames in items:
        key = (scene.scene_id, segment.segment_id)
        if key not in seen and not cache.is_built(generator, scene, segment, input_frames):
            todo.append((scene, segment, input_frames))
        seen.add(key)
    if todo:
        build_all(todo, generator, cache, quiet=quiet, with_knn=True, description=description)
    return len(todo)


def segments_of(index, input_frames: InputFrames = None) -> List[Tuple[SceneRecord, Segment, InputFrames]]:
    """``(scene, segment, input_frames)`` items of a :class:`~evolsplat_ns.data.scene_index.SceneIndex`."""
    return [(index.scene, seg, input_frames) for seg in index.segments]


__all__: Sequence[str] = (
    "CACHE_VERSION", "DEFAULT_CACHE_DIRNAME", "PointCloudCache", "SegmentPointCloud", "build_all", "config_hash",
    "progress_bar", "segment_pointcloud", "segments_of",
)
