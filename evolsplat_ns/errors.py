"""User errors, in one place: what bad input raises, and how every command reports it.

Errors name the file, the field and what was expected. The ``evolsplat-ns-*`` commands (:func:`run_cli`) and
nerfstudio's own commands running this plugin (:func:`one_line_errors_in_nerfstudio_commands`: ns-train, ns-eval,
ns-viewer, ns-render, ns-export) print a user error as one ``error:`` line on stderr and exit with code 2; anything
else (a bug) keeps its traceback. The lowest layer of the package: it imports nothing of it, so every layer may
raise and report these.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union


class DataValidationError(ValueError):
    """Bad input data. The message names the file, the field and what was expected."""

    def __init__(self, path: Union[str, Path, None], field: Optional[str], expected: str, got: object = None):
        self.path = Path(path) if path is not None else None
        self.field = field
        self.expected = expected
        self.got = got
        where = str(self.path) if self.path is not None else "<data>"
        msg = where
        if field:
            msg += f": field '{field}'"
        msg += f": expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)


def error_text(e: BaseException) -> str:
    """The 'got' part of a user error for a file that could not be read, decoded or written, on one line and without
    the path (the error names it already): 'missing file', 'a folder', 'PermissionError: Permission denied',
    'OSError: image file is truncated'."""
    if isinstance(e, FileNotFoundError):
        return missing_text(e.filename) if isinstance(e.filename, (str, Path)) else "missing file"
    if isinstance(e, IsADirectoryError):
        return "a folder"
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:160]


def missing_text(path: Union[str, Path]) -> str:
    """The 'got' part for a path that does not exist, with what it most likely is instead: 'a broken symbolic link
    to <target>', 'a symbolic link loop', a Windows path ('\\' separators), a path without its extension (a file of
    that name with one exists), else 'missing file'."""
    p = Path(path)
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError:  # a loop (Python < 3.13)
            return "a symbolic link loop"
        except FileNotFoundError:
            return f"a broken symbolic link to {os.readlink(p)}"
        except OSError as e:
            return "a symbolic link loop" if e.errno == errno.ELOOP else f"a symbolic link ({error_text(e)})"
    if "\\" in str(p):
        return "missing file (a Windows path? separate folders with '/')"
    if not p.suffix:
        try:
            near = sorted(q.name for q in p.parent.iterdir() if q.name.startswith(p.name + ".") and q.is_file())
        except OSError:
            near = []
        if near:
            return f"missing file (found {near[0]}: a path without its extension?)"
    return "missing file"


class ConfigError(ValueError):
    """An option, or a combination of options, that cannot work."""


class CheckpointError(DataValidationError):
    """A checkpoint that is missing, truncated, not a PyTorch file, from another method or for another model."""


class EmptyPointCloudError(RuntimeError):
    """A segment's point cloud is empty after every fallback."""


# ------------------------------------------------------------------------------------------------- reporting

T = TypeVar("T")

EXIT_BAD_INPUT = 2


#: Set to 1 to get the full traceback from nerfstudio's own commands (ns-train, ns-eval, ...) on bad input.
VERBOSE_ENV = "EVOLSPLAT_NS_VERBOSE"


def is_user_error(e: BaseException) -> bool:
    """Bad input or options (reported as one line) rather than a bug (reported with its traceback)."""
    return isinstance(e, (DataValidationError, ConfigError, EmptyPointCloudError))


def run_cli(fn: Callable[[], T], verbose: bool) -> T:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - only user errors are caught, the rest is re-raised
        if verbose or not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def nerfstudio_command() -> Optional[str]:
    """The nerfstudio command this process runs ('ns-train', 'nerfstudio.scripts.eval', ...), else None."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if spec_name.startswith("nerfstudio.scripts."):
        return spec_name
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return prog if prog.startswith("ns-") else None


@contextmanager
def one_line_errors_in_nerfstudio_commands() -> Iterator[None]:
    """Inside nerfstudio's own commands (ns-train, ns-eval, ns-viewer, ns-render, ns-export), bad input becomes
    one ``error:`` line on stderr and exit code 2 instead of a traceback (set EVOLSPLAT_NS_VERBOSE=1 to get it).
    Anywhere else (Python, tests, the evolsplat-ns-* commands, which use :func:`run_cli`) the exception passes."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only user errors are converted
        if not is_user_error(e) or nerfstudio_command() is None or os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            raise
        print(f"error: {e}  [{VERBOSE_ENV}=1 shows the traceback]", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
