"""Feed-forward start, then a short per-scene optimisation (``evolsplat-ns-infer --finetune-seconds S``).

Per evaluation scene: merge its segments' feed-forward Gaussians (:mod:`evolsplat_ns.finetune.merge`), write the
scene as a nerfstudio dataset with the merged Gaussians as the starting PLY (:mod:`evolsplat_ns.finetune.scene`),
set up an ``evolsplat-ft`` run on it (splatfacto started from those Gaussians: :mod:`evolsplat_ns.finetune.model`)
with nerfstudio's own Trainer, train it on the clock for ``S`` seconds (evaluation excluded), save its config and
checkpoint (``ns-viewer --load-config``, ``ns-eval``, ``ns-export gaussian-splat`` work on it), score the held-out
views with the same metric code as the feed-forward scores, and export the result as a 3DGS PLY in the data's world
frame.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


SCHEDULES = ("steps", "budget")
"""How a run on a wall-clock budget follows its schedules (:func:`train_on_the_clock`)."""


def check_schedule(schedule: str) -> str:
    from evolsplat_ns.errors import ConfigError

    if schedule not in SCHEDULES:
        raise ConfigError(f"fine-tuning schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def follow_budget(trainer, fraction: float, step: int) -> None:
    """Stretch the run's schedules over a wall-clock budget: at ``fraction`` (0..1) of the budget, every parameter
    group with a learning-rate schedule gets the rate its schedule gives at ``fraction`` of the schedule's own
    ``max_steps`` (splatfacto's means decay, 1.6e-4 to 1.6e-6 over 30,000 steps, then reaches 1.6e-6 when the budget
    ends, however many steps fit in it), and the model is told where it stands (``evolsplat-ft`` stops densifying
    after ``budget_refine_stop`` of the budget). Called after each step, so it sets the rates of the next one."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    specs = trainer.config.optimizers
    for name, scheduler in trainer.optimizers.schedulers.items():
        spec = specs.get(name, {}).get("scheduler")
        if spec is None or getattr(spec, "max_steps", None) is None:
            continue
        virtual = fraction * spec.max_steps
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(virtual)
    model = trainer.pipeline.model
    if hasattr(model, "follow_budget"):
        model.follow_budget(fraction, step)


def train_on_the_clock(trainer, budgets: Iterable[float], on_budget: Optional[Callable[[float, int, float], None]] = None,
                       max_steps: Optional[int] = None, schedule: str = "steps", description: str = "Fine-tuning",
                       show_progress: bool = True) -> int:
    """Run ``trainer`` (a set-up nerfstudio Trainer) step by step, with its training callbacks, until each of
    ``budgets`` (seconds of training, sorted; evaluation and ``on_budget`` are not counted) is spent; after each
    budget ``on_budget(budget, steps, seconds)`` is called. ``max_steps`` caps the steps. Returns the steps run.

    ``schedule``: "steps" follows the config's schedules step by step (as ``ns-train`` does); "budget" stretches them
    over the last budget (:func:`follow_budget`; progress is the larger of the time spent and, with ``max_steps``,
    the steps run), so a short run ends with its learning rates decayed, as a full-length run does.

    A progress bar (nerfstudio's console) shows the seconds spent of the last budget, the steps and the Gaussians;
    it is redrawn at most four times a second, so it costs the loop nothing measurable."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation
    from nerfstudio.utils.rich_utils import CONSOLE
    from rich.progress import BarColumn, Progress, TextColumn

    check_schedule(schedule)
    budgets = sorted(float(b) for b in budgets)
    horizon = budgets[-1] if budgets else 0.0
    model = trainer.pipeline.model
    columns = (TextColumn("[bold blue]{task.description}"), BarColumn(),
               TextColumn("{task.completed:,.0f} / {task.total:,.0f} s"), TextColumn("{task.fields[steps]} steps"),
               TextColumn("{task.fields[gaussians]}"))
    step, elapsed, shown = 0, 0.0, 0.0
    with Progress(*columns, console=CONSOLE, disable=not show_progress) as bar:
        task = bar.add_task(description, total=max(horizon, 1e-9), steps=0, gaussians="")

        def show(force: bool = False) -> None:
            nonlocal shown
            now = time.perf_counter()
            if force or now - shown >= 0.25:
                shown = now
                n = getattr(model, "num_points", None)
                bar.update(task, completed=min(elapsed, horizon), steps=step,
                           gaussians=f"{int(n):,} Gaussians" if n is not None else "")

        for budget in budgets:
            trainer.pipeline.train()  # after an evaluation (on_budget) the model is back in training mode
            _sync()
            t0, spent = time.perf_counter(), elapsed
            # No device sync per step: it would stall the host until the device is idle, so that the next step
            # could not be queued while this one runs. The host clock may run ahead of the device by the steps in
            # flight; the sync when the budget looks spent makes the recorded time exact.
            while max_steps is None or step < max_steps:
                elapsed = spent + time.perf_counter() - t0
                if elapsed >= budget:
                    _sync()
                    elapsed = spent + time.perf_counter() - t0
                    if elapsed >= budget:
                        break
                for cb in trainer.callbacks:
                    cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
                trainer.train_iteration(step)
                for cb in trainer.callbacks:
                    cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
                step += 1
                if schedule == "budget":
                    progress = (spent + time.perf_counter() - t0) / horizon if horizon > 0 else 1.0
                    if max_steps:
                        progress = max(progress, step / max_steps)
                    follow_budget(trainer, progress, step)
                show()
            _sync()
            elapsed = spent + time.perf_counter() - t0
            show(force=True)
            if on_budget is not None:
                on_budget(budget, step, elapsed)
    return step


@torch.no_grad()
def render_test_views(model, dataset) -> List[torch.Tensor]:
    """``rgb`` of every camera of ``dataset`` (a nerfstudio dataset: the run's test split), in order, on the CPU."""
    model.eval()
    out = []
    for i in range(len(dataset)):
        cam = dataset.cameras[i : i + 1].to(model.device)
        out.append(model.get_outputs_for_camera(cam)["rgb"].cpu())
    model.train()
    return out


def mean_metrics(metric: Callable, preds: List[torch.Tensor], targets: List[torch.Tensor]) -> Dict[str, float]:
    rows = [metric(p.to(t.device), t) for p, t in zip(preds, targets)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def finetune_config(data: Path, init_ply: Path, output_dir: Path, name: str, device_type: str):
    """The ``evolsplat-ft`` method's config on ``data`` (an exported scene), started from ``init_ply``."""
    import copy

    from evolsplat_ns.configs import evolsplat_ft

    cfg = copy.deepcopy(evolsplat_ft.config)
    cfg.pipeline.datamanager.data = data
    cfg.pipeline.model.init_ply = init_ply
    cfg.output_dir = output_dir
    cfg.experiment_name = name
    cfg.timestamp = "run"
    cfg.vis = "tensorboard"
    cfg.logging.local_writer.enable = False
    cfg.machine.device_type = device_type
    cfg.max_num_iterations = 10**7  # the clock decides (train_on_the_clock)
    return cfg


def apply_overrides(cfg, overrides: Optional[Dict[str, object]]) -> None:
    """Set dotted config fields on ``cfg`` (``{"pipeline.model.reset_alpha_every": 1000}``; dict keys on the way too:
    ``{"optimizers.means.optimizer.fused": False}``). An unknown field is a ``ConfigError`` naming it (a typo must
    not run the default silently)."""
    from evolsplat_ns.errors import ConfigError

    for key, value in (overrides or {}).items():
        *path, last = key.split(".")
        obj = cfg
        for name in path:  # attributes, and keys of dicts (``optimizers.means.optimizer.fused``)
            obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if obj is None or isinstance(obj, dict) or not hasattr(obj, last):
            raise ConfigError(f"evolsplat-ft has no option '{key}'")
        current = getattr(obj, last)
        if value is None and current is None:
            continue  # left unset
        declared = {f.name: str(f.type) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if "float" in declared.get(last, "") and (current is None or type(current) is int):
            current = 0.0  # a float field whose default is None or a whole number: the value is read as a float
        setattr(obj, last, _typed_like(current, value, key))


def _typed_like(current, value, key: str):
    """``value`` as the type of the field's ``current`` value: a number field takes a number, or a string that
    reads as one (YAML reads ``1e-4`` as a string); a switch takes a boolean. Anything else is a ``ConfigError``
    (a learning rate of ``"1e-4"`` would otherwise fail deep inside the optimizer, or not at all)."""
    from evolsplat_ns.errors import ConfigError

    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"evolsplat-ft option '{key}' expects true or false, got {value!r}")
        return value
    if isinstance(current, (int, float)):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"evolsplat-ft option '{key}' expects a number, got {value!r}")
        if isinstance(current, int) and not float(number).is_integer():
            raise ConfigError(f"evolsplat-ft option '{key}' expects a whole number, got {value!r}")
        return type(current)(number)
    return value


def finetune_scene(pipeline, scene_id: int, out: Path, seconds, feed_forward: Dict[str, float],
                   max_steps: Optional[int] = None, keep_renders: bool = False,
                   overrides: Optional[Dict[str, object]] = None, bake: str = "middle",
                   schedule: str = "budget") -> Dict[str, object]:
    """Fine-tune evaluation scene ``scene_id`` for ``seconds`` (a number, or a list of budgets: scored after each,
    ``curve``) in ``out`` (see the module docstring). Returns its ``feed_forward`` (given: the zero-shot means of
    its held-out views) and ``finetuned`` metrics (``psnr``, ``ssim``, ``seconds``; the last budget), the
    ``curve``, the steps, the Gaussian counts and the written paths; with ``keep_renders`` also ``renders``: the
    test views after the last budget (CPU tensors, not JSON). ``overrides``: ``evolsplat-ft`` config fields to set
    (:func:`apply_overrides`); ``bake``: the viewpoints of the static start (:func:`~.merge.scene_gaussians`);
    ``schedule``: :func:`train_on_the_clock`'s. With the schedule "budget" each budget of a list is its own run
    from the same start (a run's schedule depends on its budget); the last one's run is kept as the result."""
    from evolsplat_ns.export.ply import write_gaussian_ply
    from evolsplat_ns.export.world_frame import to_data_world
    from evolsplat_ns.finetune.merge import scene_gaussians
    from evolsplat_ns.finetune.scene import export_scene

    check_schedule(schedule)  # before the long work below
    out = Path(out)
    dm, ff = pipeline.datamanager, pipeline.ff_model
    scene = dm.scenes[scene_id]
    merged, info = scene_gaussians(pipeline, scene_id, bake=bake)
    exported = export_scene(pipeline, scene_id, out / "data")
    g = exported.frame.gaussians(merged)
    init_ply = write_gaussian_ply(out / "data" / "init_gaussians.ply", g["means"], g["sh"], g["opacity_logit"],
                                  g["log_scales"], g["quats"])
    budgets = sorted(float(s) for s in (seconds if isinstance(seconds, (list, tuple)) else [seconds]))
    budgets = [b for b in budgets if b > 0]
    runs = [budgets] if schedule == "steps" or len(budgets) <= 1 else [[b] for b in budgets]
    curve: List[Dict[str, float]] = []
    result: Dict[str, object] = {"curve": curve}
    for i, run_budgets in enumerate(runs):
        cfg = finetune_config(out / "data", init_ply, out / "runs", scene.name, ff.device.type)
        if i < len(runs) - 1:
            cfg.timestamp = f"run_{run_budgets[-1]:g}s"
        apply_overrides(cfg, overrides)
        cfg.save_config()
        trainer = cfg.setup(local_rank=0, world_size=1)
        trainer.setup()
        model = trainer.pipeline.model
        test_set = trainer.pipeline.datamanager.eval_dataset
        if i == 0:
            start = mean_metrics(ff.image_metrics, render_test_views(model, test_set), exported.targets)
            curve.append({"seconds": 0.0, "steps": 0, "psnr": start["psnr"], "ssim": start["ssim"]})

        def scored(budget: float, steps: int, elapsed: float) -> None:
            preds = render_test_views(model, test_set)
            if keep_renders:
                result["renders"] = preds
            m = mean_metrics(ff.image_metrics, preds, exported.targets)
            curve.append({"seconds": elapsed, "steps": steps, "psnr": m["psnr"], "ssim": m["ssim"]})
            result.update(steps=steps, finetuned={"psnr": m["psnr"], "ssim": m["ssim"], "seconds": elapsed})

        steps = train_on_the_clock(trainer, run_budgets, scored, max_steps=max_steps, schedule=schedule,
                                   description=f"Fine-tuning {scene.name} ({run_budgets[-1]:,.0f} s)"
                                   if run_budgets else "Fine-tuning")
    result.setdefault("steps", 0)
    result.setdefault("finetuned", {"psnr": start["psnr"], "ssim": start["ssim"], "seconds": 0.0})
    trainer.save_checkpoint(max(steps - 1, 0))
    p = {k: v.detach().cpu() for k, v in model.gauss_params.items()}
    sh = torch.cat([p["features_dc"][:, None], p["features_rest"]], 1)
    back = exported.frame.gaussians({"means": p["means"], "log_scales": p["scales"]}, inverse=True)
    world = to_data_world({"means": back["means"], "quats": p["quats"], "sh": sh, "log_scales": back["log_scales"],
                           "opacity_logit": p["opacities"][:, 0]}, scene.align)
    ply = write_gaussian_ply(out / "finetuned_gaussians.ply", world["means"], world["sh"], world["opacity_logit"],
                             world["log_scales"], world["quats"])
    result.update(
        scene=scene.name, scene_id=scene_id,
        feed_forward={**{k: feed_forward[k] for k in ("psnr", "ssim")}, "seconds": info["seconds"]},
        merged_start={"psnr": start["psnr"], "ssim": start["ssim"]},
        gaussians={"start": info["gaussians"], "finetuned": int(p["means"].shape[0])},
        num_views=len(exported.targets), config=str(cfg.get_base_dir() / "config.yml"), ply=str(ply))
    return result
