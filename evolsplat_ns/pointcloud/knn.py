"""Exact k-nearest-neighbour distances in PyTorch, on the CPU or on CUDA (no extra dependency).

Used for the initial Gaussian scales (mean distance to the 3 nearest other points) and for statistical outlier
removal (mean distance to the ``nb_neighbors`` nearest points, the point itself included). Both need only the
*distances* to the ``k`` nearest points of the cloud itself, for every point of a cloud of up to a few million
points, which a uniform grid answers exactly:

1. **Grid.** Points are binned into cubic cells of size ``h`` and sorted by cell key (x slowest, z fastest), so the
   cells ``z - r .. z + r`` of one (x, y) column are one contiguous range of sorted points.
2. **Candidates.** A point's candidates are the points of the block of ``(2r + 1)^3`` cells around its own cell:
   ``(2r + 1)^2`` column ranges, found by ``searchsorted`` once per occupied cell. Squared distances to every
   candidate are computed in float64 and the ``k`` smallest kept (``topk``).
3. **Exactness check.** Every point nearer than ``b``, the distance from the point to the boundary of its block, is
   a candidate; so the ``k`` distances are exact when the ``k``-th is at most ``b`` (less a round-off margin).
4. **Growing blocks.** A point that fails has an upper bound ``u`` of its ``k``-th distance (the ``k``-th among its
   candidates): it is searched again with the smallest radius ``r > u / h``, which then resolves it; a point with
   fewer than ``k`` candidates doubles its radius. Beyond ``R_MAX`` cells the grid is rebuilt with cells ``R_MAX``
   times larger. Once a block spans the whole cloud the search is brute force, hence exact: the loop always ends.
5. **Bounded memory.** Points are sorted by their number of candidates and processed in chunks of at most
   ``max_entries`` (point, candidate) pairs (on CUDA chosen from the free memory).

The first cell size (about ``k / 4`` points per cell around the average point) and the radius schedule change only
the speed, never the result (on PandaSet LiDAR clouds of 1-2 M points: ~290 candidates per point for k = 35, ~60
for k = 4). Distances are ``sqrt(dx^2 + dy^2 + dz^2)`` in float64, the squares summed in that order, as in
scikit-learn's and open3d's KD-trees: they agree with them, and CUDA with the CPU, to the last bit (torch's CPU
``sqrt`` is not always correctly rounded, so the CPU path takes numpy's); the k nearest are chosen on exact squared
distances.

Why not a library: scikit-learn and open3d are CPU only (and open3d cannot be installed on our GPU machine);
FAISS, pytorch3d's ``knn_points`` and pykeops are large or source-built CUDA dependencies, and brute force over
a million points is 10^12 distances.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

#: (query, candidate) pairs per chunk on the CPU (~100 bytes each at the peak: ~400 MB).
CPU_MAX_ENTRIES = 1 << 22
#: Bounds of the per-chunk pairs on CUDA, where the budget is a share of the free memory.
CUDA_MIN_ENTRIES, CUDA_MAX_ENTRIES = 1 << 20, 1 << 26
_BYTES_PER_ENTRY = 112  # peak temporaries per (query, candidate) pair, with headroom
R_MAX = 8
"""Largest block radius (in cells) on one grid; beyond it the cells grow by this factor (see the module docstring)."""
TARGET_OCCUPANCY = 0.25
"""First grid: about ``TARGET_OCCUPANCY * k`` points per cell around the average point (speed only)."""

ArrayLike = Union[np.ndarray, Tensor]


def _as_points(points: ArrayLike, device: Union[str, torch.device, None]) -> Tensor:
    if isinstance(points, Tensor):
        p = points.detach()
    else:
        p = torch.from_numpy(np.ascontiguousarray(np.asarray(points, dtype=np.float64)))
    if device is not None:
        p = p.to(device)
    return p.to(torch.float64).reshape(-1, 3)


def default_max_entries(device: torch.device) -> int:
    """(query, candidate) pairs per chunk: fixed on the CPU; on CUDA a quarter of the free memory (the driver's free
    memory plus what torch's caching allocator holds unused), within ``CUDA_MIN_ENTRIES .. CUDA_MAX_ENTRIES``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(min(CUDA_MAX_ENTRIES, max(CUDA_MIN_ENTRIES, free // (4 * _BYTES_PER_ENTRY))))
    return CPU_MAX_ENTRIES


class _Grid:
    """Points binned into cubic cells of size ``h`` and sorted by cell key (x slowest, z fastest).

    Cell indices are offset by ``R_MAX`` on every axis and the key space has ``R_MAX`` spare cells above the
    largest index, so that the cells of any block of radius <= ``R_MAX`` have valid, distinct keys, and the cells
    ``(x, y, z - R) .. (x, y, z + R)`` of one column are one contiguous key range (one range of sorted points).
    """

    def __init__(self, p: Tensor, lo: Tensor, h: float, extent: float) -> None:
        h = max(h, extent / float(1 << 20))  # at most 2^20 cells per axis: keys fit in int64
        self.h = h
        self.lo = lo
        self.cell = torch.floor((p - lo) / h).to(torch.int64) + R_MAX  # [N, 3]
        cmax = self.cell.max(0).values
        self.span = int((cmax - R_MAX).max())  # cells spanned by the cloud (on its longest axis) - 1
        dims = cmax + R_MAX + 1
        self.stride = torch.stack([dims[1] * dims[2], dims[2], torch.ones_like(dims[2])])  # [3]
        self.key = (self.cell * self.stride).sum(1)  # [N]
        order = torch.argsort(self.key)
        sp = p[order]
        self.axes = [sp[:, a].contiguous() for a in range(3)]  # sorted points, one contiguous array per axis
        self.ukeys, counts = torch.unique_consecutive(self.key[order], return_counts=True)  # [M]
        self.bounds = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # [M + 1]: cell i = [b_i, b_i+1)
        self._counts = counts

    def mean_occupancy(self) -> float:
        """Points in the own cell, averaged over the points (sum of squared counts / N)."""
        c = self._counts.to(torch.float64)
        return float((c * c).sum() / c.sum())

    def block_ranges(self, cells: Tensor, radius: int):
        """Sorted-point ranges covering the blocks of radius ``radius`` around ``cells`` ``[M', 3]``: one range per
        column of the block, ``start`` and ``count`` ``[M', (2 radius + 1)^2]``."""
        d = torch.arange(-radius, radius + 1, device=cells.device)
        dx, dy = torch.meshgrid(d, d, indexing="ij")
        col = ((cells[:, 0, None] + dx.reshape(1, -1)) * self.stride[0]
               + (cells[:, 1, None] + dy.reshape(1, -1)) * self.stride[1])  # [M', S]
        z = cells[:, 2, None]
        first = torch.searchsorted(self.ukeys, col + (z - radius))
        last = torch.searchsorted(self.ukeys, col + (z + radius), right=True)
        start = self.bounds[first]
        return start, self.bounds[last] - start


def _initial_grid(p: Tensor, lo: Tensor, hi: Tensor, k: int, extent: float) -> _Grid:
    """A grid with about ``TARGET_OCCUPANCY * k`` points per cell around the average point."""
    n = p.shape[0]
    ext = (hi - lo).clamp_min(extent * 1e-3)
    target = max(1.0, TARGET_OCCUPANCY * k)
    h = float((ext.prod() * target / n) ** (1.0 / 3.0))  # uniform in the box
    grid = _Grid(p, lo, h, extent)
    for _ in range(3):  # real clouds are surfaces, denser than the box suggests: refine with the measured occupancy
        occ = grid.mean_occupancy()
        if target / 2 <= occ <= 2 * target:
            break
        h *= min(4.0, max(1.0 / 16.0, math.sqrt(target / occ)))
        grid = _Grid(p, lo, h, extent)
    return grid


def _chunks(lengths: np.ndarray, max_entries: int):
    """Consecutive ranges of queries sorted by ``lengths`` (ascending) with ``count * max length <= max_entries``."""
    q = len(lengths)
    start = 0
    while start < q:
        # largest end with (end - start) * lengths[end - 1] <= max_entries (monotone in end)
        lo, hi = start + 1, q
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - start) * max(1, int(lengths[mid - 1])) <= max_entries:
                lo = mid
            else:
                hi = mid - 1
        yield start, lo
        start = lo


def _block_bound(grid: _Grid, radius: int, queries: Tensor, pq: Tensor) -> Tensor:
    """``[Q]`` distance from each query point to the boundary of its block (every point nearer is in the block)."""
    c = (grid.cell[queries] - R_MAX).to(torch.float64)
    # the block of cells c - radius .. c + radius spans [lo + (c - radius) h, lo + (c + radius + 1) h)
    lo_b = grid.lo + (c - radius) * grid.h
    hi_b = grid.lo + (c + radius + 1) * grid.h
    return torch.minimum(pq - lo_b, hi_b - pq).min(1).values


def _search(p: Tensor, grid: _Grid, radius: int, queries: Tensor, k: int, max_entries: int,
            emit: Callable[[Tensor, Tensor], None]) -> Tuple[Tensor, Tensor]:
    """One level: the points ``queries`` (indices into ``p``) against the blocks of radius ``radius`` around their
    cells. Emits ``(indices, squared distances [Q', k] ascending)`` of the resolved ones; returns the others and
    an upper bound of their squared ``k``-th distance (the ``k``-th among their candidates; inf: fewer than k)."""
    dev = p.device
    covers_all = grid.span <= radius  # every point lies in every block: brute force, exact
    ucells, inv = torch.unique(grid.key[queries], return_inverse=True)
    rep = torch.empty_like(ucells).scatter_(0, inv, queries)  # one query point of each cell
    start, count = grid.block_ranges(grid.cell[rep], radius)  # [Mq, S]
    S = start.shape[1]
    cum = torch.cumsum(count, 1)
    base = start - (cum - count)  # candidate j of a cell, in column s, is sorted point base[s] + j
    qlen = cum[:, -1][inv]
    h = grid.h
    # round-off margin of the exactness bound (cell assignment and bound are both computed in float64)
    margin = 1e-9 * (float(grid.lo.abs().max()) + h * (grid.span + 2 * R_MAX) + 1.0)
    bound = _block_bound(grid, radius, queries, p[queries]) - margin  # [Q] distance to the block's boundary
    later = qlen < k  # fewer than k candidates: cannot resolve here
    deferred = queries[later] if bool(later.any()) else None
    if deferred is not None:
        keep = ~later
        queries, inv, qlen, bound = queries[keep], inv[keep], qlen[keep], bound[keep]
    by_len = torch.argsort(qlen)
    queries, inv, bound = queries[by_len], inv[by_len], bound[by_len]
    lens_host = qlen[by_len].cpu().numpy()
    unresolved = [deferred] if deferred is not None else []
    upper = [] if deferred is None else [torch.full((deferred.numel(),), math.inf, dtype=torch.float64, device=dev)]
    sx, sy, sz = grid.axes
    for a, b in _chunks(lens_host, max_entries):
        qi, ci = queries[a:b], inv[a:b]
        L = max(int(lens_host[b - 1]), 1)
        j = torch.arange(L, device=dev)
        slot = torch.searchsorted(cum[ci], j.expand(b - a, L).contiguous(), right=True)  # [B, L] in 0..S
        valid = slot < S
        slot.clamp_(max=S - 1)
        cand = base[ci].gather(1, slot).add_(j).masked_fill_(~valid, 0)
        del slot
        pq = p[qi]  # [B, 3]
        d2 = (sx[cand] - pq[:, 0:1]).square_()
        d2 += (sy[cand] - pq[:, 1:2]).square_()
        d2 += (sz[cand] - pq[:, 2:3]).square_()
        del cand
        d2.masked_fill_(~valid, math.inf)
        if L < k:
            d2 = torch.cat([d2, d2.new_full((b - a, k - L), math.inf)], 1)
        vals = torch.topk(d2, k, dim=1, largest=False, sorted=True).values  # [B, k]
        del d2
        kth = vals[:, k - 1]
        if covers_all:
            ok = torch.isfinite(kth)
        else:
            bq = bound[a:b]
            ok = (bq > 0) & (kth <= bq * bq)
        if bool(ok.all()):
            emit(qi, vals)
        else:
            emit(qi[ok], vals[ok])
            unresolved.append(qi[~ok])
            upper.append(kth[~ok])
    if not unresolved:
        return queries.new_zeros(0), p.new_zeros(0)
    return torch.cat(unresolved), torch.cat(upper)


def _run(points: ArrayLike, k: int, device, max_entries: Optional[int],
         emit: Callable[[Tensor, Tensor], None]) -> int:
    p = _as_points(points, device)
    n = p.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        return 0
    if k > n:
        raise ValueError(f"k ({k}) exceeds the number of points ({n})")
    budget = int(max_entries) if max_entries is not None else default_max_entries(p.device)
    lo, hi = p.min(0).values, p.max(0).values
    extent = float((hi - lo).max())
    if extent == 0.0:  # every point coincides
        emit(torch.arange(n, device=p.device), p.new_zeros(n, k))
        return n
    grid = _initial_grid(p, lo, hi, k, extent)
    # queries waiting per block radius on the current grid; "coarse": waiting for the next, coarser grid
    waiting: Dict[int, List[Tuple[Tensor, Tensor]]] = {1: [(torch.arange(n, device=p.device), None)]}
    while True:
        coarse: List[Tuple[Tensor, Tensor]] = []
        for radius in range(1, R_MAX + 1):
            items = waiting.pop(radius, [])
            if not items:
                continue
            queries = torch.cat([q for q, _ in items])
            rest, upper = _search(p, grid, radius, queries, k, budget, emit)
            if rest.numel() == 0:
                continue
            # next radius: one that holds the ball of the known upper bound (then the point resolves for sure), at
            # least radius + 1; twice the radius when fewer than k points were found
            nxt = torch.floor(upper.sqrt() / grid.h).add_(1)
            nxt = torch.where(torch.isfinite(upper), nxt, torch.full_like(nxt, 2 * radius))
            nxt = nxt.clamp_(min=radius + 1, max=R_MAX + 1)
            nxt = nxt.to(torch.int64)
            for r in torch.unique(nxt).tolist():
                sel = nxt == r
                (coarse if r > R_MAX else waiting.setdefault(r, [])).append((rest[sel], upper[sel]))
        if not coarse:
            return n
        # cells R_MAX times larger; each point goes to the radius holding its upper bound (>= 2 if unknown, so the
        # bound grows past the R_MAX cells of this grid)
        grid = _Grid(p, lo, grid.h * R_MAX, extent)
        queries = torch.cat([q for q, _ in coarse])
        upper = torch.cat([u for _, u in coarse])
        r0 = torch.floor(upper.sqrt() / grid.h).add_(1)
        r0 = torch.where(torch.isfinite(upper), r0, torch.full_like(r0, 2.0)).clamp_(min=1, max=R_MAX).to(torch.int64)
        waiting = {}
        for r in torch.unique(r0).tolist():
            sel = r0 == r
            waiting.setdefault(r, []).append((queries[sel], upper[sel]))


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root (CUDA's is; torch's CPU one is off by one unit in ~1 % of cases)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.numpy()))
    return x.sqrt()


def knn_distances(points: ArrayLike, k: int, device: Union[str, torch.device, None] = None,
                  max_entries: Optional[int] = None) -> Tensor:
    """``[N, k]`` float64 distances of every point to its ``k`` nearest points of the cloud, ascending, the point
    itself included (column 0 is 0). Exact. ``points`` ``[N, 3]`` (numpy or torch); computed on ``device`` (default:
    the tensor's device, or the CPU for numpy input). ``k`` must be at most N."""
    p = _as_points(points, device)
    out = p.new_zeros(p.shape[0], k)

    def emit(idx, d2):
        out[idx] = _sqrt(d2)

    _run(p, k, None, max_entries, emit)
    return out


def knn_mean_distances(points: ArrayLike, k: int, skip_self: bool, device: Union[str, torch.device, None] = None,
                       max_entries: Optional[int] = None) -> Tensor:
    """``[N]`` float64 mean distance of every point to its ``k`` nearest points: the point itself counted among them
    (``skip_self=False``, open3d's outlier statistic) or not (``skip_self=True``: the ``k`` nearest *other* points;
    of coincident points one zero is dropped, as with scikit-learn's ``kneighbors`` on the fitted points).
    Requires ``k + skip_self <= N``."""
    p = _as_points(points, device)
    kk = k + int(skip_self)
    out = p.new_zeros(p.shape[0])

    def emit(idx, d2):
        d = _sqrt(d2)
        out[idx] = (d[:, 1:] if skip_self else d).mean(1)

    _run(p, kk, None, max_entries, emit)
    return out
