"""Benchmarks B1-B4 of docs/BENCHMARKS.md: the EVolSplat model at KITTI-360 size on a synthetic street.

* B1 reconstruction latency of one segment (shared extraction: window features, volume encoder, offset head), for
  a segment seen for the first time (kernel maps built) and for a known one (maps cached), split by stage;
* B2 rendering speed of a reconstructed segment: per view, heads + foreground + background rasterization;
* B3 train-step time against the number of target views T: ours (shared extraction once, cut graph) versus
  recomputing the shared extraction per view (the design document's origin code);
* B4 peak GPU memory of a train step with sparse versus dense volume sampling, on the KITTI-360 and Waymo boxes.

Usage (GPU machine): ``python benchmarks/bench_model.py --out $OUT/bench_model.json``
Quick CPU check: ``python benchmarks/bench_model.py --device cpu --points 20000 --height 94 --width 352 --quick``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sparse_unet import street_points  # noqa: E402

from evolsplat_ns.data.batch import SegmentBatch, Views  # noqa: E402
from evolsplat_ns.model.heads import view_inputs  # noqa: E402
from evolsplat_ns.pipeline.multiview_backward import multiview_backward  # noqa: E402

# Boxes of the reference (OpenCV camera frame: x right, y down, z forward), re-expressed in the benchmark's
# street frame (x forward, y left, z up, camera at 1.6 m).
KITTI_BOX = (-20.0, -16.0, 1.6 - 3.8, 60.0, 16.0, 1.6 + 9.0)
WAYMO_BOX = (-20.0, -25.0, 1.6 - 4.8, 80.0, 25.0, 1.6 + 20.0)


def cam(x: float, device) -> torch.Tensor:
    """OpenCV c2w of a camera at (x, 0, 1.6) looking along +x (street frame: y left, z up)."""
    T = torch.eye(4)
    T[:3, 0] = torch.tensor([0.0, -1.0, 0.0])  # right
    T[:3, 1] = torch.tensor([0.0, 0.0, -1.0])  # down
    T[:3, 2] = torch.tensor([1.0, 0.0, 0.0])  # forward
    T[:3, 3] = torch.tensor([x, 0.0, 1.6])
    return T.to(device)


def views(xs, H, W, device, seed) -> Views:
    g = torch.Generator().manual_seed(seed)
    n = len(xs)
    K = torch.eye(4)
    K[0, 0] = K[1, 1] = 552.0 * W / 1408
    K[0, 2], K[1, 2] = W / 2, H / 2
    return Views(
        image=torch.rand(n, H, W, 3, generator=g).to(device),
        extrinsics=torch.stack([cam(x, device) for x in xs]),
        intrinsics=K.to(device).expand(n, 4, 4).clone(),
        depth=(torch.rand(n, H, W, generator=g) * 40 + 2).to(device),
        frame_indices=torch.arange(n, device=device),
        cam_indices=torch.zeros(n, dtype=torch.long, device=device),
        keyframe_indices=torch.arange(n, device=device),
    )


def load_weights(model, checkpoint: Path) -> dict:
    """The network weights (U-Net, heads, background) of an evolsplat-ff checkpoint with 3 source views, so that
    the benchmark pays what a trained model pays (untrained heads give every point opacity ~0.5: no pixel stops
    early in the rasterizer). Segment states are not loaded: the benchmark's own segment is the workload."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["pipeline"]
    sd = {}
    for k, v in state.items():
        if k.startswith("_model.") and not k.endswith("segments._extra_state"):
            sd[k[len("_model."):].removeprefix("module.")] = v
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("segments._extra_state")]
    if missing or unexpected:
        raise SystemExit(f"error: {checkpoint}: weights of another model configuration (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); train with 3 source views (one camera) and default options")
    return {"checkpoint": str(checkpoint), "step": int(torch.load(checkpoint, map_location="cpu",
                                                                  weights_only=True)["step"])}


def build_model(device, points, volume_sampling="sparse", volume_aabb=None, bg_points=700 * 700, weights=None,
                sparse_conv_impl="auto"):
    from nerfstudio.data.scene_box import SceneBox

    from evolsplat_ns.model.evolsplat import EvolSplatModelConfig
    from evolsplat_ns.pointcloud.init import init_gaussians

    cfg = EvolSplatModelConfig(num_source_views=3, volume_sampling=volume_sampling, volume_aabb=volume_aabb,
                               bg_num_points=bg_points, sparse_conv_impl=sparse_conv_impl)
    model = cfg.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1,
                      metadata={"num_source_views": 3}).to(device)
    g = init_gaussians(points.cpu().float().numpy(), torch.rand(len(points), 3).numpy(), sh_degree=1, seed=0,
                       device=device)
    state = {k: g[k] for k in ("means", "colours", "log_scales", "offset")}
    model.segments.activate(0, 0, lambda: state)
    if weights is not None:
        load_weights(model, weights)
    return model


def timed(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(1000 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "iters": iters}


def stages(model, batch, device, fresh: bool):
    """One shared extraction (the model's own ``extract_shared``), timed per stage through its ``stage`` hook."""
    out = {}

    @contextlib.contextmanager
    def stage(name):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize()
        key = "unet" + ("_with_kernel_maps" if fresh else "_cached_maps") if name == "unet" else name
        out[key] = 1000 * (time.perf_counter() - t0)

    if fresh:
        model.segments.clear_caches()
    with torch.no_grad():
        shared = model.extract_shared(batch, stage=stage)
    out["total"] = sum(out.values())
    out["num_points"] = int(model.segments.current["means"].shape[0])
    out["num_kept"] = shared.num_gaussians
    out["num_voxels"] = int(model.segments.get_cache("voxels").coords.shape[0])
    return out


def render_one(model, shared, tgt, v):
    return model.render_view(shared, tgt.extrinsics[v], tgt.intrinsics[v], tgt.height, tgt.width)


def train_step(model, batch, mode: str):
    tgt = batch.target
    T = len(tgt)
    model.zero_grad(set_to_none=True)
    if mode == "ours":
        shared = model.extract_shared(batch)

        def loss(leaves, v):
            o = model.render_view(shared.with_outputs(leaves), tgt.extrinsics[v], tgt.intrinsics[v], tgt.height, tgt.width)
            return sum(model.view_loss(o, tgt.image[v], 1).values())

        multiview_backward(shared.outputs(), loss, T)
    else:  # recompute the shared extraction for every view (the origin code's way)
        for v in range(T):
            shared = model.extract_shared(batch)
            o = render_one(model, shared, tgt, v)
            (sum(model.view_loss(o, tgt.image[v], 1).values()) / T).backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=1_050_000, help="seed points of the segment")
    ap.add_argument("--height", type=int, default=376)
    ap.add_argument("--width", type=int, default=1408)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, T in {1, 3}, no B4")
    ap.add_argument("--out", default="outputs/bench_model.json")
    ap.add_argument("--weights", type=Path, default=None,
                    help="an evolsplat-ff checkpoint (3 source views) whose network weights are measured")
    ap.add_argument("--sparse-conv-impl", default="auto", choices=["auto", "gather", "igemm"],
                    help="how the U-Net's convolutions run (model option sparse_conv_impl)")
    ap.add_argument("--parts", nargs="+", default=["b1", "b2", "b3", "b4"], choices=["b1", "b2", "b3", "b4"],
                    help="which benchmarks to run (B1 always builds the segment the others use)")
    args = ap.parse_args()
    device = torch.device(args.device)
    iters, warm = (2, 1) if args.quick else (args.iters, 2)
    torch.manual_seed(0)
    # street_points gives ~num_voxels occupied voxels from 2.5x as many points; aim at --points points
    pts = street_points(int(args.points / 2.5), 0.1, 0, "cpu").float()
    pts = pts[torch.randperm(len(pts))[: args.points]].to(device)
    H, W = args.height, args.width
    batch = SegmentBatch(0, 0, views([1.0, 3.0, 5.0], H, W, device, 1),
                         views([1.5, 2.0, 2.5, 3.5, 4.0, 4.5, 5.5, 6.0, 6.5, 2.2, 3.7, 5.2], H, W, device, 2),
                         True)
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "image": [H, W], "source_views": 3,
              "sparse_conv_impl": args.sparse_conv_impl}
    model = build_model(device, pts, bg_points=700 * 700 if not args.quick else 20000,
                        sparse_conv_impl=args.sparse_conv_impl)
    report["weights"] = load_weights(model, args.weights) if args.weights else "untrained (random initialisation)"
    model.train()

    # B1: reconstruction (shared extraction), first time (kernel maps built) and cached
    b1 = {"first_time": [stages(model, batch, device, fresh=True) for _ in range(max(iters // 2, 1))],
          "cached": [stages(model, batch, device, fresh=False) for _ in range(iters)]}
    b1_sum = {}
    for k, rows in b1.items():
        b1_sum[k] = {name: statistics.median(r[name] for r in rows) for name in rows[0]}
    with torch.no_grad():
        model.segments.clear_caches()
        first = timed(lambda: (model.segments.clear_caches(), model.extract_shared(batch)), max(iters // 2, 1), 1, device)
        cached = timed(lambda: model.extract_shared(batch), iters, warm, device)
        from evolsplat_ns.model.sparse import kernel_map

        dense_cells, kernel_map.DENSE_TABLE_CELLS = kernel_map.DENSE_TABLE_CELLS, 0  # the sorted-keys hash
        first_sorted = timed(lambda: (model.segments.clear_caches(), model.extract_shared(batch)),
                             max(iters // 2, 1), 1, device)
        kernel_map.DENSE_TABLE_CELLS = dense_cells
        first_pt = cached_pt = None
        if device.type == "cuda" and model.config.fused_kernel_maps:  # the PyTorch twin of the fused kernel maps
            model.config.fused_kernel_maps = False
            first_pt = timed(lambda: (model.segments.clear_caches(), model.extract_shared(batch)),
                             max(iters // 2, 1), 1, device)
            cached_pt = timed(lambda: model.extract_shared(batch), iters, warm, device)
            model.config.fused_kernel_maps = True
        model.segments.clear_caches()
    # B1 in inference (eval mode, the model option reuse_volume): a known segment reconstructed from other source
    # views each time (two source batches in turn), so only what depends on the sources is recomputed
    other = SegmentBatch(0, 0, views([1.5, 3.5, 5.5], H, W, device, 3), batch.target, True)
    model.eval()
    with torch.no_grad():
        model.segments.clear_caches()
        inf_first = timed(lambda: (model.segments.clear_caches(), model.extract_shared(batch)),
                          max(iters // 2, 1), 1, device)
        turn = itertools.cycle([other, batch])
        inf_known = timed(lambda: model.extract_shared(next(turn)), iters, warm, device)
        inf_stages = [stages(model, b, device, fresh=False) for b in (other, batch) * max(iters // 2, 1)]
        model.segments.clear_caches()
    model.train()
    report["B1_reconstruction"] = {"stages_median_ms": b1_sum, "extract_shared_first_time": first,
                                   "extract_shared_cached": cached,
                                   "extract_shared_first_time_sorted_key_hash": first_sorted,
                                   "extract_shared_first_time_pytorch_kernel_maps": first_pt,
                                   "extract_shared_cached_pytorch_kernel_maps": cached_pt,
                                   "inference_first_time": inf_first,
                                   "inference_known_segment_other_sources": inf_known,
                                   "inference_known_segment_stages_median_ms": {
                                       name: statistics.median(r.get(name, 0.0) for r in inf_stages)
                                       for name in sorted({k for r in inf_stages for k in r})}}
    print("B1", json.dumps(report["B1_reconstruction"], indent=1), flush=True)

    # B7's "per segment" cost outside the network: initial Gaussians of a 300 k-point segment (the demo's cap),
    # with the KNN scales computed (first use of a cloud) or read from the point-cloud cache's side file.
    from evolsplat_ns.pointcloud.init import init_gaussians, knn_mean_distance

    p300 = pts[:300_000].cpu().numpy()
    c300 = torch.rand(len(p300), 3).numpy()
    t0 = time.perf_counter()
    knn = knn_mean_distance(p300)
    knn_s = time.perf_counter() - t0
    init_cached = timed(lambda: init_gaussians(p300, c300, seed=0, device=device, knn_distance=knn), 3, 1, device)
    report["segment_init_300k"] = {"knn_seconds": knn_s, "init_with_cached_knn_ms": init_cached["median_ms"]}
    print("init", report["segment_init_300k"], flush=True)

    if "b2" in args.parts:
        report["B2_render"] = bench_b2(model, batch, device, iters, warm)
    if "b3" in args.parts:
        report["B3_train_step"] = bench_b3(model, batch, device, iters, args.quick)
    if device.type == "cuda" and not args.quick and "b4" in args.parts:
        del model  # B4 measures peaks with only its own model resident
        report["B4_memory"] = bench_b4(batch, pts, device, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print("wrote", out)


def bench_b2(model, batch, device, iters, warm):
    """B2: rendering one more view of the reconstructed segment, per render path (default first)."""
    model.eval()
    variants = {"default": {}, "no_view_cull": {"view_cull": False}, "joint_composite": {"composite": "joint"},
                "tile_16": {"raster_tile_size": 16}, "float32_render": {"render_tf32": False},
                "bg_compact": {"bg_shapes": "compact"},
                "previous_path": {"raster_tile_size": 16, "render_tf32": False, "bg_shapes": "compact"}}
    if device.type == "cuda":  # compiled decode (torch.compile; fused kernels, then also CUDA graphs)
        variants.update(compiled_fuse={"compile_decode": "fuse"}, compiled_graphs={"compile_decode": "graphs"})
    b2 = {}
    cfg = model.config
    defaults = {"view_cull": cfg.view_cull, "composite": cfg.composite, "compile_decode": cfg.compile_decode,
                "raster_tile_size": cfg.raster_tile_size, "bg_shapes": cfg.bg_shapes, "render_tf32": cfg.render_tf32}
    with torch.no_grad():
        shared = model.extract_shared(batch)
        tgt = batch.target
        for name, over in variants.items():
            for k, v in {**defaults, **over}.items():
                setattr(cfg, k, v)
            warmup = warm + (5 if "compile_decode" in over else 0)  # compile, record the graph
            t_first = time.perf_counter()
            r = timed(lambda: render_one(model, shared, tgt, 0), iters * 3, warmup, device)
            if "compile_decode" in over:
                r["first_calls_s"] = time.perf_counter() - t_first - r["median_ms"] * iters * 3 / 1000
            r["fps"] = 1000.0 / r["median_ms"]
            b2[name] = r
            print("B2", name, r, flush=True)
        for k, v in defaults.items():
            setattr(cfg, k, v)
        from evolsplat_ns.model.render import visible_gaussians

        v0 = visible_gaussians(shared.means, torch.exp(shared.base_log_scale), tgt.extrinsics[0],
                               tgt.intrinsics[0], tgt.height, tgt.width)
        _, _, opa = model.heads.predict_geometry(shared.f3, torch.cat(view_inputs(shared.means,
                                                                                  tgt.extrinsics[0][:3, 3]), -1))
        opa = torch.sigmoid(opa)
        if opa.numel():  # the heads' opacities for this view: ~0.5 everywhere when untrained
            b2["opacity"] = {"mean": float(opa.mean()), "fraction_above_0.9": float((opa > 0.9).float().mean()),
                             "fraction_below_0.05": float((opa < 0.05).float().mean())}
    b2["num_gaussians"] = shared.num_gaussians
    b2["num_in_view_bound"] = int(v0.numel())
    model.train()
    return b2


def bench_b3(model, batch, device, iters, quick):
    """B3: train step against the number of target views."""
    b3 = {}
    for T in ([1, 3] if quick else [1, 3, 6, 12]):
        b = SegmentBatch(0, 0, batch.source, Views(*(getattr(batch.target, f)[:T] for f in
                                                   ("image", "extrinsics", "intrinsics", "depth", "frame_indices",
                                                    "cam_indices", "keyframe_indices"))), False)
        ours = timed(lambda: train_step(model, b, "ours"), max(iters // 2, 1), 1, device)
        rec = timed(lambda: train_step(model, b, "recompute"), max(iters // 2, 1), 1, device)
        b3[T] = {"ours_ms": ours["median_ms"], "recompute_ms": rec["median_ms"],
                 "speedup": rec["median_ms"] / ours["median_ms"]}
        print("B3", T, b3[T], flush=True)
    return b3


def bench_b4(batch, pts, device, args):
    """B4: peak memory of a train step (T = 1), sparse vs dense sampling, over the reference boxes."""
    b4 = {}
    one = SegmentBatch(0, 0, batch.source, Views(*(getattr(batch.target, f)[:1] for f in
                                                 ("image", "extrinsics", "intrinsics", "depth", "frame_indices",
                                                  "cam_indices", "keyframe_indices"))), False)
    model = None
    for box_name, box in (("kitti360", KITTI_BOX), ("waymo", WAYMO_BOX)):
        for mode in ("sparse", "dense"):
            del model
            torch.cuda.empty_cache()
            model = build_model(device, pts, volume_sampling=mode, volume_aabb=box, weights=args.weights,
                                sparse_conv_impl=args.sparse_conv_impl)
            model.train()
            train_step(model, one, "ours")  # warm (kernel maps)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            train_step(model, one, "ours")
            torch.cuda.synchronize()
            b4[f"{box_name}_{mode}"] = {"peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
                                        "peak_over_resident_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30}
            print("B4", box_name, mode, b4[f"{box_name}_{mode}"], flush=True)
    for box_name in ("kitti360", "waymo"):
        b4[f"{box_name}_sparse_over_dense"] = b4[f"{box_name}_sparse"]["peak_GiB"] / b4[f"{box_name}_dense"]["peak_GiB"]
    return b4


if __name__ == "__main__":
    main()
