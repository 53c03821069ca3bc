"""What nerfstudio's browser viewer shows of a feed-forward model, besides the render itself.

A feed-forward model has no single scene: :class:`SegmentDisplay` owns the pipeline's "Segment to display"
dropdown; the picked segment is reconstructed from its fixed evaluation views and cached until the next refresh.
:class:`SegmentCameras` (a nerfstudio ``ViewerControl``, found on the pipeline by the viewer, which hands it its
viser server) adds the displayed segment's cameras to the 3D scene:

* the source cameras (orange) and the target cameras (blue) as frustums carrying their images, under
  ``/segment/...`` in viser's scene tree; they are replaced when the displayed segment changes (not on a refresh
  of the same segment);
* the browser camera is placed 3 m behind and 1.5 m above the segment's first source camera, looking down the
  segment, when a browser connects and when a segment is picked in the dropdown (not when the view follows
  training);
* nerfstudio's own training-camera frustums (every frame of every training scene, all scenes sharing one
  origin) are hidden once ours are drawn; the viewer's "Show Train Cams" button brings them back.

:class:`SegmentPicker` hands the dropdown's choice from the GUI thread to the training thread (a lock, a pending
flag); :meth:`SegmentDisplay.after_train_iteration`, a training callback that runs after each train iteration (never
inside the train step), applies it: a new pick is reconstructed at the next such point, and the picked segment is refreshed every
``viewer_refresh_every`` steps; without a pick the display follows training. Between training steps (paused, or
finished) the next render applies the pick instead.

Everything here is a no-op until the viewer has set the control up (ns-eval, tests and training without the
viewer pay nothing). Drawing costs one small image upload per camera, only when the displayed segment changes.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerDropdown

#: nerfstudio.viewer.viewer.VISER_NERFSTUDIO_SCALE_RATIO (viser scene units per metre); importing that module pulls
#: in the whole viewer, so the constant is repeated here and checked by a test.
VISER_SCALE = 10.0

SOURCE_COLOUR = (255, 140, 0)
TARGET_COLOUR = (40, 150, 255)
CPU_MAX_RES = 256
"""Initial "Max res" of the viewer's renders when the model runs on the CPU (nerfstudio's default is 512)."""


class SegmentPicker:
    """The viewer's "Segment to display" choice, handed from the GUI thread to the training / render thread.

    ``labels`` maps a dropdown label to ``(scene_id, segment_id)``. :meth:`pick` (GUI thread) records a choice and
    marks it pending; :meth:`due` (training thread, after a train iteration) says which segment to reconstruct now.
    Both take a lock of their own, so neither waits on training, nor training on them."""

    def __init__(self, labels: Dict[str, Tuple[int, int]]) -> None:
        self.labels = dict(labels)
        self._lock = threading.Lock()
        self._choice: Optional[Tuple[int, int]] = None
        self._pending = False

    def pick(self, label: str) -> Tuple[int, int]:
        """Record the dropdown's choice (any thread); returns its key."""
        key = self.labels[label]
        with self._lock:
            self._choice, self._pending = key, True
        return key

    @property
    def choice(self) -> Optional[Tuple[int, int]]:
        """The picked ``(scene_id, segment_id)``; None while the display follows training."""
        with self._lock:
            return self._choice

    def take(self) -> Tuple[Optional[Tuple[int, int]], bool]:
        """``(choice, was it pending)``, clearing the pending mark (the caller reconstructs it now)."""
        with self._lock:
            pending, self._pending = self._pending, False
            return self._choice, pending

    def due(self, step: int, refresh_every: int) -> Optional[Tuple[int, int]]:
        """The picked segment if it must be reconstructed after train step ``step``: newly picked, or every
        ``refresh_every`` steps (with the current weights); else None (also when nothing is picked)."""
        choice, pending = self.take()
        if choice is not None and (pending or step % max(1, int(refresh_every)) == 0):
            return choice
        return None


def segment_labels(datamanager) -> Dict[str, Tuple[int, int]]:
    """Dropdown label -> ``(scene_id, segment_id)`` of every segment, evaluation scenes first."""
    dm = datamanager
    out: Dict[str, Tuple[int, int]] = {}
    for role, ids in (("eval", dm.eval_scene_ids), ("train", dm.train_scene_ids)):
        for sid in ids:
            for seg in dm.index[sid].segments:
                out[f"{role} · scene {sid} ({dm.scenes[sid].name}) · segment {seg.segment_id}"] = (sid, seg.segment_id)
    return out


class SegmentDisplay:
    """Which reconstruction the viewer (and ns-eval's renders through ``get_outputs_for_camera``) shows.

    Args:
        model: the feed-forward model; its ``display_provider`` becomes :meth:`show_default`.
        datamanager: gives the segments, their labels and their fixed evaluation batches.
        reconstruct: ``batch -> shared state``, reconstructing the batch's segment and making it the model's display
            (the pipeline's ``reconstruct``).
        refresh_every: a picked segment is reconstructed again every this many train steps (current weights).

    The pipeline exposes :attr:`dropdown` and :attr:`cameras` as its own attributes: nerfstudio's viewer finds its
    GUI elements and controls only there.
    """

    def __init__(self, model, datamanager, reconstruct: Callable[[Any], Any], refresh_every: int) -> None:
        self.model, self.datamanager = model, datamanager
        self.reconstruct, self.refresh_every = reconstruct, int(refresh_every)
        self.picker = SegmentPicker(segment_labels(datamanager))
        labels = list(self.picker.labels)
        self.dropdown = ViewerDropdown("Segment to display", labels[0], labels, cb_hook=self._on_pick)
        self.cameras = SegmentCameras()
        self._last_trained: Optional[Tuple[Any, Any]] = None
        model.display_provider = self.show_default

    def _on_pick(self, element) -> None:
        """GUI thread: only record the choice; the reconstruction runs on the training / rendering thread."""
        self.picker.pick(element.value)
        self.cameras.request_move()  # browsers look at the picked segment once it is shown
        # The next render reconstructs it (or the next training callback, whichever comes first): this also works
        # when training is paused or finished. The viewer runs this callback under its train lock.
        self.model.clear_display()

    def show_default(self) -> None:
        """Nothing displayed yet: the picked segment, else the first evaluation segment."""
        choice, _ = self.picker.take()
        self.show(*(choice or self.datamanager.eval_keys()[0]))

    @torch.no_grad()
    def show(self, scene_id: int, segment_id: int):
        """Reconstruct (scene, segment) from its fixed evaluation views and make it what the viewer renders."""
        batch = self.datamanager.eval_batch(scene_id, segment_id)
        shared = self.reconstruct(batch)
        self.cameras.show(batch, (scene_id, segment_id))  # no-op without a viewer or if already drawn
        return shared

    def trained(self, shared, batch) -> None:
        """The train step's result (detached): what the display follows while nothing is picked."""
        self._last_trained = (shared, batch)

    def after_train_iteration(self, step: int) -> None:
        """Training callback, after each train iteration: follow training, or show the picked segment
        (reconstructed when newly picked, refreshed every ``refresh_every`` steps)."""
        if self.picker.choice is None:
            if self._last_trained is not None:
                shared, batch = self._last_trained
                key = (batch.scene_id, batch.segment_id)
                self.model.set_display(shared, key)
                self.cameras.show(batch, key)  # draws only on a new segment
            return
        key = self.picker.due(step, self.refresh_every)
        if key is not None:
            self.show(*key)


def _views_to_numpy(views, image_height: int) -> List[Dict[str, Any]]:
    """Per view: OpenCV c2w [4, 4], vertical fov, aspect and the image resized to ``image_height`` rows (uint8)."""
    img = views.image  # [V, H, W, 3] in [0, 1]
    V, H, W = img.shape[0], img.shape[1], img.shape[2]
    h = max(8, min(int(image_height), H))
    w = max(8, int(round(W * h / H)))
    small = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear",
                                            align_corners=False, antialias=True)
    small = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    c2w = views.extrinsics.detach().double().cpu().numpy()
    K = views.intrinsics.detach().double().cpu().numpy()
    return [{"c2w": c2w[i], "fov": 2.0 * math.atan(0.5 * H / K[i, 1, 1]), "aspect": W / H, "image": small[i]}
            for i in range(V)]


def home_pose(source_c2w: np.ndarray, back: float = 3.0, up: float = 1.5, ahead: float = 8.0
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A viewpoint that shows a segment: ``back`` m behind and ``up`` m above its first source camera, looking at a
    point ``ahead`` m in front of the mean source camera. Returns (position, look_at, up direction), metres,
    in the data's world frame (OpenCV camera axes: y is down)."""
    c0 = source_c2w[0]
    R0, t0 = c0[:3, :3], c0[:3, 3]
    fwd, up_dir = R0[:, 2], -R0[:, 1]
    centre = source_c2w[:, :3, 3].mean(0)
    fwd_mean = source_c2w[:, :3, 2].mean(0)
    fwd_mean = fwd_mean / max(np.linalg.norm(fwd_mean), 1e-9)
    return t0 - back * fwd + up * up_dir, centre + ahead * fwd_mean, up_dir


class SegmentCameras(ViewerControl):
    """Frustums of the displayed segment's source and target cameras, and the browser camera's home pose."""

    def __init__(self, image_height: int = 96, frustum_scale: float = 0.5) -> None:
        self.image_height = image_height
        """Rows of the images drawn on the frustums (they are uploaded to every browser)."""
        self.frustum_scale = frustum_scale
        """Frustum size in metres."""
        self.viewer = None
        self.viser_server = None
        self.key: Optional[Tuple[int, int]] = None
        """The segment whose cameras are drawn."""
        self.draws = 0
        self._handles: List[Any] = []
        self._home: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self._move_pending = False
        self._placed: Set[int] = set()
        self._train_cams_hidden = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- nerfstudio hook
    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        self.viser_server.on_client_connect(self._on_connect)
        model = viewer.get_model()
        panel = getattr(viewer, "control_panel", None)
        if panel is not None and getattr(model, "device", torch.device("cpu")).type == "cpu":
            # The PyTorch rasterizer needs seconds for a 512-pixel frame: start the resolution slider lower.
            panel._max_res.value = min(panel.max_res, CPU_MAX_RES)

    @property
    def active(self) -> bool:
        """True once a viewer has set this control up."""
        return self.viser_server is not None

    def _on_connect(self, client) -> None:
        # The client's camera state is known only after its first camera message: place it then.
        @client.camera.on_update
        def _(camera) -> None:
            if client.client_id not in self._placed and self._home is not None:
                self._place(client)

    # ------------------------------------------------------------------------------------------- called by the pipeline
    def request_move(self) -> None:
        """Move every browser camera to the next displayed segment's home pose (a segment was picked)."""
        self._move_pending = True

    def show(self, batch, key: Tuple[int, int]) -> bool:
        """Draw the cameras of ``batch`` (the displayed segment ``key``) if that segment is not drawn yet.

        Called on the training / rendering thread after a reconstruction; returns True if it drew.
        """
        if not self.active:
            return False
        move = self._move_pending
        if key == self.key and not move:
            return False
        src = _views_to_numpy(batch.source, self.image_height)
        tgt = _views_to_numpy(batch.target, self.image_height)
        server = self.viser_server
        with self._lock:
            self._move_pending = False
            self._home = home_pose(np.stack([v["c2w"] for v in src]))
            if key != self.key:
                self._draw(server, src, tgt)
                self.key = key
            if move:
                self._placed.clear()
            clients = server.get_clients()
        for client in clients.values():
            if client.client_id not in self._placed:
                self._place(client)
        return True

    # ------------------------------------------------------------------------------------------- viser
    def _draw(self, server, src, tgt) -> None:
        import viser.transforms as vtf

        with server.atomic():
            for h in self._handles:
                h.remove()
            self._handles = []
            for role, views, colour in (("source", src, SOURCE_COLOUR), ("target", tgt, TARGET_COLOUR)):
                for i, v in enumerate(views):
                    c2w = v["c2w"]
                    self._handles.append(server.scene.add_camera_frustum(
                        f"/segment/{role}/{i:02d}", fov=float(v["fov"]), aspect=float(v["aspect"]),
                        scale=self.frustum_scale * VISER_SCALE, color=colour, image=v["image"], format="jpeg",
                        jpeg_quality=85, wxyz=vtf.SO3.from_matrix(c2w[:3, :3]).wxyz,
                        position=c2w[:3, 3] * VISER_SCALE))
        self.draws += 1
        self._hide_train_cameras()

    def _hide_train_cameras(self) -> None:
        """nerfstudio draws every training frame of every scene (all sharing one origin): hide them once."""
        viewer = self.viewer
        handles = getattr(viewer, "camera_handles", None)
        if self._train_cams_hidden or not handles:
            return
        for h in handles.values():
            h.visible = False
        if hasattr(viewer, "hide_images") and hasattr(viewer, "show_images"):
            viewer.hide_images.visible = False
            viewer.show_images.visible = True
        self._train_cams_hidden = True

    def _place(self, client) -> None:
        home = self._home
        if home is None:
            return
        try:
            client.camera.update_timestamp  # noqa: B018 - raises until the client has sent its camera
        except AssertionError:
            return  # not yet: the client's first camera message places it (_on_connect)
        pos, look, up = (np.asarray(x, dtype=np.float64) for x in home)
        with client.atomic():
            client.camera.position = pos * VISER_SCALE
            client.camera.look_at = look * VISER_SCALE
            client.camera.up_direction = up
        self._placed.add(client.client_id)
