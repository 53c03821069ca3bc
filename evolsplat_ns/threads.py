"""torch's intra-op thread count, limited for a block of code and restored after.

Used where torch's OpenMP workers get in the way: the CPU colouring of a point cloud runs beside reader threads
(:mod:`evolsplat_ns.pointcloud.generators`), and spconv 2.3.8's CPU convolution is only correct on one thread
(:mod:`evolsplat_ns.model.sparse.spconv_unet`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch


@contextmanager
def torch_threads(n: Optional[int] = 1) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, the previous count restored after (``None``: unchanged)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
