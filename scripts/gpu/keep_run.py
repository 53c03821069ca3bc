"""Keep a trained ``evolsplat-ff`` run from one GPU session to the next.

The GPU machine forgets everything when it is released, and retraining the real-data model costs ~330 s of a
session's 30 minutes. A full checkpoint (weights, Adam state, scalers) is ~44 MB, more than one file that comes back
from the machine may hold (16 MiB). What evaluation and fine-tuning load (``eval_setup``: the pipeline's state and
the step) is about a third of it, so this keeps only that, split into parts of at most 15 MiB, with the run's
``config.yml`` and a manifest (step, size, SHA-256).

    there:  python3 scripts/gpu/keep_run.py pack RUN_DIR OUT_DIR [--step N]
            # RUN_DIR: the run's folder (config.yml, nerfstudio_models/); OUT_DIR gets config.yml, manifest.json and
            # ckpt.part000, ... (come back as the call's files; put them under .gpu_data/keep_<name>/ here)
    next session, there:
            python3 scripts/gpu/keep_run.py unpack PARTS_DIR [--output-dir DIR]
            # rebuilds the run where its config says (or under --output-dir) and prints its config.yml path
            # (for --load-config); the parts are checked against the manifest first

The kept checkpoint has empty optimizer and scaler states: it evaluates, renders and starts fine-tuning, but
``ns-train --load-dir`` cannot resume training from it (the trainer reports the missing optimizer state).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

PART_BYTES = 15 << 20


def pack(run_dir: Path, out_dir: Path, step: Optional[int] = None) -> List[Path]:
    """Write ``run_dir``'s config and the pipeline state of its checkpoint at ``step`` (default the latest) to
    ``out_dir`` in parts; returns the written files."""
    import torch

    from evolsplat_ns.engine.checkpoint import check_checkpoint, resolve_checkpoint

    run_dir = Path(run_dir)
    config = run_dir / "config.yml"
    if not config.is_file():
        raise SystemExit(f"{run_dir}: no config.yml (give the run's folder, the one ns-train wrote it to)")
    path = resolve_checkpoint(run_dir / "nerfstudio_models", step, None)
    state = check_checkpoint(path, mmap=False)
    kept = {"step": state["step"], "pipeline": state["pipeline"], "optimizers": {}, "scalers": {}}
    buf = io.BytesIO()
    torch.save(kept, buf)
    data = buf.getvalue()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "config.yml"]
    shutil.copyfile(config, written[0])
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    for i, chunk in enumerate(parts):
        written.append(out_dir / f"ckpt.part{i:03d}")
        written[-1].write_bytes(chunk)
    manifest = {"step": int(state["step"]), "checkpoint": path.name, "bytes": len(data), "parts": len(parts),
                "sha256": hashlib.sha256(data).hexdigest(), "from_bytes": path.stat().st_size}
    written.append(out_dir / "manifest.json")
    written[-1].write_text(json.dumps(manifest, indent=2))
    return written


def unpack(parts_dir: Path, output_dir: Optional[Path] = None) -> Path:
    """Rebuild the kept run (see the module docstring); returns its ``config.yml``. The parts are joined and
    checked against the manifest before anything is written, and the checkpoint is written atomically."""
    import yaml

    from evolsplat_ns.atomic import write_atomic

    parts_dir = Path(parts_dir)
    manifest_path = parts_dir / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{parts_dir}: no manifest.json (not a folder written by keep_run.py pack)")
    manifest = json.loads(manifest_path.read_text())
    names = [parts_dir / f"ckpt.part{i:03d}" for i in range(int(manifest["parts"]))]
    missing = [p.name for p in names if not p.is_file()]
    if missing:
        raise SystemExit(f"{parts_dir}: missing parts {missing} of {manifest['parts']}")
    data = b"".join(p.read_bytes() for p in names)
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SystemExit(f"{parts_dir}: the parts do not add up to the kept checkpoint (size {len(data)}, expected "
                         f"{manifest['bytes']}; or another SHA-256): copy them again")
    text = (parts_dir / "config.yml").read_text()
    config = yaml.load(text, Loader=yaml.Loader)  # nerfstudio's own way of reading its config.yml
    if output_dir is not None:
        config.output_dir = Path(output_dir)
        text = yaml.dump(config)
    ckpt_dir = config.get_checkpoint_dir()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(ckpt_dir / f"step-{int(manifest['step']):09d}.ckpt", lambda f: f.write(data))
    config_path = config.get_base_dir() / "config.yml"
    config_path.write_text(text)
    return config_path


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--step", type=int, default=None)
    u = sub.add_parser("unpack")
    u.add_argument("parts_dir", type=Path)
    u.add_argument("--output-dir", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        for f in pack(a.run_dir, a.out_dir, a.step):
            print(f"{f}  {f.stat().st_size / 2**20:.1f} MiB")
    else:
        print(unpack(a.parts_dir, a.output_dir))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
