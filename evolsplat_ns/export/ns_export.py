"""``ns-export gaussian-splat`` on an ``evolsplat-ff`` checkpoint.

nerfstudio's exporter reads the Gaussians of a splatfacto model (``pipeline.model``, asserted to be one). A
feed-forward model has none of its own: it reconstructs them per segment. Under that command the pipeline therefore
presents one segment's reconstruction as a splatfacto model (:class:`~evolsplat_ns.finetune.model.EvolSplatFinetuneModel`
holding it), and the exporter writes it as usual: the segment's default reconstruction (sources spread over the
segment, as the viewer shows it), colour baked for its middle source camera, in the data's world frame — the same
Gaussians as ``evolsplat-ns-infer``'s per-segment PLY.

The segment: ``EVOLSPLAT_EXPORT_SEGMENT=<scene id>:<segment id>`` (nerfstudio's exporter takes no options of ours);
default the first evaluation segment. The ids are those ``evolsplat-ns-inspect`` and the viewer's dropdown show.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from evolsplat_ns.errors import ConfigError, nerfstudio_command

SEGMENT_ENV = "EVOLSPLAT_EXPORT_SEGMENT"


def exporting_gaussian_splat() -> bool:
    """Whether this process is ``ns-export gaussian-splat``."""
    cmd = nerfstudio_command() or ""
    return ("export" in cmd) and "gaussian-splat" in sys.argv[1:]


def chosen_segment(keys) -> Tuple[int, int]:
    """The segment named by :data:`SEGMENT_ENV` (checked against ``keys``, the valid ``(scene, segment)`` ids), or
    the first of ``keys``."""
    text = os.environ.get(SEGMENT_ENV, "").strip()
    if not text:
        return tuple(keys[0])
    try:
        key = tuple(int(x) for x in text.split(":"))
    except ValueError:
        key = ()
    if len(key) != 2 or key not in [tuple(k) for k in keys]:
        raise ConfigError(f"{SEGMENT_ENV}={text!r}: expected <scene id>:<segment id>, one of "
                          f"{', '.join(f'{s}:{g}' for s, g in list(keys)[:12])}{' ...' if len(keys) > 12 else ''}")
    return key  # type: ignore[return-value]


def segment_as_splatfacto(pipeline, key: Optional[Tuple[int, int]] = None):
    """A splatfacto model (CPU) holding segment ``key``'s reconstruction (default: :func:`chosen_segment`), in the
    data's world frame, SH degree 1 as decoded for the segment's middle source camera."""
    import torch
    from nerfstudio.data.scene_box import SceneBox

    from evolsplat_ns.export.ply import write_gaussian_ply
    from evolsplat_ns.export.world_frame import to_data_world
    from evolsplat_ns.finetune.model import EvolSplatFinetuneModelConfig

    dm = pipeline.datamanager
    keys = [k for sid in list(dm.eval_scene_ids) + list(dm.train_scene_ids) for k in
            ((sid, s.segment_id) for s in dm.index[sid].segments)]
    key = key or chosen_segment(keys)
    shared = pipeline.reconstruct(dm.eval_batch(*key))
    g = to_data_world(pipeline.ff_model.export_gaussians(shared), dm.scenes[key[0]].align)
    with tempfile.TemporaryDirectory(prefix="evolsplat-export-") as tmp:
        ply = write_gaussian_ply(Path(tmp) / "segment.ply", g["means"], g["sh"], g["opacity_logit"], g["log_scales"],
                                 g["quats"])
        k = g["sh"].shape[1]
        cfg = EvolSplatFinetuneModelConfig(init_ply=ply, sh_degree=int(round(k ** 0.5)) - 1)
        model = cfg.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model.gauss_params["means"].data = g["means"].detach().cpu().double()  # world frame: keep float64 (UTM)
    return model.eval()
