"""A held-out scene as a nerfstudio dataset: the views the feed-forward model reads are the training images, the
views it is scored on are the test images (each once, in the evaluation plan's order).

Used by the per-scene optimisation (``evolsplat-ns-infer --finetune-seconds``, :mod:`evolsplat_ns.finetune.run`) and by
the splatfacto comparison (``benchmarks/bench_splatfacto.py``), so that all of them train on the same images and are
scored on the same ones.

Frames. Poses are written in a **normalised project frame** ``x_n = s (x_project - c)``: ``c`` the mean position of
the training cameras, ``s`` one over their largest coordinate offset from ``c`` (nerfstudio's own ``auto_scale_poses``
rule), so that splatfacto's thresholds, which assume a scene of about unit size, mean what they mean for its own
datasets. :class:`NormalisedFrame` moves Gaussians into that frame and back; ``transforms.json`` records it
(``evolsplat_frame``), and the ``evolsplat-ft`` dataparser applies no further transform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class NormalisedFrame:
    """``x_n = scale (x_project - centre)``; Gaussians' log scales shift by ``log scale``."""

    centre: np.ndarray
    scale: float

    @staticmethod
    def of_cameras(positions: np.ndarray) -> "NormalisedFrame":
        centre = positions.mean(0)
        extent = float(np.abs(positions - centre).max()) if len(positions) else 0.0
        return NormalisedFrame(centre, 1.0 / extent if extent > 1e-9 else 1.0)

    def poses(self, c2w: np.ndarray) -> np.ndarray:
        out = np.array(c2w, dtype=np.float64, copy=True)
        out[..., :3, 3] = self.scale * (out[..., :3, 3] - self.centre)
        return out

    def gaussians(self, g: Dict[str, Tensor], inverse: bool = False) -> Dict[str, Tensor]:
        """Move 3DGS parameters (``means``, ``log_scales``; the rest is unchanged by a translation and a uniform
        scale) into the frame, or back with ``inverse``."""
        out = dict(g)
        c = torch.as_tensor(self.centre, dtype=torch.float64, device=g["means"].device)
        m = g["means"].double()
        if inverse:  # back to the project frame, kept in float64 (the caller may move it far from the origin)
            out["means"] = m / self.scale + c
            out["log_scales"] = g["log_scales"] - float(np.log(self.scale))
        else:
            out["means"] = ((m - c) * self.scale).to(g["means"].dtype)
            out["log_scales"] = g["log_scales"] + float(np.log(self.scale))
        return out

    def to_json(self) -> dict:
        return {"centre": [float(x) for x in self.centre], "scale": float(self.scale)}

    @staticmethod
    def from_json(d: dict) -> "NormalisedFrame":
        return NormalisedFrame(np.asarray(d["centre"], dtype=np.float64), float(d["scale"]))


@dataclass
class ExportedScene:
    """What :func:`export_scene` wrote: the dataset folder, its frame, the test images' ground truth (tensors, in
    the test split's order) and the number of training images."""

    path: Path
    frame: NormalisedFrame
    targets: List[Tensor]
    num_train: int


def _save_png(path: Path, img: Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


def export_scene(pipeline, scene_id: int, out: Path, seed_cloud: bool = False,
                 frame: Optional[NormalisedFrame] = None) -> ExportedScene:
    """Write evaluation scene ``scene_id`` of ``pipeline`` (an ``EvolSplatPipeline``) as a nerfstudio dataset in
    ``out``: ``images/``, ``transforms.json`` (OpenGL poses in the normalised frame, ``train_filenames`` = the views
    the evaluation plan's batches read, ``val_filenames`` = ``test_filenames`` = the views they score). With
    ``seed_cloud`` the union of the scene's segment seed clouds is written as ``points.ply`` (``ply_file_path``),
    as a COLMAP cloud would be, for splatfacto's own initialisation. ``frame``: the normalisation to use (default:
    from the training cameras)."""
    from evolsplat_ns.cameras import opencv_to_opengl
    from evolsplat_ns.pointcloud.plyio import write_ply_atomic

    out = Path(out)
    dm, model = pipeline.datamanager, pipeline.ff_model
    train_views, test_views, targets, seen, clouds = [], [], [], set(), []
    for batch in dm.eval_batches():
        if batch.scene_id != scene_id:
            continue
        src, tgt = batch.source, batch.target
        for v in range(len(src)):
            key = (int(src.frame_indices[v]), int(src.cam_indices[v]))
            if key not in seen:
                seen.add(key)
                train_views.append((f"images/src_{key[0]:04d}_{key[1]}.png", src, v))
        for v in range(len(tgt)):  # every scored view, in the plan's order (each is scored once)
            test_views.append((f"images/tgt_{len(test_views):04d}.png", tgt, v))
            targets.append(tgt.image[v].cpu())
        if seed_cloud and batch.segment_id not in [c[0] for c in clouds]:
            pipeline.activate(batch.scene_id, batch.segment_id)
            seg = model.segments.current
            clouds.append((batch.segment_id, seg["means"].cpu().numpy(), seg["colours"].cpu().numpy()))
    if not train_views:
        raise ValueError(f"scene {scene_id} is not an evaluation scene of this pipeline")
    if frame is None:
        frame = NormalisedFrame.of_cameras(np.stack([views.extrinsics[v, :3, 3].double().cpu().numpy()
                                                     for _, views, v in train_views]))
    frames = []
    for name, views, v in train_views + test_views:
        K = views.intrinsics[v].double().cpu().numpy()
        c2w = frame.poses(views.extrinsics[v].double().cpu().numpy())
        _save_png(out / name, views.image[v])
        frames.append({"file_path": name, "transform_matrix": opencv_to_opengl(c2w).tolist(), "fl_x": K[0, 0],
                       "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2], "w": int(views.width), "h": int(views.height)})
    meta = {"camera_model": "OPENCV", "frames": frames, "train_filenames": [n for n, _, _ in train_views],
            "val_filenames": [n for n, _, _ in test_views], "test_filenames": [n for n, _, _ in test_views],
            "evolsplat_frame": frame.to_json()}
    if seed_cloud:
        pts = np.concatenate([c[1] for c in clouds]).astype(np.float64)
        write_ply_atomic(out / "points.ply", frame.scale * (pts - frame.centre), np.concatenate([c[2] for c in clouds]))
        meta["ply_file_path"] = "points.ply"
    (out / "transforms.json").write_text(json.dumps(meta, indent=1))
    return ExportedScene(out, frame, targets, len(train_views))
