"""Errors raised for bad input: each names the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


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


class ConfigError(ValueError):
    """An option, or a combination of options, that cannot work."""


class CheckpointError(DataValidationError):
    """A checkpoint that is missing, truncated, not a PyTorch file, from another method or for another model."""
