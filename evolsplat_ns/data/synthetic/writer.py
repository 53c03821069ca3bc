"""Write synthetic scenes in the multi-scene root format (docs/DATA_FORMAT.md).

Each scene is written into a hidden temporary folder (``.scene_XXX.partial-PID``, ignored by the dataparser,
``transforms.json`` written last) and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np
from PIL import Image

from evolsplat_ns.cameras import opencv_to_opengl
from evolsplat_ns.data.synthetic.scene import SyntheticScene, make_scene

#: Seed point cloud size per scene (fewer if the scene has fewer non-sky pixels).
SEED_POINTS = 40000

WORLD_FRAME = "metres; z up, ground at z=0; x along the street (driving direction), y to the left"


def image_name(t: int, cam: int) -> str:
    return f"{t:03d}_{cam}"


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Binary little-endian PLY with float x, y, z and uchar red, green, blue."""
    from plyfile import PlyData, PlyElement

    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    v = np.empty(len(xyz), dtype=fields)
    v["x"], v["y"], v["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    v["red"], v["green"], v["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    PlyData([PlyElement.describe(v, "vertex")], text=False, byte_order="<").write(str(path))


def _write_scene_files(scene: SyntheticScene, folder: Path, on_image: Optional[Callable[[], None]]) -> dict:
    for sub in ("images", "depth", "sky_masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    T, C = scene.num_frames, scene.num_cameras
    rng = np.random.default_rng([scene.seed, scene.index, 7])
    per_image = int(np.ceil(SEED_POINTS / (T * C)))
    K = scene.K
    frames = []
    pts, cols = [], []
    sky_px = 0
    dmin, dmax = np.inf, 0.0
    for t in range(T):
        for c in range(C):
            name = image_name(t, c)
            res = scene.render(t, c)
            Image.fromarray(res.rgb).save(folder / "images" / f"{name}.png")
            np.save(folder / "depth" / f"{name}.npy", res.depth)
            Image.fromarray(np.where(res.sky, 255, 0).astype(np.uint8)).save(folder / "sky_masks" / f"{name}.png")
            c2w = scene.c2w[t, c]
            frames.append(
                {
                    "file_path": f"images/{name}.png",
                    "transform_matrix": opencv_to_opengl(c2w).tolist(),
                    "camera": c,
                    "timestep": t,
                    "depth_file_path": f"depth/{name}.npy",
                    "sky_mask_path": f"sky_masks/{name}.png",
                }
            )
            # seed points: unproject a random subset of the (float32) depth map, as the data side would
            v, u = np.nonzero(~res.sky)
            sky_px += int(res.sky.sum())
            if len(v):
                dd = res.depth[v, u]
                dmin, dmax = min(dmin, float(dd.min())), max(dmax, float(dd.max()))
                pick = rng.choice(len(v), size=min(per_image, len(v)), replace=False)
                v, u = v[pick], u[pick]
                z = res.depth[v, u].astype(np.float64)
                y = (v + 0.5 - K[1, 2]) / K[1, 1]
                x = (u + 0.5 - K[0, 2] - K[0, 1] * y) / K[0, 0]
                cam = np.stack([x * z, y * z, z], axis=-1)
                pts.append(cam @ c2w[:3, :3].T + c2w[:3, 3])
                cols.append(res.rgb[v, u])
            if on_image is not None:
                on_image()
    xyz = np.concatenate(pts) if pts else np.zeros((0, 3))
    rgb = np.concatenate(cols) if cols else np.zeros((0, 3), dtype=np.uint8)
    if len(xyz) > SEED_POINTS:
        keep = np.sort(rng.choice(len(xyz), size=SEED_POINTS, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    write_ply(folder / "seed.ply", xyz, rgb)
    meta = {
        "camera_model": "PINHOLE",
        "fl_x": float(K[0, 0]),
        "fl_y": float(K[1, 1]),
        "cx": float(K[0, 2]),
        "cy": float(K[1, 2]),
        "w": int(scene.width),
        "h": int(scene.height),
        "camera_names": list(scene.camera_names),
        "sky_mask_convention": "255_is_sky",
        "ply_file_path": "seed.ply",
        "synthetic": {
            "generator": "evolsplat-ns-synth",
            "seed": scene.seed,
            "scene_index": scene.index,
            "world_frame": WORLD_FRAME,
            **scene.params,
        },
        "frames": frames,
    }
    # transforms.json last: a folder without it is never taken for a scene
    (folder / "transforms.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return {
        "seed_points": int(len(xyz)),
        "sky_fraction": sky_px / float(T * C * scene.width * scene.height),
        "depth_range": (dmin if np.isfinite(dmin) else 0.0, dmax),
    }


def write_scene(
    scene: SyntheticScene, out_dir: Union[str, Path], on_image: Optional[Callable[[], None]] = None
) -> tuple:
    """Render and write ``scene`` to ``out_dir / scene.name`` atomically. Returns ``(path, stats)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / scene.name
    tmp = out_dir / f".{scene.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        stats = _write_scene_files(scene, tmp, on_image)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = out_dir / f".{scene.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final, stats


def _make_and_write(seed, i, height, width, num_frames, num_cameras, out_dir, on_image=None):
    """Render and write scene ``i`` (a top-level function so that worker processes can run it)."""
    t0 = time.perf_counter()
    scene = make_scene(seed, i, height=height, width=width, num_frames=num_frames, num_cameras=num_cameras)
    path, st = write_scene(scene, out_dir, on_image=on_image or (lambda: None))
    return path, st, scene.name, scene.params, time.perf_counter() - t0


def generate_scenes(
    out_dir: Union[str, Path],
    num_scenes: int,
    seed: int,
    height: int,
    width: int,
    num_frames: int = 40,
    num_cameras: int = 3,
    quiet: bool = False,
    workers: int = 1,
) -> List[Path]:
    """Generate ``num_scenes`` scenes ``scene_000 ...`` under ``out_dir``; returns their folders.

    ``workers > 1`` renders scenes in that many processes (scenes are independent; the output is identical).

    Scene ``i`` depends only on ``(seed, i)`` and the sizes, so ``generate_scenes(..., num_scenes=8)`` writes the
    first 8 scenes of ``num_scenes=16`` byte for byte.
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from nerfstudio.utils.rich_utils import CONSOLE, ItersPerSecColumn

    if num_scenes < 0:
        raise ValueError("num_scenes must be >= 0")
    out_dir = Path(out_dir)
    paths: List[Path] = []
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        TaskProgressColumn(show_speed=False),
        ItersPerSecColumn(suffix="img/s"),
        TimeRemainingColumn(elapsed_when_finished=True, compact=True),
        console=CONSOLE,
        disable=quiet,
        transient=False,
    )
    with progress:
        task = progress.add_task("Rendering synthetic scenes", total=num_scenes * num_frames * num_cameras)
        if workers > 1 and num_scenes > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(workers, num_scenes)) as pool:
                jobs = [pool.submit(_make_and_write, seed, i, height, width, num_frames, num_cameras, out_dir)
                        for i in range(num_scenes)]
                results = []
                for job in jobs:
                    results.append(job.result())
                    progress.advance(task, num_frames * num_cameras)
        else:
            results = (_make_and_write(seed, i, height, width, num_frames, num_cameras, out_dir,
                                       on_image=lambda: progress.advance(task)) for i in range(num_scenes))
        for path, st, scene_name, p, seconds in results:
            paths.append(path)
            if not quiet:
                progress.console.print(
                    f"[green]✓[/green] {scene_name} {p['district']}: {p['num_buildings']} bldg, "
                    f"{p['num_cars']} cars, {p['num_trees']} trees | {p['speed_m_per_frame']:.2f} m/fr, yaw {p['yaw_range_deg']:.1f}°, "
                    f"hfov {p['hfov_deg']:.0f}° | sky {100 * st['sky_fraction']:.0f}%, depth "
                    f"{st['depth_range'][0]:.1f}-{st['depth_range'][1]:.0f} m | {st['seed_points']} pts | "
                    f"{seconds:.1f} s",
                    soft_wrap=True,
                )
    extra = sorted(p.name for p in out_dir.glob("scene_*") if p.is_dir() and p not in paths)
    if extra and not quiet:
        CONSOLE.print(
            f"[yellow]Note:[/yellow] {out_dir} also holds {len(extra)} older scene folders ({extra[0]} ...) "
            "not written by this run; the dataparser will read them too."
        )
    return paths
