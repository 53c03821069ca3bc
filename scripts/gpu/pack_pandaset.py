"""Carry a raw PandaSet sequence to the GPU machine (64 MiB a call): pack it small here, unpack it there.

``pack SRC OUT``: images resized by ``--downscale`` (intrinsics scaled to match) as JPEG, LiDAR sweeps cropped to
``--radius`` metres around the sensor, every ``--every``-th return, positions rounded to 1 cm (int16 offsets from
the sensor, ``.npz``); poses and timestamps copied. ``unpack OUT DST``: back to the raw PandaSet layout (gzipped
pickled pandas DataFrames with x, y, z, i, t, d; ``i``/``t`` are zero) that ``--pipeline.datamanager.dataparser.layout
pandaset`` reads. ``--cameras`` / ``--parts`` split the payload over several calls (one part per call).
Missing sweeps stay missing. This is transport, not a data format of the project.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np

CAMERAS = ["front", "front_left", "front_right", "left", "right", "back"]


def pack(src: Path, out: Path, downscale: float, quality: int, radius: float, every: int, cameras, lidar: bool):
    from PIL import Image

    for cam in cameras:
        cdir = src / "camera" / f"{cam}_camera"
        odir = out / "camera" / f"{cam}_camera"
        odir.mkdir(parents=True, exist_ok=True)
        intr = json.loads((cdir / "intrinsics.json").read_text())
        (odir / "intrinsics.json").write_text(json.dumps({k: float(intr[k]) / downscale for k in ("fx", "fy", "cx", "cy")}))
        for name in ("poses.json", "timestamps.json"):
            shutil.copy(cdir / name, odir / name)
        for f in sorted(cdir.glob("*.jpg")):
            im = Image.open(f)
            im = im.resize((round(im.width / downscale), round(im.height / downscale)), Image.LANCZOS)
            im.save(odir / f.name, "JPEG", quality=quality)
    if not lidar:
        return
    import pandas as pd

    ldir, odir = src / "lidar", out / "lidar"
    odir.mkdir(parents=True, exist_ok=True)
    poses = json.loads((ldir / "poses.json").read_text())
    for name in ("poses.json", "timestamps.json"):
        shutil.copy(ldir / name, odir / name)
    for f in sorted(ldir.glob("*.pkl.gz")):
        i = int(f.name.split(".")[0])
        df = pd.read_pickle(f, compression="gzip")
        p = poses[i]["position"]
        origin = np.array([p["x"], p["y"], p["z"]])
        xyz = df[["x", "y", "z"]].to_numpy() - origin
        keep = np.linalg.norm(xyz, axis=1) < radius
        keep &= (np.arange(len(xyz)) % every) == 0
        q = np.round(xyz[keep] * 100).astype(np.int16)
        np.savez_compressed(odir / f"{i:02d}.npz", q=q, d=df["d"].to_numpy()[keep].astype(np.uint8), origin=origin)


def unpack(packed: Path, dst: Path):
    import pandas as pd

    shutil.copytree(packed, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.npz"))
    for f in sorted((packed / "lidar").glob("*.npz")):
        z = np.load(f)
        xyz = z["q"].astype(np.float64) / 100 + z["origin"]
        df = pd.DataFrame({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "i": 0.0, "t": 0.0, "d": z["d"].astype(np.int64)})
        df.to_pickle(dst / "lidar" / f"{f.stem}.pkl.gz", compression="gzip")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--downscale", type=float, default=2.0)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--radius", type=float, default=60.0)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--cameras", nargs="+", default=CAMERAS)
    p.add_argument("--no-lidar", action="store_true")
    u = sub.add_parser("unpack")
    u.add_argument("packed", type=Path, nargs="+")
    u.add_argument("dst", type=Path)
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.src, a.out, a.downscale, a.quality, a.radius, a.every, a.cameras, not a.no_lidar)
    else:
        for p in a.packed:
            unpack(p, a.dst)


if __name__ == "__main__":
    main()
