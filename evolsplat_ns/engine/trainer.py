"""evolsplat-ff's trainer: nerfstudio's stock ``Trainer`` plus three reliability guarantees.

1. **Checkpoints are written atomically.** nerfstudio writes ``step-N.ckpt`` in place, so a run killed while
   saving leaves a truncated newest checkpoint, which ``--load-dir`` then picks. Here the file is written into a
   hidden sibling folder and moved into ``nerfstudio_models/`` with one ``os.replace``: the folder only ever holds
   complete checkpoints (and nothing else, which nerfstudio's own step parsing needs: a temporary file beside the
   checkpoints would break it). A full disk is one error naming the file; the previous checkpoint stays.
2. **A checkpoint to resume from is checked before any long work.** ``--load-dir`` / ``--load-step`` /
   ``--load-checkpoint`` are resolved and the file is checked (:func:`evolsplat_ns.engine.checkpoint.check_checkpoint`:
   missing, truncated, not PyTorch, another method's) before the data are indexed and the model is built; the
   file is then read once.
3. **Bad input is one line.** Inside ``ns-train``, a :class:`DataValidationError` / :class:`ConfigError` /
   :class:`CheckpointError` / empty point cloud is printed as one ``error:`` line and the process exits with
   code 2 (``EVOLSPLAT_NS_VERBOSE=1`` shows the traceback); from Python the exception passes unchanged.

Everything else is nerfstudio's: the training loop, logging, evaluation hooks and checkpoint contents (the same
keys as its ``save_checkpoint``).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Type

from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from evolsplat_ns.atomic import write_atomic
from evolsplat_ns.errors import CheckpointError, ConfigError, one_line_errors_in_nerfstudio_commands
from evolsplat_ns.engine.checkpoint import check_checkpoint, resolve_checkpoint


@dataclass
class EvolSplatTrainerConfig(TrainerConfig):
    """nerfstudio's trainer options; the trainer adds atomic checkpoints and up-front checks."""

    _target: Type = field(default_factory=lambda: EvolSplatTrainer)

    def get_checkpoint_dir(self) -> Path:
        """nerfstudio's, and the pipeline config learns it (``checkpoint_source``): nerfstudio's ``eval_setup``
        (ns-eval, ns-viewer, ns-render, ns-export) calls this, builds the pipeline, then loads the newest
        checkpoint of this folder (or ``load_step``'s) into it; the pipeline checks that file before any long work.
        """
        path = super().get_checkpoint_dir()
        if hasattr(self.pipeline, "checkpoint_source"):
            self.pipeline.checkpoint_source = (path, self.load_step)
        return path


def check_device(device_type: str, method: str) -> None:
    """A CUDA run on a machine without CUDA is a :class:`ConfigError` naming the way to run on the CPU (instead of
    torch's "Found no NVIDIA driver" deep inside the set-up)."""
    import torch

    if str(device_type) == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{method} is set to train on CUDA but this machine has no usable CUDA device: add "
                          f"--machine.device-type cpu, or use the CPU preset (ns-train evolsplat-ff-small --data ..., "
                          f"which picks the CPU by itself)")


class EvolSplatTrainer(Trainer):
    config: EvolSplatTrainerConfig

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        with one_line_errors_in_nerfstudio_commands():
            check_device(self.config.machine.device_type, self.config.method_name)
            # before the data are indexed and the model built: a bad checkpoint costs seconds, not minutes
            self._resume_path: Optional[Path] = resolve_checkpoint(
                self.config.load_dir, self.config.load_step, self.config.load_checkpoint)
            if self._resume_path is not None and not check_checkpoint(self._resume_path, mmap=True)["optimizers"]:
                # nerfstudio would resume with fresh Adam state and say nothing
                raise CheckpointError(self._resume_path, "optimizers", "the optimizer state of the run, to resume "
                                      "training", "none (weights only, e.g. kept by scripts/gpu/keep_run.py): "
                                      "evaluate or fine-tune from it, or train anew")
            super().setup(test_mode=test_mode)

    def train(self) -> None:
        # errors found late (a scene first decoded mid-run, a segment whose point cloud is empty) are one line too
        with one_line_errors_in_nerfstudio_commands():
            super().train()

    def _load_checkpoint(self) -> None:
        path = getattr(self, "_resume_path", None)
        if path is None:
            return super()._load_checkpoint()  # nothing to load: nerfstudio says "training from scratch"
        state: Dict[str, Any] = check_checkpoint(path, mmap=False)  # the one full read
        self._start_step = int(state["step"]) + 1
        if hasattr(self.pipeline, "checkpoint_path"):
            self.pipeline.checkpoint_path = path  # named in the pipeline's error if the weights do not fit
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        CONSOLE.print(f"Done loading checkpoint from {path} (step {state['step']})")

    def _checkpoint_state(self, step: int) -> Dict[str, Any]:
        """What nerfstudio 1.1.5's ``Trainer.save_checkpoint`` saves, key for key."""
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        return {
            "step": step,
            "pipeline": pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """nerfstudio's checkpoint, written completely (:func:`evolsplat_ns.atomic.write_atomic`, through a Python
        file so that a write error keeps its errno) into a hidden sibling folder, then moved into place with one
        ``os.replace``. Older checkpoints are deleted (``save_only_latest_checkpoint``) only after that. A full disk
        (or quota) is a :class:`CheckpointError` naming the file; nothing of the new checkpoint is left behind."""
        import torch

        final_dir = Path(self.checkpoint_dir)
        partial_dir = final_dir.parent / f".{final_dir.name}.partial"
        name = f"step-{step:09d}.ckpt"
        state = self._checkpoint_state(step)
        try:
            write_atomic(partial_dir / name, lambda f: torch.save(state, f))
            final_dir.mkdir(parents=True, exist_ok=True)
            os.replace(partial_dir / name, final_dir / name)
        except Exception as e:
            full = disk_full_error(e)
            if full is None:
                raise
            raise disk_full_checkpoint_error(final_dir / name, full) from e
        finally:
            shutil.rmtree(partial_dir, ignore_errors=True)
        if self.config.save_only_latest_checkpoint:
            for f in final_dir.glob("step-*.ckpt"):
                if f.name != name:
                    f.unlink()


def disk_full_error(e: BaseException) -> Optional[OSError]:
    """The ``OSError`` with errno ENOSPC / EDQUOT behind ``e`` (itself, or its cause / context: torch's zip writer
    wraps a failed write of the file object in a ``RuntimeError``), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def disk_full_checkpoint_error(path: Path, err: OSError) -> CheckpointError:
    """One line: the checkpoint that could not be written, that the disk (or quota) is full, what is kept."""
    from evolsplat_ns.engine.checkpoint import list_checkpoints

    folder = path.parent
    earlier = list_checkpoints(folder) if folder.is_dir() else {}
    kept = f"the previous checkpoint {earlier[max(earlier)].name} is kept (--load-dir {folder} resumes from it)" \
        if earlier else "there is no earlier checkpoint"
    try:
        free = f", {shutil.disk_usage(folder.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = ""
    what = "the disk quota is exceeded" if err.errno == errno.EDQUOT else "the disk is full"
    return CheckpointError(path, None, "free disk space to write this checkpoint",
                           f"{what} ({err.strerror or err}{free}): no partial file is left; {kept}")
