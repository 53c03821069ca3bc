"""``evolsplat-ns-synth``: generate the embedded synthetic driving scenes.

    evolsplat-ns-synth --out data/synthetic --num-scenes 8 --seed 0 --height 96 --width 288 [--frames 40 --cameras 3]

Writes ``OUT/scene_000 ...`` in the multi-scene root format (docs/DATA_FORMAT.md). Scene ``i`` depends only on
``(seed, i)`` and the sizes. World frame: metres, z up, x along the street; camera ids 0 front, 1 front-left,
2 front-right.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evolsplat-ns-synth",
        description="Generate procedural driving scenes (images, z-depth, sky masks, seed point cloud).",
    )
    p.add_argument("--out", type=Path, required=True, help="output root; scenes go to OUT/scene_XXX")
    p.add_argument("--num-scenes", type=int, default=8, help="number of scenes (default 8)")
    p.add_argument("--seed", type=int, default=0, help="data-set seed (default 0)")
    p.add_argument("--height", type=int, default=96, help="image height in pixels (default 96)")
    p.add_argument("--width", type=int, default=288, help="image width in pixels (default 288)")
    p.add_argument("--frames", type=int, default=40, help="timesteps per scene (default 40)")
    p.add_argument(
        "--cameras", type=int, default=3, choices=(1, 2, 3),
        help="use the first C of: front, front-left, front-right (default 3)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-scene summary")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering scenes in parallel (default 0: one per CPU core, at most one per scene)")
    return p


def main(argv: Optional[List[str]] = None) -> List[Path]:
    args = build_parser().parse_args(argv)
    for name in ("num_scenes", "height", "width", "frames"):
        if getattr(args, name) < (0 if name == "num_scenes" else 1):
            print(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}", file=sys.stderr)
            raise SystemExit(2)
    if args.seed < 0:
        print(f"error: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        raise SystemExit(2)

    from evolsplat_ns.data.synthetic import generate_scenes

    t0 = time.perf_counter()
    paths = generate_scenes(
        args.out, args.num_scenes, args.seed, args.height, args.width, num_frames=args.frames,
        num_cameras=args.cameras, quiet=args.quiet,
        workers=args.workers if args.workers > 0 else min(os.cpu_count() or 1, max(args.num_scenes, 1)),
    )
    if not args.quiet:
        from nerfstudio.utils.rich_utils import CONSOLE

        CONSOLE.print(
            f"[bold green]Wrote {len(paths)} scenes[/bold green] to {args.out} in {time.perf_counter() - t0:.1f} s"
        )
    return paths


def entrypoint() -> None:
    main()


if __name__ == "__main__":
    entrypoint()
