"""Per-segment state of the feed-forward model: its Gaussians' node tensors, offset cache and derived caches.

:class:`SegmentStateStore` keys everything by ``(scene_id, segment_id)``, so the same segment id in two scenes
never collides. Per segment it holds

- **tensors**: what ``init_fn()`` returned when the segment was first activated (``means``, ``colours``,
  ``log_scales``, ``features_dc``, ``features_rest``, ``quats``, ``opacities``, ``offset``: see
  :func:`evolsplat_ns.pointcloud.init.init_gaussians`; any dict of tensors works, and a zero ``offset`` like
  ``means`` is added when missing);
- **caches**: values derived from them (``cached(name, fn)``), e.g. the voxel structure or a frozen feature volume.

Switching segments keeps the outgoing segment's state; a returning segment gets exactly its tensors back (the same
bits, including offset updates made while it was active). At most ``resident_segments`` segments stay on the compute
device, the least recently used ones are moved to ``offload_device`` (CPU). Caches that are tensors (or dicts /
lists of tensors) or objects with a ``.to(device)`` method move with them; other caches are dropped on eviction and
rebuilt by ``cached`` on demand.

The store is an ``nn.Module`` without parameters: assigned as a model attribute it follows ``model.to(device)``
(the compute device), and its state travels in ``model.state_dict()`` as ``<name>._extra_state`` — a dict of plain
tensors, ints, bools, strings and lists, loadable with ``torch.load(..., weights_only=True)``. ``persist`` limits
which tensors are saved (e.g. ``("offset",)``): the others are rebuilt by ``init_fn`` when the segment is next
activated, and the saved ones are laid over them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

Key = Tuple[int, int]
FORMAT = "evolsplat-segment-state"
VERSION = 1
_DROP = object()


@dataclass
class _SegmentState:
    tensors: Dict[str, Tensor]
    caches: Dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the tensors are now."""
    home: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where they go when the segment is active and the store has no compute device of its own."""
    resident: bool = True
    complete: bool = True
    """False after a restore with ``persist``: ``init_fn`` rebuilds the tensors that were not saved."""


def _move(value: Any, device: torch.device) -> Any:
    """``value`` on ``device``; ``_DROP`` when it cannot be moved."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        out = {k: _move(v, device) for k, v in value.items()}
        return _DROP if any(v is _DROP for v in out.values()) else out
    if isinstance(value, (list, tuple)):
        out = [_move(v, device) for v in value]
        return _DROP if any(v is _DROP for v in out) else type(value)(out)
    to = getattr(value, "to", None)
    if callable(to):
        moved = to(device)
        return value if moved is None else moved
    return _DROP


def _plain_cpu(value: Any) -> Any:
    """A CPU copy of tensors / dicts / lists of tensors (for ``state_dict``); ``_DROP`` for anything else."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        out = {k: _plain_cpu(v) for k, v in value.items()}
        return _DROP if any(v is _DROP for v in out.values()) else out
    if isinstance(value, (list, tuple)):
        out = [_plain_cpu(v) for v in value]
        return _DROP if any(v is _DROP for v in out) else out
    return _DROP


class SegmentStateStore(nn.Module):
    """Per-segment state keyed by ``(scene_id, segment_id)``; see the module docstring.

    Args:
        resident_segments: segments whose tensors stay on the compute device (least recently used evicted).
        device: compute device; default: follows ``.to(...)`` of the module (or of the model holding it), and
            before that the device of the tensors ``init_fn`` returns.
        offload_device: where evicted segments go.
        persist: tensor names saved by ``state_dict`` (None = all).
    """

    def __init__(
        self,
        resident_segments: int = 2,
        device: Union[str, torch.device, None] = None,
        offload_device: Union[str, torch.device] = "cpu",
        persist: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        if resident_segments < 1:
            raise ValueError(f"resident_segments must be >= 1, got {resident_segments}")
        self.resident_segments = int(resident_segments)
        self.offload_device = torch.device(offload_device)
        self.persist = tuple(persist) if persist is not None else None
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)
        self._device: Optional[torch.device] = torch.device(device) if device is not None else None
        self._segments: "OrderedDict[Key, _SegmentState]" = OrderedDict()  # least recently used first
        self._active: Optional[Key] = None
        self.num_inits = 0
        """How many times ``init_fn`` was called (new or partially restored segments)."""

    # ------------------------------------------------------------------------------------------------ device
    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    @device.setter
    def device(self, device: Union[str, torch.device, None]) -> None:
        self._device = torch.device(device) if device is not None else None
        if self._device is not None:
            for st in self._segments.values():
                if st.resident:
                    self._place(st, self._device)

    def _apply(self, fn, recurse: bool = True):  # called by .to(), .cuda(), .cpu() of this module or its parents
        super()._apply(fn, recurse)
        self.device = self._device_probe.device
        return self

    def _place(self, st: _SegmentState, device: torch.device) -> None:
        if st.device == device:
            return
        st.tensors = {k: v.to(device) for k, v in st.tensors.items()}
        caches = {}
        for name, value in st.caches.items():
            moved = _move(value, device)
            if moved is not _DROP:
                caches[name] = moved
        st.caches = caches
        st.device = device

    def _evict(self) -> None:
        resident = [k for k, st in self._segments.items() if st.resident]  # LRU order
        excess = len(resident) - self.resident_segments
        for key in resident:
            if excess <= 0:
                break
            if key == self._active:
                continue
            st = self._segments[key]
            self._place(st, self.offload_device)
            st.resident = False
            excess -= 1

    # ------------------------------------------------------------------------------------------------ segments
    @staticmethod
    def _check(tensors: Any, key: Key) -> Dict[str, Tensor]:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"init_fn of segment {key} must return a dict of tensors, got {type(tensors).__name__}")
        out: Dict[str, Tensor] = {}
        for name, v in tensors.items():
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            if not isinstance(v, Tensor):
                raise TypeError(f"init_fn of segment {key}: '{name}' is a {type(v).__name__}, not a tensor")
            out[str(name)] = v.detach()
        if "offset" not in out and "means" in out:
            out["offset"] = torch.zeros_like(out["means"])
        return out

    def activate(self, scene_id: int, segment_id: int, init_fn: Callable[[], Mapping[str, Tensor]]) -> bool:
        """Make ``(scene_id, segment_id)`` the active segment; returns True if it is new (``init_fn()`` built it).

        A segment seen before gets its own tensors back, unchanged; ``init_fn`` is then only called when the segment
        was restored from a ``state_dict`` saved with ``persist`` (to rebuild the unsaved tensors).
        """
        key = (int(scene_id), int(segment_id))
        st = self._segments.get(key)
        is_new = st is None
        if st is None:
            tensors = self._check(init_fn(), key)
            self.num_inits += 1
            first = next(iter(tensors.values()), None)
            here = first.device if first is not None else torch.device("cpu")
            st = _SegmentState(tensors, device=here, home=self._device or here)
            self._segments[key] = st
        elif not st.complete:
            fresh = self._check(init_fn(), key)
            self.num_inits += 1
            fresh = {k: v.to(st.device) for k, v in fresh.items()}
            for name, saved in st.tensors.items():
                if name in fresh and fresh[name].shape != saved.shape:
                    raise ValueError(
                        f"segment {key}: saved '{name}' has shape {tuple(saved.shape)} but init_fn built "
                        f"{tuple(fresh[name].shape)} (the point cloud changed since the checkpoint?)"
                    )
                fresh[name] = saved
            st.tensors = fresh
            st.complete = True
        self._segments.move_to_end(key)
        self._active = key
        self._place(st, self._device or st.home)
        st.resident = True
        self._evict()
        return is_new

    @property
    def current_key(self) -> Optional[Key]:
        return self._active

    def _current_state(self) -> _SegmentState:
        if self._active is None:
            raise RuntimeError("no active segment: call activate(scene_id, segment_id, init_fn) first")
        return self._segments[self._active]

    @property
    def current(self) -> Dict[str, Tensor]:
        """The active segment's tensors (a live dict: in-place changes persist); raises without one."""
        return self._current_state().tensors

    def __dir__(self):
        # nerfstudio's viewer walks every public attribute of every module (getattr on each name, looking for
        # viewer elements); ``current`` and ``frozen_volume`` raise or hold per-segment data, so keep them out
        # of that walk. They stay ordinary attributes for code.
        return [n for n in super().__dir__() if n not in ("current", "frozen_volume")]

    def get(self, scene_id: int, segment_id: int) -> Dict[str, Tensor]:
        """A segment's tensors, wherever they are (does not activate it)."""
        return self._segments[(int(scene_id), int(segment_id))].tensors

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and (int(key[0]), int(key[1])) in self._segments

    def keys(self) -> List[Key]:
        """Segments held, least recently used first."""
        return list(self._segments)

    @property
    def num_segments(self) -> int:
        return len(self._segments)

    def resident_keys(self) -> List[Key]:
        """Segments whose tensors are on the compute device (least recently used first)."""
        return [k for k, st in self._segments.items() if st.resident]

    def device_of(self, scene_id: int, segment_id: int) -> torch.device:
        return self._segments[(int(scene_id), int(segment_id))].device

    def drop(self, scene_id: int, segment_id: int) -> None:
        key = (int(scene_id), int(segment_id))
        self._segments.pop(key, None)
        if self._active == key:
            self._active = None

    def clear(self) -> None:
        self._segments.clear()
        self._active = None

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of segment tensors per device."""
        out: Dict[str, int] = {}
        for st in self._segments.values():
            n = sum(v.numel() * v.element_size() for v in st.tensors.values())
            out[str(st.device)] = out.get(str(st.device), 0) + n
        return out

    # ------------------------------------------------------------------------------------------------ active helpers
    @torch.no_grad()
    def update_offset(self, index_or_mask: Tensor, values: Tensor) -> None:
        """Write ``values`` into the active segment's offset cache at ``index_or_mask`` (bool [N] or indices)."""
        off = self.current["offset"]
        idx = torch.as_tensor(index_or_mask, device=off.device)
        vals = values.detach().to(device=off.device, dtype=off.dtype)
        if idx.dtype == torch.bool:
            if idx.shape != off.shape[:1]:
                raise ValueError(f"offset mask of shape {tuple(idx.shape)} for {off.shape[0]} points")
            off[idx] = vals
        else:
            off[idx.long()] = vals

    def cached(self, name: str, fn: Callable[[], Any]) -> Any:
        """The active segment's cache ``name``, built by ``fn()`` the first time."""
        st = self._current_state()
        if name not in st.caches:
            st.caches[name] = fn()
        return st.caches[name]

    def set_cache(self, name: str, value: Any) -> None:
        self._current_state().caches[name] = value

    def get_cache(self, name: str, default: Any = None) -> Any:
        return self._current_state().caches.get(name, default)

    def clear_caches(self, name: Optional[str] = None) -> None:
        """Forget cache ``name`` (or all caches) of every segment."""
        for st in self._segments.values():
            if name is None:
                st.caches.clear()
            else:
                st.caches.pop(name, None)

    @property
    def frozen_volume(self) -> Any:
        """The active segment's frozen feature volume (cache ``"frozen_volume"``), or None."""
        return self.get_cache("frozen_volume")

    @frozen_volume.setter
    def frozen_volume(self, value: Any) -> None:
        self.set_cache("frozen_volume", value)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> Dict[str, Any]:
        """Plain checkpoint state: tensors (CPU copies), ints, bools, strings, lists, dicts."""
        segs = []
        for (sid, gid), st in self._segments.items():
            names = st.tensors.keys() if self.persist is None else [n for n in self.persist if n in st.tensors]
            caches = {}
            for name, value in st.caches.items():
                plain = _plain_cpu(value)
                if plain is not _DROP:
                    caches[name] = plain
            segs.append(
                {
                    "scene_id": int(sid),
                    "segment_id": int(gid),
                    "tensors": {n: st.tensors[n].detach().to("cpu", copy=True) for n in names},
                    "caches": caches,
                    "complete": bool(st.complete and self.persist is None),
                }
            )
        return {
            "format": FORMAT,
            "version": VERSION,
            "active": [int(x) for x in self._active] if self._active is not None else [],
            "segments": segs,
        }

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} state")
        if int(state.get("version", -1)) != VERSION:
            raise ValueError(f"{FORMAT} version {state.get('version')} is not supported (this is version {VERSION})")
        cpu = self.offload_device
        segments: "OrderedDict[Key, _SegmentState]" = OrderedDict()
        for s in state["segments"]:
            key = (int(s["scene_id"]), int(s["segment_id"]))
            tensors = {str(k): v.to(cpu) for k, v in s["tensors"].items()}
            caches = {str(k): _move(v, cpu) for k, v in s.get("caches", {}).items()}
            segments[key] = _SegmentState(tensors, caches, device=cpu, home=self._device or cpu, resident=False,
                                          complete=bool(s.get("complete", True)))
        self._segments = segments
        self._active = None
        active = state.get("active") or []
        if len(active) == 2:
            key = (int(active[0]), int(active[1]))
            st = self._segments.get(key)
            if st is not None and st.complete:
                self._segments.move_to_end(key)
                self._active = key
                self._place(st, self._device or st.home)
                st.resident = True
