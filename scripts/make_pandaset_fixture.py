"""Write the small real-data test fixture ``tests/data/pandaset_mini`` from PandaSet sequence 002.

A crop of the raw PandaSet layout (CC BY 4.0; see the fixture's README): ``--frames`` consecutive frames starting at
``--start`` (renumbered from 00), the ``--cameras`` given, images shrunk by ``--downscale`` (intrinsics scaled to
match), LiDAR sweeps cropped to ``--radius`` metres around the sensor with every ``--every``-th return kept, in the
layout's own format (gzipped pickled pandas DataFrames x, y, z, i, t, d). Poses and timestamps are copied as they are.

    python scripts/make_pandaset_fixture.py data/pandaset/002 tests/data/pandaset_mini/002
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="raw PandaSet sequence folder (e.g. data/pandaset/002)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--start", type=int, default=40)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--cameras", nargs="+", default=["front", "front_left"])
    ap.add_argument("--downscale", type=int, default=8)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--radius", type=float, default=40.0)
    ap.add_argument("--every", type=int, default=12)
    a = ap.parse_args()
    import pandas as pd
    from PIL import Image

    sel = range(a.start, a.start + a.frames)
    for cam in a.cameras:
        cdir, odir = a.src / "camera" / f"{cam}_camera", a.out / "camera" / f"{cam}_camera"
        odir.mkdir(parents=True, exist_ok=True)
        intr = json.loads((cdir / "intrinsics.json").read_text())
        (odir / "intrinsics.json").write_text(json.dumps({k: float(intr[k]) / a.downscale for k in ("fx", "fy", "cx", "cy")}))
        for name in ("poses.json", "timestamps.json"):
            vals = json.loads((cdir / name).read_text())
            (odir / name).write_text(json.dumps([vals[t] for t in sel]))
        for i, t in enumerate(sel):
            im = Image.open(cdir / f"{t:02d}.jpg")
            im = im.resize((im.width // a.downscale, im.height // a.downscale), Image.LANCZOS)
            im.save(odir / f"{i:02d}.jpg", "JPEG", quality=a.quality)
    ldir, odir = a.src / "lidar", a.out / "lidar"
    odir.mkdir(parents=True, exist_ok=True)
    poses = json.loads((ldir / "poses.json").read_text())
    for name in ("poses.json", "timestamps.json"):
        vals = json.loads((ldir / name).read_text())
        (odir / name).write_text(json.dumps([vals[t] for t in sel]))
    for i, t in enumerate(sel):
        f = ldir / f"{t:02d}.pkl.gz"
        if not f.exists():
            continue  # a missing sweep stays missing
        df = pd.read_pickle(f, compression="gzip")
        p = poses[t]["position"]
        r = np.linalg.norm(df[["x", "y", "z"]].to_numpy() - np.array([p["x"], p["y"], p["z"]]), axis=1)
        keep = (r < a.radius) & (np.arange(len(df)) % a.every == 0)
        small = df[keep].reset_index(drop=True).astype({"x": np.float32, "y": np.float32, "z": np.float32,
                                                        "i": np.float32, "t": np.float64, "d": np.int8})
        small.to_pickle(odir / f"{i:02d}.pkl.gz", compression="gzip")


if __name__ == "__main__":
    main()
