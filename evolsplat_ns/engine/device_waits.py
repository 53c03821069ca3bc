"""Which calls of a piece of code wait for the CUDA device, and from where (torch's sync debug mode).

A call that waits (``.item()``, ``nonzero``, a copy from pageable host memory, ``torch.linalg.inv``'s check) stops
the host from queueing more work until the device has run everything queued so far; in a short training step that
serialises host and device. :func:`device_waits` runs a function with torch's sync debug mode on and returns where
each such call came from. Used by ``benchmarks/profile_finetune_step.py`` and by the GPU test that a fine-tuning step
makes none.
"""

from __future__ import annotations

import collections
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"
"""What torch's sync debug mode says of each synchronising call. Setting the mode also warns ("Synchronization debug
mode is a prototype feature ..."), which is not a synchronising call and must not be counted."""

PROJECT_PARTS = ("nerfstudio", "gsplat", "evolsplat_ns", "torch/optim")
"""Path parts of the frames that name a call's origin (the innermost frames of these packages)."""


def device_waits(fn: Callable[[], object], parts: Sequence[str] = PROJECT_PARTS, depth: int = 3
                 ) -> collections.Counter:
    """Run ``fn()`` with torch's CUDA sync debug mode on; return a Counter of the synchronising calls it made, keyed
    by the innermost ``depth`` frames of their Python stack inside ``parts`` (``"file:line function <- ..."``).
    Other warnings are shown as usual. Needs CUDA."""
    counts: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if any(k in f.filename for k in parts)]
        counts[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:depth])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return counts
