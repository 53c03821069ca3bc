"""Small hand-written scenes in the multi-scene root format, for dataparser / data-side tests.

The geometry is trivial (cameras driving along +x of a z-up world, looking forward); tests that need real
geometry use the synthetic generator instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from evolsplat_ns.cameras import opencv_to_opengl


def camera_pose(x: float, yaw_deg: float = 0.0, height: float = 1.6) -> np.ndarray:
    """OpenCV c2w in a z-up world (x forward, y left): camera looking along +x rotated by ``yaw`` to the left."""
    # camera axes in world: z_cam = forward, x_cam = right, y_cam = down
    yaw = np.deg2rad(yaw_deg)
    fwd = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2] = right, down, fwd
    T[:3, 3] = [x, 0.0, height]
    return T


def write_scene(
    scene_dir: Path,
    num_frames: int = 24,
    num_cams: int = 2,
    spacing: float = 1.0,
    size=(16, 24),
    depth: bool = True,
    sky: bool = True,
    seed: int = 0,
    mutate: Optional[callable] = None,
) -> Path:
    """Write a scene; ``mutate(meta)`` may edit the transforms.json dict before it is written."""
    H, W = size
    rng = np.random.default_rng(seed)
    scene_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "depth", "sky_masks"):
        (scene_dir / sub).mkdir(exist_ok=True)
    frames = []
    yaws = [0.0, 50.0, -50.0]
    for t in range(num_frames):
        for c in range(num_cams):
            name = f"{t:03d}_{c}"
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(scene_dir / "images" / f"{name}.png")
            fr = {
                "file_path": f"images/{name}.png",
                "transform_matrix": opencv_to_opengl(camera_pose(t * spacing, yaws[c])).tolist(),
                "camera": c,
                "timestep": t,
            }
            if depth:
                np.save(scene_dir / "depth" / f"{name}.npy", np.full((H, W), 5.0 + c, np.float32))
                fr["depth_file_path"] = f"depth/{name}.npy"
            if sky:
                m = np.zeros((H, W), np.uint8)
                m[: H // 4] = 255
                Image.fromarray(m).save(scene_dir / "sky_masks" / f"{name}.png")
                fr["sky_mask_path"] = f"sky_masks/{name}.png"
            frames.append(fr)
    meta = {"fl_x": W * 0.8, "fl_y": W * 0.8, "cx": W / 2, "cy": H / 2, "w": W, "h": H, "frames": frames}
    if mutate is not None:
        mutate(meta)
    (scene_dir / "transforms.json").write_text(json.dumps(meta))
    return scene_dir


def write_root(root: Path, num_scenes: int = 3, **kw) -> Path:
    for i in range(num_scenes):
        write_scene(root / f"scene_{i:03d}", seed=i, **kw)
    return root


def keyframes_of(sizes):
    """Consecutive keyframes holding ``sizes[i]`` frames each (frame indices from 0)."""
    from evolsplat_ns.data.scene_index import Keyframe

    out, t = [], 0
    for i, n in enumerate(sizes):
        out.append(Keyframe(i, t, t + n))
        t += n
    return out
