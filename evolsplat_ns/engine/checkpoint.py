"""Checkpoint checks: a missing, truncated, foreign or mismatched checkpoint is one clear error naming the file.

nerfstudio 1.1.5 loads checkpoints with a plain ``torch.load`` inside its own commands (the trainer's resume,
``eval_setup`` behind ns-eval / ns-viewer / ns-render / ns-export), so a bad file surfaces as a zip-reader or
unpickling traceback that names neither the file nor the cause. :func:`check_checkpoint` is run by the plugin's
trainer and pipeline before that happens. It memory-maps the file (``mmap=True``), so it costs little even for a
large checkpoint: the zip directory and the pickled structure are read, the tensor data are not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from evolsplat_ns.errors import CheckpointError

CKPT_RE = re.compile(r"^step-(\d+)\.ckpt$")
REQUIRED_KEYS = ("step", "pipeline", "optimizers", "scalers")
EXPECTED = "a complete evolsplat-ff checkpoint (step-*.ckpt written by ns-train evolsplat-ff)"


def list_checkpoints(load_dir: Path) -> Dict[int, Path]:
    """``{step: path}`` of the ``step-*.ckpt`` files of a folder (other files are ignored)."""
    out = {}
    for p in Path(load_dir).iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def resolve_checkpoint(load_dir: Optional[Path], load_step: Optional[int], load_checkpoint: Optional[Path]
                       ) -> Optional[Path]:
    """The file nerfstudio would load for ``--load-dir`` (+ ``--load-step``) or ``--load-checkpoint``; None if
    neither is set. Raises :class:`CheckpointError` for a missing folder, an empty one or a missing step."""
    if load_dir is not None:
        load_dir = Path(load_dir)
        if not load_dir.is_dir():
            raise CheckpointError(load_dir, "load_dir", "an existing folder of step-*.ckpt checkpoints", "missing")
        found = list_checkpoints(load_dir)
        if not found:
            others = sorted(p.name for p in load_dir.iterdir())[:5]
            raise CheckpointError(load_dir, "load_dir", "a folder holding step-*.ckpt checkpoints",
                                  f"none (contents: {others or 'empty'})")
        if load_step is None:
            return found[max(found)]
        if int(load_step) not in found:
            raise CheckpointError(load_dir, "load_step", f"one of the saved steps {list(found)}", load_step)
        return found[int(load_step)]
    if load_checkpoint is not None:
        return Path(load_checkpoint)
    return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:160]}" if s else type(e).__name__


def check_checkpoint(path: Path, mmap: bool = True) -> Dict[str, Any]:
    """Load ``path`` as nerfstudio would (``weights_only=True``) and check that it is an evolsplat-ff checkpoint.

    Returns the loaded dict (tensors memory-mapped when ``mmap``). Raises :class:`CheckpointError` naming the
    file for a missing, truncated or non-PyTorch file, one that needs unsafe unpickling, a dict without
    nerfstudio's keys, or a pipeline state of another method.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, None, EXPECTED, "missing file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, None, EXPECTED, "an empty file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every way a file can fail to load is the same user error
        msg = str(e)
        if "Weights only load failed" in msg or type(e).__name__ == "UnpicklingError" and "weights_only" in msg:
            got = "a file that needs unsafe unpickling (weights_only=False): not written by evolsplat-ff"
        elif "central directory" in msg or "zip archive" in msg or isinstance(e, EOFError):
            got = f"a truncated or corrupt file ({_first_line(e)})"
        else:
            got = f"a file PyTorch cannot read ({_first_line(e)})"
        raise CheckpointError(path, None, EXPECTED, got) from None
    if not isinstance(state, Mapping) or not all(k in state for k in REQUIRED_KEYS):
        keys = sorted(map(str, state))[:6] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(path, None, f"a nerfstudio checkpoint with keys {list(REQUIRED_KEYS)}", f"keys {keys}")
    check_pipeline_state(state["pipeline"], path)
    return dict(state)


def check_pipeline_state(pipeline_state: Any, path: Optional[Path] = None) -> None:
    """The pipeline part of a checkpoint must be evolsplat-ff's (its sparse U-Net, heads and segment store)."""
    where = path if path is not None else Path("<checkpoint>")
    if not isinstance(pipeline_state, Mapping):
        raise CheckpointError(where, "pipeline", "a state dict", type(pipeline_state).__name__)
    keys = [str(k) for k in pipeline_state]
    ours = (any(".encoder." in k for k in keys) and any(".heads." in k for k in keys)
            and any(k.endswith("segments._extra_state") for k in keys))
    if not ours:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        raise CheckpointError(where, "pipeline", "the state of an evolsplat-ff pipeline (_model.encoder / heads / "
                              "segments)", f"another method's state (keys such as {sample})")


def load_pipeline_state(load: Callable[[Any, int], None], pipeline_state: Any, step: int,
                        path: Optional[Path] = None) -> None:
    """``load(pipeline_state, step)`` (nerfstudio's ``load_pipeline``) after :func:`check_pipeline_state`, with
    load_state_dict's key listing (a differently configured model) turned into one :class:`CheckpointError`."""
    check_pipeline_state(pipeline_state, path)
    check_finite_weights(pipeline_state, path)
    try:
        load(pipeline_state, step)
    except RuntimeError as e:
        raise CheckpointError(path or Path("<checkpoint>"), "pipeline", "weights of the model this config builds "
                              "(same model options as the run that wrote the checkpoint)",
                              source_view_mismatch(pipeline_state, e) or summarize_load_error(e)) from e


def check_finite_weights(pipeline_state: Mapping, path: Optional[Path] = None) -> None:
    """Every floating-point tensor of the pipeline state is finite: weights with NaN / inf would render nothing
    (evaluation) or poison every later step (resume). :class:`CheckpointError` naming the first bad tensor."""
    import torch

    bad = [(k, v) for k, v in pipeline_state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        name, t = bad[0]
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(path or Path("<checkpoint>"), "pipeline", "finite weights",
                              f"{n} NaN/inf value(s) in {name}" + (f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1
                                                                   else ""))


def check_provenance(saved: Optional[Mapping], current: Mapping, path: Optional[Path] = None) -> None:
    """A training run resumes only on what its checkpoint was made from: the same scenes (segment states follow
    scene ids) and the same point-cloud options (a segment's saved offsets belong to its cloud). Checkpoints
    without a record (older ones) pass."""
    if not saved:
        return
    where = path or Path("<checkpoint>")
    if list(saved.get("scenes", [])) != list(current["scenes"]):
        a, b = list(saved.get("scenes", [])), list(current["scenes"])
        gone, new = [s for s in a if s not in b], [s for s in b if s not in a]
        raise CheckpointError(where, "scenes", f"the scenes the run was trained on ({len(a)}, in that order) to "
                              f"resume training; start a new run for other data",
                              f"{len(b)} scenes here" + (f", missing {gone[:4]}" if gone else "")
                              + (f", added {new[:4]}" if new else "") + ("" if gone or new else ", in another order"))
    if saved.get("pointcloud") != current["pointcloud"]:
        a, b = saved.get("pointcloud") or {}, current["pointcloud"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise CheckpointError(where, "pipeline.model.pointcloud", "the point-cloud options the run was trained with "
                              "(its segments' saved offsets belong to those clouds)",
                              "other values of " + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff[:4]))


def source_view_mismatch(pipeline_state: Mapping, error: BaseException) -> Optional[str]:
    """When a load failed because the colour head reads another number of source views than the model built for
    this data (another camera count, or another ``num_source_keyframes``), say so with both counts; else None."""
    m = re.search(r"size mismatch for (?:_model\.)?(?:module\.)?heads\.colour\.0\.weight: copying a param with "
                  r"shape torch\.Size\(\[\d+, (\d+)\]\) from checkpoint, the shape in current model is "
                  r"torch\.Size\(\[\d+, (\d+)\]\)", str(error))
    if m is None:
        return None
    window = next((int(v.shape[1]) for k, v in pipeline_state.items() if k.endswith("background.colour.0.weight")),
                  None)  # 3 per source view
    ckpt_in, model_in = int(m.group(1)), int(m.group(2))
    if window:
        ckpt_views = window // 3
        per_view = (ckpt_in - 4) // ckpt_views if ckpt_views else 0
        model_views = (model_in - 4) // per_view if per_view else "?"
        return (f"a model that reads {ckpt_views} source views per batch, but this data and config give "
                f"{model_views} (source keyframes x cameras): use data with the cameras the model was trained on "
                f"(the layout's camera option), or the same --pipeline.datamanager.num-source-keyframes")
    return f"colour-head inputs {ckpt_in} in the checkpoint, {model_in} here: another number of source views"


def summarize_load_error(e: BaseException) -> str:
    """One line out of ``load_state_dict``'s multi-line RuntimeError (missing / unexpected keys, size mismatches)."""
    msg = str(e)
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n|\n)", msg, re.S)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n|\n)", msg, re.S)
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (torch.Size\([^)]*\)) from checkpoint, "
                       r"the shape in current model is (torch.Size\([^)]*\))", msg)
    parts = []
    if sizes:
        name, a, b = sizes[0]
        parts.append(f"{len(sizes)} size mismatch(es), e.g. {name}: {a} in the checkpoint, {b} in this model")
    for label, m in (("missing", missing), ("unexpected", unexpected)):
        if m:
            names = [s.strip().strip('"') for s in m.group(1).split(",") if s.strip()]
            parts.append(f"{len(names)} {label} key(s), e.g. {names[0]}")
    return "; ".join(parts) or _first_line(e)
