"""Where a fine-tuning step's time goes (issue 17): host against device, and the host synchronisations.

Sets up the ``evolsplat-ft`` run that ``evolsplat-ns-infer --finetune-seconds`` sets up (:func:`finetune_config`) on
an exported scene (``DIR/data`` with its ``init_gaussians.ply``, as a fine-tuning run leaves it), runs it through the
same clock loop (:func:`train_on_the_clock`) and reports, per step:

* ``wall_ms``: the loop's time per step (device synchronised at both ends of the timed steps);
* ``device_busy_ms``: the sum of the device's kernel and copy times (torch profiler), i.e. what the step would cost
  if the host never held the device back;
* ``host_syncs``: calls that wait for the device (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
  ``cudaMemcpy`` from pageable memory, ``aten::_local_scalar_dense`` = ``.item()``);
* the profiler's top operators by host and by device time;
* ``sync_sources`` (CUDA): where in the Python code each synchronising call of a few steps comes from (torch's sync
  debug mode, one stack per warning, the innermost frames of nerfstudio, gsplat and this project), with counts.

A step is host-bound when ``wall_ms`` is well above ``device_busy_ms``.

    python3 benchmarks/profile_finetune_step.py DIR [--steps 200] [--profile-steps 30] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_splatfacto import parse_option  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::_local_scalar_dense",
              "cudaEventSynchronize")


def find_scene(root: Path) -> Path:
    """The exported scene under ``root`` (the folder holding ``transforms.json`` and ``init_gaussians.ply``)."""
    for ply in sorted(Path(root).rglob("init_gaussians.ply")):
        if (ply.parent / "transforms.json").is_file():
            return ply.parent
    raise FileNotFoundError(f"{root}: no exported scene (a folder with transforms.json and init_gaussians.ply)")


def main() -> None:
    from evolsplat_ns.engine.device_waits import device_waits
    from evolsplat_ns.finetune.run import apply_overrides, finetune_config, train_on_the_clock

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a fine-tuning output folder (or any folder above its exported scene)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps (after 50 warm-up steps)")
    ap.add_argument("--profile-steps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ft-option", nargs="+", default=[], type=parse_option, metavar="FIELD=VALUE",
                    help="evolsplat-ft config fields to set (as in bench_real.py)")
    ap.add_argument("--out", type=Path, default=Path("outputs/profile_finetune_step.json"))
    args = ap.parse_args()

    data = find_scene(args.root)
    cfg = finetune_config(data, data / "init_gaussians.ply", Path("/tmp/profile_ft_runs"), "profile", args.device)
    apply_overrides(cfg, dict(args.ft_option))
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(steps: int) -> float:
        """ms per step of ``steps`` steps of the clock loop (the config's own schedule: the budget one would stop the
        densification half-way)."""
        sync()
        t0 = time.perf_counter()
        train_on_the_clock(trainer, [1e9], max_steps=steps, show_progress=False)
        sync()
        return 1000 * (time.perf_counter() - t0) / steps

    model = trainer.pipeline.model
    run(50)  # warm-up: kernels, caches
    report = {"scene": str(data), "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    report["wall_ms"] = run(args.steps)  # the loop counts from step 0: densification statistics are kept
    report["steps_per_s"] = 1000 / report["wall_ms"]
    stop = model.strategy.refine_stop_iter
    model.strategy.refine_stop_iter = 0  # the second part of a budget: densification over
    report["wall_ms_after_densification"] = run(args.steps)
    model.strategy.refine_stop_iter = stop
    report["gaussians"] = int(model.num_points)

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = args.profile_steps
    with profile(activities=acts) as prof:
        run(n)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
        if cuda else 0.0
    syncs = {e.key: e.count / n for e in events if any(e.key.startswith(s) for s in SYNC_NAMES)}
    report.update(
        device_busy_ms=device_us / 1000 / n,
        host_syncs_per_step=syncs,
        top_host=[(e.key, round(e.cpu_time_total / 1000 / n, 3), e.count // max(n, 1)) for e in
                  sorted(events, key=lambda e: -e.cpu_time_total)[:25]],
        top_device=[(e.key, round(e.self_device_time_total / 1000 / n, 3)) for e in
                    sorted(events, key=lambda e: -e.self_device_time_total)[:15]] if cuda else [],
    )
    if cuda:
        checked = 5
        waits = device_waits(lambda: run(checked))
        report["sync_sources"] = [(where, n / checked) for where, n in waits.most_common()]
        for where, count in report["sync_sources"]:
            print(f"{count:5.1f} per step  {where}")
    print(json.dumps({k: report[k] for k in ("gaussians", "wall_ms", "steps_per_s", "wall_ms_after_densification",
                                             "device_busy_ms", "host_syncs_per_step")}, indent=1))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    if cuda:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
