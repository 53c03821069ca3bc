"""Side by side: the sparse U-Net on several backends, same input, same weights, equal outputs, timed.

Backends (``--backends``, comma list):

* ``torch``: ours, ``SparseUNet(3, 16, impl="gather")`` (gather / bmm / scatter in PyTorch) - the reference of the
  equality checks;
* ``triton``: ours with the Triton implicit GEMM, ``SparseUNet(3, 16, impl="igemm")`` (the CUDA default of the
  model; skipped where Triton is not importable; on the CPU it needs ``TRITON_INTERPRET=1``);
* ``spconv``: :class:`SpconvUNet` (spconv 2.x; implicit GEMM on its CUDA wheels, native algorithm on its CPU build);
* ``torchsparse``: :class:`TorchsparseUNet` (torchsparse 2.1, CUDA only).

A backend that cannot be imported or built is skipped with the reason (one that fails while running is reported
with its error). Every model is loaded with the state dict of one :class:`SparseUNet` (random BatchNorm statistics
and affine parameters too) and run in training mode, as in training (``--eval``: eval mode). Checked against
``torch``: max abs diff of the forward features and of the gradient w.r.t. the input features of a fixed loss (each
model starts from the same state for the check), and both against ours in float64. In training mode BatchNorm's
backward through the batch statistics of the small coarse levels amplifies float32 rounding: ours float32 vs ours
float64 alone differs by ~1e-3 of the scale (30k voxels) to ~1e-2 (100k), so a float32 gradient counts as equal
when it is as close to the float64 one as ours (float32) is (``--rtol``). Timed (median of ``--iters``):
forward (no graph) and forward + backward; ours with the kernel maps cached across calls and rebuilt in every call,
spconv / torchsparse as their users run them (index building inside every call, their only mode); plus the peak
GPU memory of one forward + backward (absolute, and over what was allocated before the call).

TF32: by default each backend runs at its library's default - torch matmuls in full fp32
(``torch.backends.cuda.matmul.allow_tf32`` defaults to False), torchsparse 2.1 with TF32 on sm80+ (its
``torchsparse.backends.allow_tf32``), spconv 2.3.8 *without* TF32 (``spconv.constants.SPCONV_ALLOW_TF32 = False``,
a module attribute read at every call; there is no ``SPCONV_ALLOW_TF32`` environment variable in 2.3.8).
``--no-tf32`` turns TF32 off everywhere (torch matmul/cudnn, torchsparse, spconv), ``--tf32`` on everywhere.

Usage (GPU machine)::

    python benchmarks/compare_sparse_backends.py --backends torch,triton,spconv,torchsparse --out OUT.json
    python benchmarks/compare_sparse_backends.py --device cpu --num-voxels 3000 --iters 2 --backends torch,spconv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import timed  # noqa: E402
from bench_sparse_unet import street_points  # noqa: E402

from evolsplat_ns.model.sparse import KernelMapCache, SparseTensor, SparseUNet, igemm, voxelize  # noqa: E402

ALL_BACKENDS = ("torch", "triton", "spconv", "torchsparse")
OURS = ("torch", "triton")


def set_tf32(mode: str) -> dict:
    """``mode``: ``default`` (leave every library as is), ``off`` or ``on``. Returns the resulting switches."""
    state = {}
    if mode != "default":
        torch.backends.cuda.matmul.allow_tf32 = mode == "on"
        torch.backends.cudnn.allow_tf32 = mode == "on"
    state["torch_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    try:
        import spconv.constants

        if mode != "default":
            spconv.constants.SPCONV_ALLOW_TF32 = mode == "on"
        state["spconv_allow_tf32"] = bool(spconv.constants.SPCONV_ALLOW_TF32)
    except Exception:  # noqa: BLE001 - spconv not installed
        pass
    try:
        import torchsparse.backends

        torchsparse.backends.init()
        if mode != "default":
            torchsparse.backends.allow_tf32 = mode == "on"
            torchsparse.backends.allow_fp16 = False
        state["torchsparse_allow_tf32"] = bool(torchsparse.backends.allow_tf32)
    except Exception:  # noqa: BLE001 - torchsparse not installed
        pass
    return state


def build(name: str, device: torch.device):
    """``(model, None)`` or ``(None, reason)``."""
    try:
        if name == "torch":
            return SparseUNet(3, 16, impl="gather"), None  # explicit: "auto" picks the Triton path on CUDA
        if name == "triton":
            if not igemm.available():
                return None, "Triton is not importable"
            return SparseUNet(3, 16, impl="igemm"), None
        if name == "spconv":
            import spconv.pytorch  # noqa: F401

            from evolsplat_ns.model.sparse.spconv_unet import SpconvUNet

            return SpconvUNet(3, 16), None
        if name == "torchsparse":
            if device.type != "cuda":
                return None, "torchsparse 2.1 runs on CUDA only"
            import torchsparse  # noqa: F401

            from evolsplat_ns.model.sparse import TorchsparseUNet

            return TorchsparseUNet(3, 16), None
    except Exception as e:  # noqa: BLE001 - reported as the reason
        return None, f"{type(e).__name__}: {e}"
    return None, f"unknown backend {name!r} (expected one of {', '.join(ALL_BACKENDS)})"


def version(name: str) -> str | None:
    try:
        if name == "spconv":
            import spconv

            return spconv.__version__
        if name == "torchsparse":
            import torchsparse

            return getattr(torchsparse, "__version__", "?")
    except Exception:  # noqa: BLE001
        return None
    return None


def reference_weights(seed: int) -> dict:
    """State dict of a :class:`SparseUNet` with random kernels and random BatchNorm statistics / affine parameters."""
    torch.manual_seed(seed)
    ref = SparseUNet(3, 16)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return {k: v.clone() for k, v in ref.state_dict().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-voxels", type=int, default=813_000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=1e-4,
                    help="'equal': forward within rtol of torch's (relative to its max abs value), gradient too or, "
                         "where not, as close to the float64 reference as torch's float32 gradient is (4x + rtol); "
                         "use ~1e-2 with TF32")
    ap.add_argument("--eval", action="store_true", help="eval mode (running statistics) instead of training mode")
    ap.add_argument("--no-fp64-ref", action="store_true", help="skip the float64 reference run of ours")
    ap.add_argument("--out", default="outputs/compare_sparse_backends.json")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--no-tf32", action="store_true", help="TF32 off in every backend (torch, torchsparse, spconv)")
    g.add_argument("--tf32", action="store_true", help="TF32 on in every backend")
    args = ap.parse_args()
    dev = torch.device(args.device)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "torch" not in names:
        names.insert(0, "torch")  # the reference of the equality checks
    tf32 = set_tf32("off" if args.no_tf32 else "on" if args.tf32 else "default")
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(args.seed)
    pts = street_points(args.num_voxels, 0.1, args.seed, "cpu").float().to(dev)
    vox = voxelize(pts, torch.rand(len(pts), 3, device=dev), 0.1)
    coords, feats = vox.coords, vox.feats
    n = int(coords.shape[0])
    head = torch.randn(n, 16, generator=torch.Generator().manual_seed(args.seed + 1)).to(dev)
    state = reference_weights(args.seed)

    report = {
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "num_voxels": n, "iters": args.iters, "tf32": tf32,
        "mode": "eval (BatchNorm running statistics)" if args.eval else "train (BatchNorm batch statistics)",
        "rtol": args.rtol, "backends": {},
    }

    def loss_of(out):
        return (out * head).sum() + 0.5 * out.square().sum()

    def run_ctx(name):
        if name == "spconv" and dev.type == "cpu":
            from evolsplat_ns.threads import torch_threads

            return torch_threads(1)  # spconv 2.3.8's CPU build is racy with more than one torch thread
        return contextlib.nullcontext()

    def out_and_grad(model, f0, **kw):
        """Features and the input-feature gradient of the fixed loss, from the shared state."""
        model.load_state_dict(state, strict=True)
        f = f0.clone().requires_grad_(True)
        out = model(SparseTensor(f, coords, 1, KernelMapCache()), **kw).feats
        loss_of(out).backward()
        model.load_state_dict(state, strict=True)
        model.zero_grad(set_to_none=True)
        return out.detach(), f.grad.detach()

    ref64 = None
    if not args.no_fp64_ref:
        # ours in float64: how far float32 rounding alone takes each backend (training-mode BatchNorm amplifies it)
        m64 = build("torch", dev)[0].to(dev).double().train(not args.eval)
        ref64 = out_and_grad(m64, feats.double(), cache=KernelMapCache())
        del m64

    ref_out = ref_grad = None
    for name in names:
        entry = report["backends"][name] = {}
        model, why = build(name, dev)
        if model is None:
            entry["skipped"] = why
            print(f"[{name}] skipped: {why}", flush=True)
            continue
        if version(name):
            entry["version"] = version(name)
        if name == "spconv":
            entry["algo"] = str(model.conv0.net[0].op.algo)
            entry["note"] = ("index building inside every call, plus one small host read per level (the spatial "
                             "shape that makes the strided output sets equal ours)"
                             + ("; run with 1 torch thread (spconv 2.3.8's CPU race)" if dev.type == "cpu" else ""))
        try:
            model = model.to(dev).train(not args.eval)
            entry["state_dict_load"] = str(model.load_state_dict(state, strict=True))
            ours = name in OURS

            def call(cache=None, f=feats):
                x = SparseTensor(f, coords, 1, KernelMapCache())
                return model(x, cache=cache) if ours else model(x)

            with run_ctx(name):
                # ---- equality (from the shared state)
                out, grad = out_and_grad(model, feats, **({"cache": KernelMapCache()} if ours else {}))
                if name == "torch":
                    ref_out, ref_grad = out, grad
                    report["fwd_scale"], report["grad_scale"] = float(out.abs().max()), float(grad.abs().max())
                if ref_out is not None:
                    entry["fwd_max_abs_diff"] = float((out - ref_out).abs().max())
                    entry["grad_max_abs_diff"] = float((grad - ref_grad).abs().max())
                    entry["fwd_rel_diff"] = entry["fwd_max_abs_diff"] / max(report["fwd_scale"], 1e-12)
                    entry["grad_rel_diff"] = entry["grad_max_abs_diff"] / max(report["grad_scale"], 1e-12)
                    equal = entry["fwd_rel_diff"] <= args.rtol and entry["grad_rel_diff"] <= args.rtol
                    if ref64 is not None:
                        for key, a, b in (("fwd", out, ref64[0]), ("grad", grad, ref64[1])):
                            entry[f"{key}_rel_err_vs_fp64"] = float((a.double() - b).abs().max() / b.abs().max())
                        if name == "torch":
                            report["torch_fp32_grad_rel_err_vs_fp64"] = entry["grad_rel_err_vs_fp64"]
                        equal = equal or (entry["fwd_rel_diff"] <= args.rtol and entry["grad_rel_err_vs_fp64"]
                                          <= 4 * report["torch_fp32_grad_rel_err_vs_fp64"] + args.rtol)
                    entry["equal"] = bool(equal)

                # ---- timing
                def fwd_bwd(cache=None):
                    loss_of(call(cache).feats).backward()

                def median_ms(fn):
                    return timed(fn, args.iters, args.warmup, dev)["median_ms"]

                cache = KernelMapCache()
                with torch.no_grad():
                    if ours:
                        entry["forward_cached_ms"] = median_ms(lambda: call(cache))
                    entry["forward_ms"] = median_ms(lambda: call(KernelMapCache()))
                if ours:
                    entry["fwd_bwd_cached_ms"] = median_ms(lambda: fwd_bwd(cache))
                entry["fwd_bwd_ms"] = median_ms(lambda: fwd_bwd(KernelMapCache()))
                model.zero_grad(set_to_none=True)

                # ---- peak memory of one forward + backward (maps rebuilt; ours also cached)
                if cuda:
                    for key, c in (("", None), ("_cached", cache)) if ours else (("", None),):
                        sync()
                        base = torch.cuda.memory_allocated(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                        fwd_bwd(c if c is not None else KernelMapCache())
                        sync()
                        peak = torch.cuda.max_memory_allocated(dev)
                        entry[f"fwd_bwd{key}_peak_GiB"] = peak / 2**30
                        entry[f"fwd_bwd{key}_peak_extra_GiB"] = (peak - base) / 2**30
                        model.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others' figures
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"[{name}] error: {entry['error']}", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    print(f"\n{report['num_voxels']} voxels on {report['device']}, {report['mode']}, tf32 {report['tf32']}")
    print(f"|diff|: max abs difference from torch (scale: features {report.get('fwd_scale', 0):.3g}, gradient "
          f"{report.get('grad_scale', 0):.3g}); grad~f64: relative error of the input-feature gradient against ours "
          f"in float64; equal: see --rtol ({report['rtol']:g}); peak+: peak GPU memory of one forward + backward "
          "(maps rebuilt) over what was allocated before it")
    cols = ("backend", "fwd ms", "fwd cached", "f+b ms", "f+b cached", "peak+ GiB", "fwd |diff|", "grad |diff|",
            "grad~f64", "equal")
    print("  ".join(f"{c:>11}" for c in cols))
    for name, e in report["backends"].items():
        if "skipped" in e or "error" in e:
            print(f"{name:>11}  " + ("skipped: " + e["skipped"] if "skipped" in e else "error: " + e["error"]))
            continue
        row = (name, f(e.get("forward_ms")), f(e.get("forward_cached_ms")), f(e.get("fwd_bwd_ms")),
               f(e.get("fwd_bwd_cached_ms")), f(e.get("fwd_bwd_peak_extra_GiB"), "{:.2f}"),
               f(e.get("fwd_max_abs_diff"), "{:.1e}"), f(e.get("grad_max_abs_diff"), "{:.1e}"),
               f(e.get("grad_rel_err_vs_fp64"), "{:.1e}"), str(e.get("equal", "-")))
        print("  ".join(f"{c:>11}" for c in row))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
