"""Micro-benchmark of the project's sparse U-Net (evolsplat_ns.model.sparse) on a synthetic street.

Times, per iteration (median over ``--iters`` after ``--warmup``):

* ``forward``: the U-Net forward (no autograd graph), with kernel maps rebuilt every time (``no_cache``) and with
  the maps cached across iterations (``cached``: what training does within a segment);
* ``forward_backward``: forward + backward of a scalar loss, same two variants;
* ``build_maps``: building all kernel maps and coordinate hashes of one input (the difference between the two);
* ``voxelize``: points -> voxels;
* ``sample_sparse``: trilinear sampling of the 16-d output at ``--sample-points`` points straight from the voxels
  (hash look-ups of the 8 corners; the stride-1 hash is cached), forward only and forward + backward.

Usage::

    python benchmarks/bench_sparse_unet.py --device cuda --num-voxels 800000 --out outputs/bench.json
    python benchmarks/bench_sparse_unet.py --device cpu --num-voxels 20000      # quick CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evolsplat_ns.model.sparse import (  # noqa: E402
    KernelMapCache,
    SparseTensor,
    SparseUNet,
    sample_volume,
    voxelize,
)


def street_points(num_voxels: int, voxel_size: float, seed: int, device) -> torch.Tensor:
    """Points on a street-like surface set: road (20 m wide), two 8 m facades, parked cars; about
    ``num_voxels`` occupied voxels in total (~3800 voxels per metre of street at 0.1 m)."""
    g = torch.Generator().manual_seed(seed)
    per_m = 3800 * (0.1 / voxel_size) ** 2
    length = max(num_voxels / per_m, 2.0)
    n = int(num_voxels * 2.5)

    def rand(k, lo, hi):
        return torch.rand(k, generator=g, dtype=torch.float64) * (hi - lo) + lo

    parts = []
    k = int(n * 0.5)  # road, gently curved and sloped
    x, y = rand(k, 0, length), rand(k, -10, 10)
    parts.append(torch.stack([x, y, 0.02 * x + 0.1 * torch.sin(x / 7) + rand(k, 0, 0.05)], 1))
    k = int(n * 0.4)  # facades
    x, z = rand(k, 0, length), rand(k, 0, 8)
    side = torch.where(torch.rand(k, generator=g) < 0.5, -10.0, 10.0).double()
    parts.append(torch.stack([x, side + rand(k, -0.05, 0.05), 0.02 * x + z], 1))
    k = n - sum(len(p) for p in parts)  # cars: box surfaces
    cars = max(int(length / 6), 1)
    cx = rand(cars, 0, length)
    cy = torch.where(torch.rand(cars, generator=g) < 0.5, -7.0, 7.0).double()
    j = torch.randint(0, cars, (k,), generator=g)
    local = torch.stack([rand(k, -2.2, 2.2), rand(k, -0.9, 0.9), rand(k, 0, 1.5)], 1)
    face = torch.randint(0, 3, (k,), generator=g)
    ext = torch.tensor([2.2, 0.9, 1.5], dtype=torch.float64)
    snap = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).double()
    local[torch.arange(k), face] = torch.where(face == 2, ext[2] * (snap > 0).double(), ext[face] * snap)
    parts.append(local + torch.stack([cx[j], cy[j], 0.02 * cx[j]], 1))
    return torch.cat(parts).to(device=device, dtype=torch.float32)


def timed(fn, iters: int, warmup: int, device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "mean_ms": statistics.fmean(ts), "min_ms": min(ts),
            "iters": iters}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-voxels", type=int, default=None,
                    help="target occupied voxels (default 800000 on CUDA, 20000 on CPU)")
    ap.add_argument("--voxel-size", type=float, default=0.1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 CUDA / 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3 CUDA / 1 CPU)")
    ap.add_argument("--sample-points", type=int, default=None, help="points sampled (default: number of points)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impl", default="auto", choices=["auto", "gather", "igemm"],
                    help="how the convolutions run (SparseUNet impl: auto = igemm on CUDA, gather elsewhere)")
    ap.add_argument("--out", default="outputs/bench_sparse_unet.json", help="JSON output path")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    nvox = args.num_voxels or (800_000 if cuda else 20_000)
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    pts = street_points(nvox, args.voxel_size, args.seed, device)
    colours = torch.rand(pts.shape[0], 3, device=device)
    res_vox = timed(lambda: voxelize(pts, colours, args.voxel_size), max(1, iters // 2), 1, device)
    vox = voxelize(pts, colours, args.voxel_size)
    feats = vox.feats.to(dtype)
    net = SparseUNet(3, 16, impl=args.impl).to(device=device, dtype=dtype).train()

    cache = KernelMapCache()

    def fwd(use_cache: bool):
        with torch.no_grad():
            return net(SparseTensor(feats, vox.coords, cache=cache if use_cache else KernelMapCache()))

    def fwd_bwd(use_cache: bool):
        y = net(SparseTensor(feats, vox.coords, cache=cache if use_cache else KernelMapCache()))
        y.feats.square().mean().backward()
        return y

    def build():
        c, coords, s = KernelMapCache(), vox.coords, 1
        for _ in range(3):
            c.submanifold(coords, s)
            _, coords, _ = c.downsample(coords, s)
            s *= 2
        c.submanifold(coords, s)
        return c

    fwd_bwd(True)  # fills the cache
    levels = {int(s): int(cache.coords(s).shape[0]) for s in cache.strides()}
    pairs = {f"{k[0]}@{k[1]}": km.num_pairs for k, km in cache._maps.items()}

    results = {}
    for name, fn in [("forward_no_cache", lambda: fwd(False)), ("forward_cached", lambda: fwd(True)),
                     ("forward_backward_no_cache", lambda: fwd_bwd(False)),
                     ("forward_backward_cached", lambda: fwd_bwd(True)), ("build_maps", build)]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = timed(fn, iters, warmup, device)
        if cuda:
            results[name]["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        net.zero_grad(set_to_none=True)
    results["voxelize"] = res_vox

    m = args.sample_points or int(pts.shape[0])
    q = pts[torch.randint(0, pts.shape[0], (m,), device=device)] + 0.03
    vol = fwd(True).feats.detach().requires_grad_(True)
    q = q.to(dtype).requires_grad_(True)
    with torch.no_grad():
        results["sample_sparse_forward"] = timed(lambda: sample_volume(vol, vox, q), iters, warmup, device)

    def sample_fb():
        sample_volume(vol, vox, q).square().mean().backward()

    results["sample_sparse_forward_backward"] = timed(sample_fb, iters, warmup, device)
    results["sample_sparse_forward"]["points"] = m

    report = {
        "benchmark": "sparse_unet",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "impl": args.impl,
        "num_points": int(pts.shape[0]),
        "num_voxels": int(vox.coords.shape[0]),
        "target_voxels": nvox,
        "grid_shape": list(vox.grid_shape),
        "voxels_per_stride": levels,
        "kernel_map_pairs": pairs,
        "results": results,
        "speedup_cached_forward_backward": results["forward_backward_no_cache"]["median_ms"]
        / max(results["forward_backward_cached"]["median_ms"], 1e-9),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: (round(v["median_ms"], 2) if isinstance(v, dict) else v)
                      for k, v in results.items()}, indent=1))
    print(f"voxels={report['num_voxels']} per stride={levels} -> {out}")
    return report


if __name__ == "__main__":
    main()
