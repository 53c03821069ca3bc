"""Options of the segment point clouds, and which frames feed them.

Frame selection happens in two steps, in this order:

1. **sparsity** (the reference's names), by position ``p`` in the segment's frame list
   (``segment.frame_indices``): ``Drop25`` drops ``p % 4 == 2``, ``Drop50`` keeps ``p % 4 in {0, 1}``,
   ``Drop80`` keeps ``p % 5 == 0``, ``Drop90`` keeps ``p % 10 == 0``, ``full`` keeps every frame;
2. the **input restriction** of the data side (e.g. evaluation scenes hold out their odd timesteps): frames it
   does not allow are removed. They are never read, by any generator, at any fallback stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import AbstractSet, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

SPARSITY_MODES: Tuple[str, ...] = ("Drop25", "Drop50", "Drop80", "Drop90", "full")
GENERATORS: Tuple[str, ...] = ("depth", "lidar", "seed-ply")
BACKENDS: Tuple[str, ...] = ("auto", "torch", "sklearn", "open3d")
NOT_IN_CACHE_KEY: Tuple[str, ...] = ("backend", "device")
"""Options that choose how a cloud is computed, not what it is: every backend gives the same cloud (to float
round-off, tested), so switching backend or device reuses the cache entries."""

Box6 = Tuple[float, float, float, float, float, float]
#: Frames a segment may read as input: ``None`` (all), a set of frame indices, or a predicate ``t -> bool``.
InputFrames = Union[None, AbstractSet[int], Sequence[int], Callable[[int], bool]]


@dataclass
class PointCloudOptions:
    """How a segment's RGB point cloud is built (every field but ``backend`` and ``device`` enters the cache key)."""

    generator: Literal["depth", "lidar", "seed-ply"] = "depth"
    """Source: metric depth maps of the input frames, LiDAR sweeps coloured by the images, or the scene's seed PLY."""
    sparsity: Literal["Drop25", "Drop50", "Drop80", "Drop90", "full"] = "full"
    """Which of the segment's frames feed the cloud (by position in the segment's frame list)."""
    chosen_cam_ids: Optional[Tuple[int, ...]] = None
    """Cameras whose images feed the cloud (None = every camera of the scene)."""
    filter_sky: bool = True
    """Drop pixels (depth) or points (LiDAR) that fall on the sky mask."""
    depth_consistency: bool = True
    """Depth generator: per camera, keep pixels whose reprojected depth agrees with the previous kept frame of the
    same camera (|difference| <= the mean difference); removes moving objects and depth noise."""
    lidar_free_space: bool = False
    """LiDAR generator: drop points that the cameras of most other frames of the segment look through (a free-space
    test, filters.transient_mask): a passing car then leaves no trail of points over the segment. Off by default:
    on PandaSet 002 it makes the seed cloud itself truer (+1.2 dB where it covers the image) but the trained
    feed-forward model worse (-1.8 dB), since with near sources the trail points still serve the cars that are
    there at the target's time (docs/REAL_DATA.md)."""
    downscale: int = 2
    """Depth generator: pixel grid subsampling (the reference uses [::2, ::2])."""
    use_bbx: bool = True
    """Crop to ``crop_aabb`` and treat points inside / outside ``input_aabb`` separately (outlier removal,
    down-sampling). Off: no crop, and the whole cloud gets the inside treatment."""
    crop_aabb: Optional[Box6] = None
    """(xmin, ymin, zmin, xmax, ymax, zmax) in the project frame; points outside are dropped.
    None = the segment's box."""
    input_aabb: Optional[Box6] = None
    """Inner box (project frame). None = the box of the segment's input camera centres, padded by
    ``inner_margin`` along x and z, with the crop box's vertical (y) extent, intersected with the crop box."""
    inner_margin: float = 20.0
    """Horizontal padding (metres) of the default inner box around the input camera centres."""
    outlier_removal: bool = True
    """Statistical outlier removal (open3d's definition) inside and outside the inner box."""
    nb_neighbors_inside: int = 35
    std_ratio_inside: float = 1.5
    nb_neighbors_outside: int = 20
    std_ratio_outside: float = 2.0
    every_k_inside: int = 2
    """Uniform down-sampling inside the inner box: keep every k-th point (1 = keep all)."""
    every_k_outside: int = 5
    """Uniform down-sampling outside the inner box (between the inner and the crop box)."""
    max_points: Optional[int] = None
    """Random subsample (seeded by ``seed``) to at most this many points. None = no cap."""
    seed: int = 0
    seed_ply_ignores_holdout: bool = False
    """Seed-PLY source: allow the scene's PLY although the data side holds out some of the segment's frames (the
    PLY may contain points of held-out frames). Off: such a request is an error."""
    backend: Literal["auto", "torch", "sklearn", "open3d"] = "auto"
    """Neighbour searches (outlier removal, KNN scales) and per-point work (LiDAR colouring, crop, down-sampling).
    'torch': exact grid KNN and tensor ops on ``device``; 'sklearn': scikit-learn's KD-tree and numpy-sized work on
    the CPU; 'open3d': open3d's outlier removal, otherwise as 'sklearn'. 'auto': 'torch' when the device is CUDA,
    else 'open3d' if importable, else 'sklearn'. All give the same cloud and scales (not part of the cache key)."""
    device: Optional[str] = None
    """Device of the 'torch' backend (e.g. 'cuda', 'cuda:1', 'cpu'). None: the caller's (the model's device in
    training and inference), else CUDA when available."""

    def validate(self) -> "PointCloudOptions":
        from evolsplat_ns.errors import ConfigError

        if self.generator not in GENERATORS:
            raise ConfigError(f"point cloud generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.sparsity not in SPARSITY_MODES:
            raise ConfigError(f"sparsity must be one of {SPARSITY_MODES}, got {self.sparsity!r}")
        if self.downscale < 1:
            raise ConfigError(f"downscale must be >= 1, got {self.downscale}")
        if self.every_k_inside < 1 or self.every_k_outside < 1:
            raise ConfigError("every_k_inside and every_k_outside must be >= 1")
        if self.nb_neighbors_inside < 1 or self.nb_neighbors_outside < 1:
            raise ConfigError("nb_neighbors_inside and nb_neighbors_outside must be >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"point cloud backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"point cloud device must be a torch device such as 'cuda' or 'cpu', got "
                                  f"{self.device!r} ({e})") from None
        if self.max_points is not None and self.max_points < 1:
            raise ConfigError(f"max_points must be >= 1 or None, got {self.max_points}")
        for name in ("crop_aabb", "input_aabb"):
            box = getattr(self, name)
            if box is not None:
                b = as_box(box)
                if not np.all(b[1] >= b[0]):
                    raise ConfigError(f"{name} must have min <= max on every axis, got {tuple(box)}")
        return self

    def replace(self, **changes) -> "PointCloudOptions":
        d = asdict(self)
        d.update(changes)
        return PointCloudOptions(**d)

    def to_key(self) -> Dict[str, object]:
        """JSON-able dict of every option that changes the cloud (the cache key's options part)."""
        d = asdict(self)
        for k in NOT_IN_CACHE_KEY:
            d.pop(k)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [float(x) if isinstance(x, float) else x for x in v]
        return d


def resolve_backend(opts: PointCloudOptions, caller_device=None):
    """``(backend, device)`` that builds a cloud: ``backend`` is ``"torch"``, ``"sklearn"`` or ``"open3d"`` (see
    :attr:`PointCloudOptions.backend`), ``device`` the ``torch.device`` of the per-point work (the CPU unless torch).

    The torch backend's device is ``opts.device``, else ``caller_device`` (e.g. the model's), else CUDA when
    available. An explicit ``"open3d"`` that cannot be imported is a :class:`ConfigError`.
    """
    import torch

    from evolsplat_ns.errors import ConfigError
    from evolsplat_ns.pointcloud.plyio import open3d_module

    if opts.device is not None:
        device = torch.device(opts.device)
    elif caller_device is not None:
        device = torch.device(caller_device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = opts.backend
    if name == "auto":
        name = "torch" if device.type == "cuda" else ("open3d" if open3d_module() is not None else "sklearn")
    elif name == "open3d" and open3d_module() is None:
        raise ConfigError("point cloud backend 'open3d': open3d cannot be imported here (use auto, torch or sklearn)")
    if name == "torch" and device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"point cloud device {device} requested, but CUDA is not available")
    return name, (device if name == "torch" else torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------------------------


def sparsity_keeps(position: int, sparsity: str) -> bool:
    """Whether the frame at ``position`` of a segment's frame list is kept by ``sparsity``."""
    p = int(position)
    if sparsity == "full":
        return True
    if sparsity == "Drop25":
        return p % 4 != 2
    if sparsity == "Drop50":
        return p % 4 in (0, 1)
    if sparsity == "Drop80":
        return p % 5 == 0
    if sparsity == "Drop90":
        return p % 10 == 0
    raise ValueError(f"unknown sparsity {sparsity!r}; one of {SPARSITY_MODES}")


def select_sparsity(frames: Sequence[int], sparsity: str) -> List[int]:
    """The frames of ``frames`` kept by ``sparsity`` (by position in ``frames``), order preserved."""
    return [int(t) for p, t in enumerate(frames) if sparsity_keeps(p, sparsity)]


def allowed_predicate(input_frames: InputFrames) -> Callable[[int], bool]:
    """Normalise the data side's input restriction to a predicate ``frame_index -> bool``."""
    if input_frames is None:
        return lambda t: True
    if callable(input_frames):
        return lambda t: bool(input_frames(int(t)))  # type: ignore[operator]
    allowed = {int(t) for t in input_frames}
    return lambda t: int(t) in allowed


def segment_input_frames(frame_indices: Sequence[int], sparsity: str, input_frames: InputFrames = None) -> List[int]:
    """Frames that feed a segment's cloud: sparsity by position in the segment's list, then the restriction."""
    ok = allowed_predicate(input_frames)
    return [t for t in select_sparsity(frame_indices, sparsity) if ok(t)]


def restricted_frames(frame_indices: Sequence[int], input_frames: InputFrames) -> List[int]:
    """Frames of the segment that the restriction forbids (empty when everything is allowed)."""
    ok = allowed_predicate(input_frames)
    return [int(t) for t in frame_indices if not ok(t)]


# ----------------------------------------------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------------------------------------------


def as_box(box) -> np.ndarray:
    """``(lo, hi)`` pair of triples, or a flat 6-tuple -> ``[2, 3]`` float64 array (row 0 = min, row 1 = max)."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape == (6,):
        b = b.reshape(2, 3)
    if b.shape != (2, 3):
        raise ValueError(f"a box is (xmin, ymin, zmin, xmax, ymax, zmax) or (min xyz, max xyz); got shape {b.shape}")
    return b


def box_to_tuple(box: np.ndarray) -> Box6:
    b = as_box(box)
    return tuple(float(x) for x in b.reshape(-1))  # type: ignore[return-value]


def inside_box(points: np.ndarray, box) -> np.ndarray:
    """[N] bool: points inside the closed box."""
    b = as_box(box)
    return np.all((points >= b[0]) & (points <= b[1]), axis=1)


def default_boxes(
    segment_aabb, camera_centers: np.ndarray, opts: PointCloudOptions
) -> Tuple[np.ndarray, np.ndarray]:
    """(crop box, inner box) ``[2, 3]`` each, from the options or derived from the segment (see the options)."""
    crop = as_box(opts.crop_aabb) if opts.crop_aabb is not None else as_box(segment_aabb)
    if opts.input_aabb is not None:
        return crop, as_box(opts.input_aabb)
    centers = np.asarray(camera_centers, dtype=np.float64).reshape(-1, 3)
    if len(centers) == 0:
        return crop, crop.copy()
    inner = np.stack([centers.min(0), centers.max(0)])
    inner[0, [0, 2]] -= opts.inner_margin
    inner[1, [0, 2]] += opts.inner_margin
    inner[:, 1] = crop[:, 1]
    inner[0] = np.maximum(inner[0], crop[0])
    inner[1] = np.minimum(inner[1], crop[1])
    inner[1] = np.maximum(inner[1], inner[0])  # empty intersection -> a degenerate (flat) box
    return crop, inner
