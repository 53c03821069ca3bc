"""One way to write a file so that readers never see half of it: a temporary file in the same folder, then
``os.replace``. Used by every cache and export that writes through a file object (point-cloud KNN scales, LiDAR
depth maps, 3DGS PLY exports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def write_atomic(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> Path:
    """Create ``path``'s folder, call ``write(f)`` on a temporary ``.tmp-<name>.*`` file beside it, and move it into
    place. On any failure the temporary file is removed and the error propagates (the old file, if any, stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
