"""Where one rendered view's time goes (B2 workload: KITTI-360 size, 1.05 M seed points), stage by stage.

Times the model's own stages (window features, decode, view cull, background, foreground and dome rasterization),
gsplat's stages for the foreground and the dome (projection, tile intersection, ``rasterize_to_pixels``) at tile
sizes 8 / 16 / 32 with the number of tile intersections and the longest tile list, the whole render under each
combination of the render options (tile size, view cull, TF32, dome shapes, compiled decode, joint composite), and one
train view's forward + backward at tiles 16 and 8; then torch.profiler tables of a render and of a train view.
"..._wall" figures are host wall-clock medians (synchronised), "..._gpu" CUDA-event medians.

Usage (GPU machine): ``python3 benchmarks/profile_view_stages.py [CHECKPOINT]`` (an evolsplat-ff checkpoint with 3
source views, as bench_model.py's ``--weights``); writes ``$OUT/profile_view_{trained,untrained}.json``.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import build_model, render_one, street_points, views  # noqa: E402
from evolsplat_ns.data.batch import SegmentBatch
from evolsplat_ns.model.heads import view_inputs
from evolsplat_ns.model.render import visible_gaussians, render_gaussians
from evolsplat_ns.cameras import world_to_camera
from gsplat import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels, spherical_harmonics

dev = torch.device("cuda")
R = {}
def t(fn, n=20, w=3):
    for _ in range(w): fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); a = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(1000*(time.perf_counter()-a))
    return round(statistics.median(ts), 3)
def ev(fn, n=20, w=3):  # GPU time by events (no host-overhead)
    for _ in range(w): fn()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 3)

torch.manual_seed(0)
pts = street_points(int(1_050_000 / 2.5), 0.1, 0, "cpu").float()
pts = pts[torch.randperm(len(pts))[:1_050_000]].to(dev)
H, W = 376, 1408
batch = SegmentBatch(0, 0, views([1.0, 3.0, 5.0], H, W, dev, 1), views([2.0, 3.7], H, W, dev, 2), True)
ck = sys.argv[1] if len(sys.argv) > 1 else None
model = build_model(dev, pts, weights=Path(ck) if ck else None).eval()
tag = "trained" if ck else "untrained"
with torch.no_grad():
    shared = model.extract_shared(batch)
    tgt = batch.target; c2w, K = tgt.extrinsics[0], tgt.intrinsics[0]
    from evolsplat_ns.model.window_features import sample_window_features, sample_windows
    from evolsplat_ns.model import visibility as visb
    seg = model.segments.current; m0 = seg["means"]; sp = torch.exp(seg["log_scales"][:, 0]); srcv = batch.source
    R["wf_total_wall"] = t(lambda: sample_window_features(m0, srcv.image, srcv.extrinsics, srcv.intrinsics, None, radius=1, spacing=sp))
    R["wf_sample_windows_wall"] = t(lambda: sample_windows(m0, srcv.image, srcv.extrinsics, srcv.intrinsics, 1))
    _, _, uv_, z_ = sample_windows(m0, srcv.image, srcv.extrinsics, srcv.intrinsics, 1)
    cin = (z_ > 1e-6) & (uv_[..., 0] >= 0) & (uv_[..., 0] < W) & (uv_[..., 1] >= 0) & (uv_[..., 1] < H)
    R["wf_visibility_depth_wall"] = t(lambda: visb.visibility_depth(uv_, z_, cin, H, W, srcv.intrinsics, sp))
    R["render_one_wall"] = t(lambda: render_one(model, shared, tgt, 0))
    R["render_one_gpu"] = ev(lambda: render_one(model, shared, tgt, 0))
    f3, means, fw, base = shared.f3, shared.means, shared.fw, shared.base_rgb
    def decode():  # the heads' one-function decode (every point; the render's eager path is the same maths)
        return model.heads.decode(f3, fw, torch.cat(view_inputs(means, c2w[:3, 3]), -1), base, shared.base_log_scale)
    R["decode_wall"] = t(decode); R["decode_gpu"] = ev(decode)
    sc, q, o, sh = decode()
    R["cull_wall"] = t(lambda: visible_gaussians(means, sc, c2w, K, H, W))
    src = shared.source
    bgf = lambda: model.background(shared.ref_c2w, c2w, src.image, src.extrinsics, src.intrinsics, K, H, W)
    R["background_wall"] = t(bgf); R["background_gpu"] = ev(bgf)
    bm, brgb, bsc, bo = bgf()
    bq = torch.zeros(bm.shape[0], 4, device=dev); bq[:, 0] = 1
    R["n_fg"], R["n_bg"] = int(means.shape[0]), int(bm.shape[0])
    R["opacity_mean"] = float(o.mean())
    K3 = K[:3, :3]
    fgr = lambda: render_gaussians(means, q, sc, o, sh, c2w, K3, W, H, sh_degree=1)
    bgr = lambda: render_gaussians(bm, bq, bsc, bo, brgb, c2w, K3, W, H)
    R["fg_raster_wall"] = t(fgr); R["fg_raster_gpu"] = ev(fgr)
    R["bg_raster_wall"] = t(bgr); R["bg_raster_gpu"] = ev(bgr)
    vm = world_to_camera(c2w[None]); Ks = K3[None]
    def stages(m, qq, ss, oo, col, name, tile=16, shd=None):
        proj = lambda: fully_fused_projection(m, None, qq, ss, vm, Ks, W, H, eps2d=0.3)
        R[f"{name}_proj_gpu"] = ev(proj)
        radii, m2d, dep, con, _ = proj()
        R[f"{name}_visible"] = int((radii > 0).sum())
        R[f"{name}_mean_radius"] = float(radii[radii > 0].float().mean())
        if shd is not None:
            dirs = m[None] - c2w[None, None, :3, 3]
            shf = lambda: torch.clamp_min(spherical_harmonics(shd, dirs, col.expand(1, -1, -1, -1), masks=radii > 0) + 0.5, 0)
            R[f"{name}_sh_gpu"] = ev(shf); colors = shf()
        else:
            colors = col[None]
        tw, th = (W + tile - 1) // tile, (H + tile - 1) // tile
        isf = lambda: isect_tiles(m2d, radii, dep, tile, tw, th, n_cameras=1)
        R[f"{name}_isect_t{tile}_wall"] = t(isf); R[f"{name}_isect_t{tile}_gpu"] = ev(isf)
        tpg, iid, fid = isf()
        R[f"{name}_n_isects_t{tile}"] = int(iid.numel())
        off = isect_offset_encode(iid, 1, tw, th)
        op = oo[None]
        rf = lambda: rasterize_to_pixels(m2d, con, colors, op, W, H, tile, off, fid)
        R[f"{name}_r2p_t{tile}_gpu"] = ev(rf)
        cnt = (off.flatten()[1:] - off.flatten()[:-1]).float()
        R[f"{name}_isects_per_tile_max_t{tile}"] = float(cnt.max()) if cnt.numel() else 0
        return m2d, radii, dep, con, colors, op
    for tile in (8, 16, 32):
        fgs = stages(means, q, sc, o, sh, "fg", tile, 1)
        bgs = stages(bm, bq, bsc, bo, brgb, "bg", tile)
    # combined packed rasterization of fg and bg as two "cameras" (exact: the same per-image maths)
    def combined(tile=16):
        m2d = torch.cat([fgs[0][0], bgs[0][0]]); radii = torch.cat([fgs[1][0], bgs[1][0]])
        dep = torch.cat([fgs[2][0], bgs[2][0]]); con = torch.cat([fgs[3][0], bgs[3][0]])
        col = torch.cat([fgs[4][0], bgs[4][0]]); op = torch.cat([fgs[5][0], bgs[5][0]])
        n1, n2 = fgs[0].shape[1], bgs[0].shape[1]
        cam = torch.cat([torch.zeros(n1, dtype=torch.int64, device=dev), torch.ones(n2, dtype=torch.int64, device=dev)])
        gid = torch.cat([torch.arange(n1, device=dev), torch.arange(n2, device=dev)])
        tw, th = (W + tile - 1) // tile, (H + tile - 1) // tile
        _, iid, fid = isect_tiles(m2d, radii, dep, tile, tw, th, packed=True, n_cameras=2, camera_ids=cam, gaussian_ids=gid)
        off = isect_offset_encode(iid, 2, tw, th)
        return rasterize_to_pixels(m2d, con, col, op, W, H, tile, off, fid, packed=True)
    R["combined_isect_r2p_wall"] = t(combined); R["combined_isect_r2p_gpu"] = ev(combined)
    img, al = combined()
    fgo = rasterize_to_pixels(fgs[0], fgs[3], fgs[4], fgs[5], W, H, 16, isect_offset_encode(isect_tiles(fgs[0], fgs[1], fgs[2], 16, 88, 24, n_cameras=1)[1], 1, 88, 24), isect_tiles(fgs[0], fgs[1], fgs[2], 16, 88, 24, n_cameras=1)[2])
    R["combined_vs_separate_fg_maxdiff"] = float((img[0] - fgo[0][0]).abs().max())
    # two streams
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    def streams():
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur); s2.wait_stream(cur)
        with torch.cuda.stream(s1): a = fgr()
        with torch.cuda.stream(s2): b = bgr()
        cur.wait_stream(s1); cur.wait_stream(s2)
        return a, b
    R["two_streams_wall"] = t(streams)
    # whole render variants
    import itertools
    cfg = model.config
    for tile, cull, tf32, fixedbg in itertools.product((16, 8), (True, False), (False, True), (False, True)):
        cfg.raster_tile_size, cfg.view_cull = tile, cull
        torch.backends.cuda.matmul.allow_tf32 = tf32
        cfg.bg_shapes = "fixed" if fixedbg else "compact"
        R[f"render_t{tile}_cull{int(cull)}_tf32{int(tf32)}_fixedbg{int(fixedbg)}"] = t(lambda: render_one(model, shared, tgt, 0))
    cfg.bg_shapes = "auto"
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg.raster_tile_size, cfg.view_cull = 8, True
    for mode in ("fuse", "graphs"):
        cfg.compile_decode = mode
        R[f"render_t8_compiled_{mode}"] = t(lambda: render_one(model, shared, tgt, 0), 20, 8)
    cfg.compile_decode = "off"
    cfg.composite = "joint"; R["render_t8_joint"] = t(lambda: render_one(model, shared, tgt, 0))
    cfg.composite = "separate"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            render_one(model, shared, tgt, 0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
# train per-view fwd+bwd breakdown
model.train()
shared = model.extract_shared(batch)
cut = shared.with_outputs({k: v.detach().requires_grad_(True) for k, v in shared.outputs().items()})
def vstep():
    out = model.render_view(cut, c2w, K, H, W)
    sum(model.view_loss(out, tgt.image[0], 1).values()).backward()
for tile in (16, 8):
    model.config.raster_tile_size = tile
    R[f"train_view_fwd_bwd_t{tile}_wall"] = t(vstep, 10, 3)
R["train_view_fwd_only_wall"] = t(lambda: model.render_view(cut, c2w, K, H, W), 10, 3)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5): vstep()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
print(json.dumps(R, indent=1))
Path(os.environ.get("OUT", "."), f"profile_view_{tag}.json").write_text(json.dumps(R, indent=1))
