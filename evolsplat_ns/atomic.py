"""One way to write a file so that readers never see half of it: a temporary file in the same folder, then
``os.replace``. Used by every cache and export that writes through a file object (point-cloud cache entries and KNN
scales, LiDAR depth maps, 3DGS PLY exports).

* The file gets the permissions any new file of the process gets (``0o666`` less the umask), not the ``0o600`` of a
  temporary file.
* The temporary name stays within the file-system's name limit even when the final name is near it.
* ``verify(tmp)`` (optional) checks the written file before it is moved into place: what fails verification never
  becomes visible under ``path``.
* A failed clean-up never hides the error that caused it.

:func:`ensure_folder` checks at start-up that an output or cache folder can be made and written, naming the option
that moves it when it cannot.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union


def _new_file_mode() -> int:
    """``0o666`` less the process umask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and putting it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Union[str, Path], write: Callable[[BinaryIO], None],
                 verify: Optional[Callable[[Path], None]] = None) -> Path:
    """Create ``path``'s folder, call ``write(f)`` on a temporary ``.tmp-<name>.*`` file beside it (flushed and
    synced to disk), ``verify(tmp)`` if given (it raises if the file is not what was meant), and move it into place.
    On any failure the temporary file is removed and the error propagates (the old file, if any, stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name[:64]}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # already gone, or not removable: the first error is the one to report
        raise
    return path


def ensure_folder(path: Union[str, Path], option: str) -> Path:
    """Create the folder ``path`` (and its parents) if needed and check that a file can be written in it — at
    start-up, before any long work. A folder that cannot be made or written (a file in its place or on its path,
    permissions, a read-only disk) is a ``DataValidationError`` naming it and ``option``, the option that moves it."""
    from evolsplat_ns.errors import DataValidationError, error_text

    path = Path(path)
    expected = f"a folder that can be created and written to (choose another with {option})"
    if path.exists() and not path.is_dir():
        raise DataValidationError(path, option, expected, "an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-write-check.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        got = f"a path through the file {blocker}" if blocker is not None else error_text(e)
        raise DataValidationError(path, option, expected, got) from None
    return path
