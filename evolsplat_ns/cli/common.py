"""Shared CLI behaviour: bad input is one line on stderr and a non-zero exit, unless --verbose."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from evolsplat_ns.data.errors import ConfigError, DataValidationError

T = TypeVar("T")

EXIT_BAD_INPUT = 2


def run_cli(fn: Callable[[], T], verbose: bool) -> T:
    try:
        return fn()
    except (DataValidationError, ConfigError) as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
