"""One set of 3D Gaussians for a whole scene out of its segments' feed-forward reconstructions.

Each segment is reconstructed from its default sources (spread over the segment, as the viewer shows it) and
exported as static 3DGS parameters (:meth:`EvolSplatModel.export_gaussians`). The heads decode colour, opacity, scale
and rotation for a viewpoint; a static set needs one: ``bake="middle"`` takes the segment's middle source camera (as
the PLY export does), ``bake="sources"`` the mean over every source camera (SH coefficients, log-scales and
sign-aligned quaternions averaged, opacity averaged after the sigmoid) — :func:`bake_views`.

``bake="windows"`` reconstructs each segment once per near-source window over its time span
(:func:`~evolsplat_ns.data.sampling.source_windows`, each exported for its own middle source camera), as the
per-view renders do for the frames near each window, and keeps for each point the **median** of its opacity over the
windows that kept it, the mean of the rest (:func:`consensus`). Points of a moving car are opaque only in the
windows of the time the car was there (real LiDAR seeds hold the whole trail of a passing car): the median drops
them, where one window's decoding would freeze the car at one time and show it to every view.

Segments overlap (neighbouring windows share keyframes), so the same surface comes out of two or three segments.
**Overlaps:** every Gaussian is kept only from the segment whose centre (the mean of its source camera positions) is
nearest to it: a Voronoi partition of space along the trajectory, so each region comes from the segment that saw it
from nearest. **Background:** the dome of the middle segment
(its far hemisphere, 100 m around that segment's reference camera) is added once, as opaque Gaussians with its
colours as degree-0 SH.

Everything stays in the scene's project frame (``SceneRecord.align``); callers move it
(:mod:`evolsplat_ns.finetune.scene`, :mod:`evolsplat_ns.export.world_frame`).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

KEYS = ("means", "sh", "opacity_logit", "log_scales", "quats")
DOME_OPACITY = 0.99
"""Opacity of the dome Gaussians (the feed-forward dome is opaque; a logit needs a value below 1)."""


def nearest_owner(means: Tensor, centres: Tensor) -> Tensor:
    """``[N]`` index of the nearest of ``centres`` ``[S, 3]`` for each of ``means`` ``[N, 3]`` (ties: the first)."""
    return torch.cdist(means.double(), centres.double()).argmin(dim=1)


def merge_segments(parts: List[Tuple[Dict[str, Tensor], Tensor]]) -> Dict[str, Tensor]:
    """Merge per-segment Gaussians ``(gaussians, centre [3])``: each Gaussian kept only from the segment whose
    centre is nearest to it (see the module docstring). SH are padded with zeros to the largest degree."""
    if not parts:
        raise ValueError("no segments to merge")
    centres = torch.stack([c.reshape(3).double().cpu() for _, c in parts])
    k = max(g["sh"].shape[1] for g, _ in parts)
    out: Dict[str, List[Tensor]] = {key: [] for key in KEYS}
    for s, (g, _) in enumerate(parts):
        keep = nearest_owner(g["means"].detach().cpu(), centres) == s
        for key in KEYS:
            t = g[key].detach().cpu()[keep]
            if key == "sh" and t.shape[1] < k:
                t = torch.cat([t, t.new_zeros(t.shape[0], k - t.shape[1], 3)], 1)
            out[key].append(t)
    return {key: torch.cat(v) for key, v in out.items()}


def dome_gaussians(means: Tensor, rgb: Tensor, scales: Tensor, sh_coeffs: int) -> Dict[str, Tensor]:
    """The background dome (:class:`~evolsplat_ns.model.background.HemisphereBackground` output) as 3DGS
    parameters: isotropic, opacity :data:`DOME_OPACITY`, colour in the degree-0 SH term."""
    from evolsplat_ns.pointcloud.init import rgb_to_sh

    n = means.shape[0]
    sh = torch.zeros(n, sh_coeffs, 3, dtype=means.dtype, device=means.device)
    sh[:, 0] = rgb_to_sh(rgb.clamp(0, 1))
    quats = torch.zeros(n, 4, dtype=means.dtype, device=means.device)
    quats[:, 0] = 1
    logit = torch.logit(torch.tensor(DOME_OPACITY, dtype=means.dtype))
    return {"means": means, "sh": sh, "opacity_logit": torch.full((n,), float(logit), dtype=means.dtype,
                                                                  device=means.device),
            "log_scales": torch.log(scales), "quats": quats}


BAKES = ("middle", "sources", "windows")


def consensus(parts: List[Tuple[Tensor, Dict[str, Tensor]]], num_points: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One static set from several reconstructions of the same segment: ``parts`` are ``(index [M_w], gaussians)``
    with the segment's point index of each exported row (a window keeps the points its sources see). For each point
    kept by at least one window: opacity, the median over those windows (as a probability; of an even count the
    lower middle value, so what half of the times saw is not kept opaque); means, SH, log-scales
    the mean; quaternions the sign-aligned mean (as :func:`bake_views`). Returns (the kept points' indices, sorted;
    their parameters)."""
    W = len(parts)
    ref = parts[0][1]
    dt = ref["means"].dtype
    count = torch.zeros(num_points, dtype=dt)
    opa = torch.full((W, num_points), float("nan"), dtype=dt)
    sums = {k: torch.zeros((num_points,) + tuple(ref[k].shape[1:]), dtype=dt) for k in ("means", "sh", "log_scales")}
    q_sum = torch.zeros(num_points, 4, dtype=dt)
    q_first = torch.zeros(num_points, 4, dtype=dt)
    for w, (idx, g) in enumerate(parts):
        idx = idx.long().cpu()
        new = count[idx] == 0
        count[idx] += 1
        opa[w, idx] = torch.sigmoid(g["opacity_logit"].detach().cpu().to(dt))
        for k in sums:
            sums[k][idx] += g[k].detach().cpu().to(dt)
        q = g["quats"].detach().cpu().to(dt)
        q_first[idx[new]] = q[new]
        q_sum[idx] += _same_hemisphere(q, q_first[idx])
    keep = torch.nonzero(count > 0)[:, 0]
    n = count[keep]
    out = {k: v[keep] / n.reshape((-1,) + (1,) * (v.dim() - 1)) for k, v in sums.items()}
    out["quats"] = _unit(q_sum[keep])
    out["opacity_logit"] = torch.logit(torch.nanmedian(opa[:, keep], dim=0).values.clamp(1e-6, 1 - 1e-6))
    return keep, out


def _same_hemisphere(q: Tensor, ref: Tensor) -> Tensor:
    """``q`` with each row flipped to the hemisphere of the matching row of ``ref`` (q and -q are the same rotation,
    so averages of quaternions are taken after this)."""
    return q * torch.where((q * ref).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(q.dtype)


def _unit(q: Tensor) -> Tensor:
    return q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def bake_views(parts: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """One static set from the same Gaussians decoded for several viewpoints (``parts``, each as
    :meth:`EvolSplatModel.export_gaussians` returns): SH, log-scales averaged; opacity averaged as a probability;
    quaternions averaged after flipping each to the first one's hemisphere (q and -q are the same rotation)."""
    q0 = parts[0]["quats"]
    quats = torch.stack([_same_hemisphere(g["quats"], q0) for g in parts]).mean(0)
    opacity = torch.stack([torch.sigmoid(g["opacity_logit"]) for g in parts]).mean(0).clamp(1e-6, 1 - 1e-6)
    return {"means": parts[0]["means"], "sh": torch.stack([g["sh"] for g in parts]).mean(0),
            "opacity_logit": torch.logit(opacity), "log_scales": torch.stack([g["log_scales"] for g in parts]).mean(0),
            "quats": _unit(quats)}


@torch.no_grad()
def scene_gaussians(pipeline, scene_id: int, bake: str = "middle") -> Tuple[Dict[str, Tensor], Dict[str, float]]:
    """The merged feed-forward Gaussians of scene ``scene_id`` (project frame, CPU tensors) and timings:
    ``seconds`` (reconstructing and exporting every segment, device-synchronised) and the counts. ``bake``: the
    viewpoint(s) the static parameters are decoded for (module docstring)."""
    if bake not in BAKES:
        raise ValueError(f"bake must be one of {BAKES}, got {bake!r}")
    import time

    dm, model = pipeline.datamanager, pipeline.ff_model
    segments = [seg.segment_id for seg in dm.index[scene_id].segments]
    parts, dome = [], None
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i, seg in enumerate(segments):
        batch = dm.eval_batch(scene_id, seg)
        windows = []
        if bake == "windows":  # before the default reconstruction, which stays the display (and gives the dome)
            for wb in dm.window_batches(scene_id, seg):
                ws = pipeline.reconstruct(wb)
                windows.append((torch.nonzero(ws.mask)[:, 0].cpu(), model.export_gaussians(ws)))
        shared = pipeline.reconstruct(batch)
        if bake == "middle":
            g = model.export_gaussians(shared)
        elif bake == "sources":
            g = bake_views([model.export_gaussians(shared, c2w) for c2w in batch.source.extrinsics])
        else:
            _, g = consensus(windows, int(shared.mask.numel()))
        parts.append(({k: v.detach().cpu() for k, v in g.items()}, batch.source.extrinsics[:, :3, 3].mean(0).cpu()))
        if i == len(segments) // 2:
            src = batch.source
            means, rgb, scales, _ = model.background(shared.ref_c2w, shared.ref_c2w, src.image, src.extrinsics,
                                                     src.intrinsics)
            dome = dome_gaussians(means.cpu(), rgb.cpu(), scales.cpu(), g["sh"].shape[1])
    merged = merge_segments(parts)
    num_foreground = int(merged["means"].shape[0])
    if dome is not None:
        merged = {k: torch.cat([merged[k], dome[k].to(merged[k].dtype)]) for k in KEYS}
    sync()
    return merged, {"seconds": time.perf_counter() - t0, "segments": len(segments),
                    "foreground_gaussians": num_foreground, "gaussians": int(merged["means"].shape[0])}
