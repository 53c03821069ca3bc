"""Checks of a depth map's values: all zero, or NaN / inf (with the fraction of bad pixels reported).

Depth is z along the camera axis in metres; 0 means "unknown" (sky, no LiDAR return) everywhere in the project
(the depth point-cloud generator skips such pixels, the window features treat them as unknown). A NaN or inf
value would instead poison every feature computed from the map, so by default it is an error that names the
file and the fraction of bad pixels; with ``non_finite="unknown"`` such pixels are read as 0 (one warning per
file). A map without a single positive value is always an error: it gives the model nothing.

The dataparser checks every depth map once at start-up (``check_depth_values``, on by default); maps are checked
again when they are decoded, so loaders that bypass the dataparser are covered too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from evolsplat_ns.errors import DataValidationError

logger = logging.getLogger(__name__)

NonFiniteDepth = Literal["error", "unknown"]
NON_FINITE_POLICIES = ("error", "unknown")
#: ``SceneRecord.metadata`` key holding a scene's policy for NaN / inf depth.
NON_FINITE_DEPTH_KEY = "non_finite_depth"


def check_depth_values(depth: np.ndarray, path: Optional[Path], field: Optional[str] = "depth_file_path",
                       non_finite: NonFiniteDepth = "error") -> np.ndarray:
    """Validate a decoded depth map; returns it (NaN / inf replaced by 0 under ``non_finite="unknown"``).

    Raises :class:`DataValidationError` naming ``path`` and ``field`` for NaN / inf values (under ``"error"``,
    with their fraction) and for a map with no positive value ("all zero").
    """
    if non_finite not in NON_FINITE_POLICIES:
        raise DataValidationError(path, "non_finite_depth", f"one of {NON_FINITE_POLICIES}", repr(non_finite))
    finite = np.isfinite(depth)
    n_bad = int(depth.size - np.count_nonzero(finite))
    if n_bad:
        frac = n_bad / max(1, depth.size)
        got = f"{100 * frac:.1f}% NaN/inf ({n_bad} of {depth.size} pixels)"
        if non_finite == "error":
            raise DataValidationError(
                path, field, "finite depth values in metres (0 = unknown; or set non_finite_depth='unknown' to read "
                "NaN/inf as 0)", got)
        logger.warning("%s: %s, read as 0 (unknown depth)", path, got)
        depth = np.where(finite, depth, 0.0).astype(depth.dtype, copy=False)
    if depth.size == 0 or not bool((depth > 0).any()):
        got = "all zero" if depth.size and not bool(np.any(depth)) else "no positive value"
        if n_bad:
            got += " once NaN/inf are read as 0"
        raise DataValidationError(path, field, "a depth map with some positive depth (metres; 0 = unknown)", got)
    return depth


def depth_policy(scene) -> NonFiniteDepth:
    """The NaN / inf policy of a :class:`SceneRecord` (``"error"`` unless its dataparser set another)."""
    return scene.metadata.get(NON_FINITE_DEPTH_KEY, "error") if scene is not None else "error"
