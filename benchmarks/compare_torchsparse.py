"""B5 side by side: our sparse U-Net against torchsparse 2.1 on the same input and the same weights.

Needs torchsparse importable (built from its source on the GPU machine, outside this repository). Checks that
``sparse_backend=torchsparse`` (TorchsparseUNet, loaded with our state dict) gives the same features as ours,
and times both: forward and forward+backward, ours with cached kernel maps and rebuilt, torchsparse as the
reference uses it (maps rebuilt every call).

Usage: ``python benchmarks/compare_torchsparse.py --num-voxels 813000 --out OUT.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import timed  # noqa: E402
from bench_sparse_unet import street_points  # noqa: E402

from evolsplat_ns.model.sparse import KernelMapCache, SparseUNet, TorchsparseUNet, voxelize  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-voxels", type=int, default=813_000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="outputs/compare_torchsparse.json")
    ap.add_argument("--no-tf32", action="store_true", help="torchsparse in full fp32 (it uses TF32 on sm80+)")
    args = ap.parse_args()
    if args.no_tf32:
        import torchsparse.backends

        torchsparse.backends.init()
        torchsparse.backends.allow_tf32 = False
        torchsparse.backends.allow_fp16 = False
    dev = torch.device("cuda")
    torch.manual_seed(0)
    pts = street_points(args.num_voxels, 0.1, 0, "cpu").float().to(dev)
    vox = voxelize(pts, torch.rand(len(pts), 3, device=dev), 0.1)
    ours = SparseUNet(3, 16).to(dev)
    ts = TorchsparseUNet(3, 16).to(dev)
    missing = ts.load_state_dict(ours.state_dict(), strict=True)
    x = vox.tensor()
    cache = KernelMapCache()
    with torch.no_grad():
        a = ours(x, cache=cache).feats
        b = ts(x).feats
    err = (a - b).abs().max().item()
    scale = a.abs().max().item()
    report = {"torchsparse_tf32": not args.no_tf32, "num_voxels": int(vox.coords.shape[0]), "state_dict_load": str(missing),
              "max_abs_diff": err, "max_abs_value": scale, "allclose_1e-3_rel": bool(err <= 1e-3 * max(scale, 1e-6))}

    def fb(model, **kw):
        out = model(x, **kw).feats
        out.square().mean().backward()

    with torch.no_grad():
        report["ours_forward_cached_ms"] = timed(lambda: ours(x, cache=cache), args.iters, 3, dev)["median_ms"]
        report["ours_forward_rebuilt_ms"] = timed(lambda: ours(x, cache=KernelMapCache()), args.iters, 3, dev)["median_ms"]
        report["torchsparse_forward_ms"] = timed(lambda: ts(x), args.iters, 3, dev)["median_ms"]
    report["ours_fwd_bwd_cached_ms"] = timed(lambda: fb(ours, cache=cache), args.iters, 3, dev)["median_ms"]
    report["ours_fwd_bwd_rebuilt_ms"] = timed(lambda: fb(ours, cache=KernelMapCache()), args.iters, 3, dev)["median_ms"]
    report["torchsparse_fwd_bwd_ms"] = timed(lambda: fb(ts), args.iters, 3, dev)["median_ms"]
    for name, m in (("ours", ours), ("torchsparse", ts)):
        torch.cuda.reset_peak_memory_stats()
        fb(m, **({"cache": cache} if name == "ours" else {}))
        report[f"{name}_fwd_bwd_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
