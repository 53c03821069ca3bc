"""LiDAR of the real-data layouts: sweeps in the project frame, and sparse depth maps per image.

A :class:`LidarSource` holds one sweep per frame (a file, or ``None`` where the recording lacks it), a reader
(file -> ``[M, 3+]`` points in the sensor's frame), and per frame the sensor-to-world pose (``None`` when the
points are already in world coordinates, as in PandaSet). It provides the two hooks of :class:`SceneRecord`:

- ``metadata["lidar_loader"](frame_index) -> [M, 3]`` points in the project frame (the LiDAR point-cloud
  generator; a missing sweep gives no points, with one warning);
- ``metadata["depth_provider"](image_record) -> [H, W]`` float32 sparse metric z-depth at the record's size:
  the sweep nearest in time to the image (when the layout has timestamps; within ``max_time_offset``), else the
  frame's own sweep, projected into the image keeping the **nearest return per pixel** (0 = no return).

Depth maps are cached on disk (``cache_dir``), one ``.npz`` per image holding the non-zero pixels, keyed by a hash
of everything they depend on (sweep file and its stamp, pose, intrinsics, size, sensor filter); each is written to
a temporary file and renamed into place, so concurrent readers never see half a file. The cache folder is made and
checked when the scene is parsed (:func:`attach`): one that cannot be is an error naming it and
``--pipeline.datamanager.dataparser.lidar-cache-dir``; a write that fails later (a full disk) only warns, and depth
maps are then computed in memory each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from evolsplat_ns.atomic import write_atomic
from evolsplat_ns.cameras import rigid_inverse

logger = logging.getLogger(__name__)

#: Bumped when the depth map computation changes (invalidates the cache).
DEPTH_CACHE_VERSION = 1

SweepReader = Callable[[Path], np.ndarray]


@dataclass
class Sweep:
    path: Optional[Path]
    """The sweep file; ``None`` when the recording lacks it."""
    to_world: Optional[np.ndarray] = None
    """[4, 4] sensor -> data world at the sweep's time; ``None``: points are in world coordinates already."""
    timestamp: Optional[float] = None
    """Seconds, same clock as the camera timestamps."""


def sparse_depth_map(points_cam: np.ndarray, K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest return per pixel of points given in an OpenCV camera frame.

    Args:
        points_cam: ``[N, 3]`` points, camera frame (z forward).
        K: ``[3, 3]`` intrinsics.
    Returns:
        ``[height, width]`` float32 z-depth (0 where no point lands). A point lands on the pixel containing its
        projection (pixel ``(v, u)`` covers ``[u, u+1) x [v, v+1)``, as in :func:`evolsplat_ns.cameras.project_points`).
    """
    depth = np.zeros((height, width), dtype=np.float32)
    if len(points_cam) == 0:
        return depth
    z = points_cam[:, 2]
    front = z > 1e-3
    p, z = points_cam[front], z[front]
    u = (K[0, 0] * p[:, 0] + K[0, 1] * p[:, 1]) / z + K[0, 2]
    v = K[1, 1] * p[:, 1] / z + K[1, 2]
    col, row = np.floor(u), np.floor(v)
    ok = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    flat = row[ok].astype(np.int64) * width + col[ok].astype(np.int64)
    zs = z[ok].astype(np.float32)
    # nearest return per pixel: sort by (pixel, depth) and keep the first entry of each pixel (deterministic;
    # repeated-index assignment order is not guaranteed by numpy)
    order = np.lexsort((zs, flat))
    f, zz = flat[order], zs[order]
    first = np.ones(len(f), dtype=bool)
    first[1:] = f[1:] != f[:-1]
    depth.reshape(-1)[f[first]] = zz[first]
    return depth


class LidarSource:
    """Per-frame sweeps of one scene; see the module docstring."""

    def __init__(
        self,
        scene_name: str,
        sweeps: Sequence[Sweep],
        reader: SweepReader,
        align: np.ndarray,
        cache_dir: Optional[Path] = None,
        max_time_offset: float = 0.06,
        cache_tag: str = "",
        decoded_capacity: int = 4,
    ) -> None:
        self.scene_name = scene_name
        self.sweeps = list(sweeps)
        self.reader = reader
        self.align = np.asarray(align, dtype=np.float64)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_time_offset = float(max_time_offset)
        self.cache_tag = cache_tag
        self._decoded: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._decoded_lock = threading.Lock()  # the point-cloud generator reads sweeps from several threads
        self._capacity = decoded_capacity
        self._warned: set = set()
        self.camera_timestamps: Dict[Tuple[int, int], Optional[float]] = {}
        missing = [i for i, s in enumerate(self.sweeps) if s.path is None]
        if missing:
            logger.warning("scene %s: %d of %d LiDAR sweeps missing (frames %s%s); those frames get no LiDAR points "
                           "and their images no LiDAR depth", scene_name, len(missing), len(self.sweeps),
                           missing[:10], " ..." if len(missing) > 10 else "")

    # ------------------------------------------------------------------------------------------------ sweeps
    @property
    def paths(self) -> List[Optional[Path]]:
        return [s.path for s in self.sweeps]

    def _world_points(self, i: int) -> np.ndarray:
        """[M, 3] float64 points of sweep ``i`` in the project frame (decoded sweeps are kept, a few at a time).
        Thread-safe; sweeps are decoded outside the lock (two threads may decode the same one, to the same result)."""
        with self._decoded_lock:
            if i in self._decoded:
                self._decoded.move_to_end(i)
                return self._decoded[i]
        s = self.sweeps[i]
        pts = np.asarray(self.reader(s.path), dtype=np.float64)[:, :3]
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        T = self.align if s.to_world is None else self.align @ s.to_world
        pts = pts @ T[:3, :3].T + T[:3, 3]
        with self._decoded_lock:
            self._decoded[i] = pts
            while len(self._decoded) > self._capacity:
                self._decoded.popitem(last=False)
        return pts

    def points(self, frame_index: int) -> np.ndarray:
        """``[M, 3]`` points of the frame's sweep in the project frame (the ``lidar_loader`` hook)."""
        if self.sweeps[frame_index].path is None:
            return np.zeros((0, 3))
        return self._world_points(frame_index)

    def sweep_for(self, frame_index: int, camera_id: int) -> Optional[int]:
        """The sweep an image is paired with: nearest in time (within ``max_time_offset``) when both have timestamps,
        else the frame's own sweep; ``None`` when there is none."""
        ts = self.camera_timestamps.get((frame_index, camera_id))
        have_t = [i for i, s in enumerate(self.sweeps) if s.path is not None and s.timestamp is not None]
        if ts is not None and have_t:
            best = min(have_t, key=lambda i: abs(self.sweeps[i].timestamp - ts))  # type: ignore[operator]
            if abs(self.sweeps[best].timestamp - ts) <= self.max_time_offset:  # type: ignore[operator]
                return best
            return None
        return frame_index if self.sweeps[frame_index].path is not None else None

    # ------------------------------------------------------------------------------------------------ depth
    def _key(self, i: int, rec) -> str:
        s = self.sweeps[i]
        st = Path(s.path).stat()
        blob = json.dumps({
            "v": DEPTH_CACHE_VERSION, "tag": self.cache_tag, "sweep": str(s.path), "stamp": [st.st_mtime_ns, st.st_size],
            "to_world": None if s.to_world is None else np.round(s.to_world, 9).tolist(),
            "align": np.round(self.align, 9).tolist(), "c2w": np.round(rec.c2w, 9).tolist(),
            "K": np.round(rec.K, 9).tolist(), "size": [int(rec.width), int(rec.height)],
        }, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:20]

    def depth(self, rec) -> np.ndarray:
        """``[H, W]`` float32 sparse z-depth of an image (the ``depth_provider`` hook); zeros without a sweep."""
        i = self.sweep_for(rec.frame_index, rec.camera_id)
        if i is None:
            key = (rec.frame_index, rec.camera_id)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("scene %s frame %d camera %d: no LiDAR sweep within %.3f s; no depth for this image",
                               self.scene_name, rec.frame_index, rec.camera_id, self.max_time_offset)
            return np.zeros((rec.height, rec.width), dtype=np.float32)
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / self.scene_name / f"{rec.frame_index:05d}_{rec.camera_id}_{self._key(i, rec)}.npz"
            if path.exists():
                try:
                    with np.load(path) as z:
                        d = np.zeros(int(rec.height) * int(rec.width), dtype=np.float32)
                        d[z["index"]] = z["depth"]
                        return d.reshape(int(rec.height), int(rec.width))
                except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                    logger.warning("damaged LiDAR depth cache entry %s; recomputing", path)
        w2c = rigid_inverse(np.asarray(rec.c2w, dtype=np.float64))
        pts = self._world_points(i)
        cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
        d = sparse_depth_map(cam, np.asarray(rec.K, dtype=np.float64), int(rec.width), int(rec.height))
        if path is not None:
            self._write(path, d)
        return d

    def _write(self, path: Path, d: np.ndarray) -> None:
        flat = d.reshape(-1)
        idx = np.flatnonzero(flat)
        try:
            # atomic: readers see the old state or the whole new file
            write_atomic(path, lambda f: np.savez_compressed(f, index=idx.astype(np.int64), depth=flat[idx]))
        except OSError as e:
            if "cache" not in self._warned:
                self._warned.add("cache")
                logger.warning("LiDAR depth cache %s not writable (%s); computing depth in memory", self.cache_dir, e)
            self.cache_dir = None


def attach(scene, source: LidarSource, provide_depth: bool) -> None:
    """Install the source's hooks on a scene (after :func:`build_scene`; poses there are final)."""
    from evolsplat_ns.data.layouts.common import LIDAR_KEY as LIDAR_LOADER_KEY  # == generators.LIDAR_LOADER_KEY
    from evolsplat_ns.data.records import DEPTH_PROVIDER_KEY

    if provide_depth and source.cache_dir is not None:  # at start-up: a cache folder that cannot be made is named now
        from evolsplat_ns.atomic import ensure_folder

        ensure_folder(source.cache_dir, LIDAR_CACHE_OPTION)
    source.camera_timestamps = dict(scene.metadata.get("timestamps", {}))
    scene.lidar_paths = source.paths
    scene.metadata[LIDAR_LOADER_KEY] = source.points
    scene.metadata["lidar_source"] = source
    scene.metadata["lidar_version"] = f"{DEPTH_CACHE_VERSION}:{source.cache_tag}"
    if provide_depth:
        scene.metadata[DEPTH_PROVIDER_KEY] = source.depth


#: The option that moves the LiDAR depth cache (named when its folder cannot be made).
LIDAR_CACHE_OPTION = "--pipeline.datamanager.dataparser.lidar-cache-dir"


def default_cache_dir(options, scene_dir: Path) -> Path:
    if options.lidar_cache_dir is not None:
        return Path(options.lidar_cache_dir)
    root = Path(options.data_root) if options.data_root is not None else Path(scene_dir).parent
    return root / ".evolsplat_cache" / "lidar_depth"


def read_float32_rows(path: Path, columns: int) -> np.ndarray:
    """A ``.bin`` of float32 rows of ``columns`` values -> ``[M, columns]`` (validated: whole rows)."""
    from evolsplat_ns.errors import DataValidationError, error_text

    try:
        raw = np.fromfile(path, dtype=np.float32)
    except OSError as e:
        raise DataValidationError(path, "lidar", f"a readable sweep of float32 rows of {columns} values",
                                  error_text(e)) from None
    if raw.size % columns:
        raise DataValidationError(path, "lidar", f"float32 rows of {columns} values", f"{raw.size} values")
    return raw.reshape(-1, columns)


def check_rows(path: Path, columns: int) -> None:
    """Up-front check of a sweep file's size (whole float32 rows of ``columns``) without reading it."""
    from evolsplat_ns.errors import DataValidationError, error_text

    if path.is_dir():
        raise DataValidationError(path, "lidar", f"a sweep file of float32 rows of {columns} values", "a folder")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataValidationError(path, "lidar", "a readable sweep file", error_text(e)) from None
    if size % (4 * columns):
        raise DataValidationError(path, "lidar", f"float32 rows of {columns} values (file size a multiple of "
                                  f"{4 * columns} bytes)", f"{size} bytes")
