"""Live inspection in nerfstudio's browser viewer, for a feed-forward model.

* ``ns-viewer --load-config`` on a small checkpoint, opened in headless Chromium: a render arrives, the 3D view
  clearly differs from the empty viewer, the segment's camera frustums are drawn, and picking another segment in
  the "Segment to display" dropdown (and another output layer) changes the picture. Skipped, with the reason,
  only where Chromium cannot be installed (``make sysdeps`` installs Debian's chromium + chromium-driver as root).
* During training with the viewer on (no browser): the displayed segment follows training until one is picked,
  then is reconstructed again every ``viewer_refresh_every`` steps; its frustums are drawn once per segment.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import small_trainer_config, synthetic_root

from browser_helpers import (ViewerProcess, choose_dropdown, dropdown_options, find_chromium, open_browser,
                             rendered_resolution, screenshot, viewport_box, wait_until)

SEGMENT = "Segment to display"
SOURCE_RGB = np.array([255, 140, 0])  # evolsplat_ns.pipeline.viewer.SOURCE_COLOUR
TARGET_RGB = np.array([40, 150, 255])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthetic_root(tmp_path_factory, "viewer", 3, 7, 48, 144, num_cameras=3)


def small_config(data_root, out_dir, **trainer):
    trainer.setdefault("steps_per_save", 1_000_000)
    return small_trainer_config(data_root, out_dir, bg_num_points=2000, max_points=3000,
                                device="cuda" if torch.cuda.is_available() else "cpu", no_periodic_eval=True,
                                **trainer)


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    """config.yml of a 2-step run (the final checkpoint is written when training ends)."""
    from nerfstudio.engine.trainer import Trainer

    cfg = small_config(data_root, tmp_path_factory.mktemp("ckpt"), max_num_iterations=2)
    cfg.save_config()
    trainer = Trainer(cfg, local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    assert list(cfg.get_checkpoint_dir().glob("*.ckpt"))
    return cfg.get_base_dir() / "config.yml"


def _crop(img: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    return img[y0 + h // 10: y1 - h // 10, x0 + w // 8: x1 - w // 20].astype(np.float64)  # not the axes gizmo


def _near(img: np.ndarray, rgb: np.ndarray, tol: float = 90.0) -> int:
    """Pixels of about this colour (frustum lines are shaded and anti-aliased)."""
    return int((np.abs(img - rgb).max(-1) < tol).sum())


def test_browser_shows_the_segment_and_switches_it(checkpoint, tmp_path):
    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(found)
    binary, driver_path = found
    with ViewerProcess(checkpoint) as viewer:
        driver = open_browser(binary, driver_path)
        try:
            driver.get(viewer.url)
            # The viewer's status line says "Resolution: 0x0px" until the first render reaches this browser.
            wait_until(lambda: "Resolution:" in (t := driver.find_element("tag name", "body").text) and t, 180,
                       "viewer GUI")
            empty = screenshot(driver)
            empty_is_empty = rendered_resolution(driver) is None  # still no render after the screenshot
            wait_until(lambda: rendered_resolution(driver), 300, "render in the browser")
            time.sleep(3)  # the image is decoded and drawn, the camera placed at the segment, a second render sent
            wait_until(lambda: rendered_resolution(driver), 300, "render in the browser")
            time.sleep(2)
            first = screenshot(driver)
            box = viewport_box(driver)
            from PIL import Image

            Image.fromarray(first).save(tmp_path / "first.png")
            view = _crop(first, box)
            # the scene is visible: a textured picture, not the viewer's flat dark background
            assert view.std() > 20, view.std()
            assert view.mean() > 40, view.mean()
            if empty_is_empty:
                blank = _crop(empty, box)
                assert blank.std() < view.std() / 2, (blank.std(), view.std())
                assert np.abs(view - blank).mean() > 20
            # the displayed segment's source (orange) and target (blue) frustums are in the 3D view
            assert _near(view, SOURCE_RGB) > 20 and _near(view, TARGET_RGB) > 20, (
                _near(view, SOURCE_RGB), _near(view, TARGET_RGB))

            options = dropdown_options(driver, SEGMENT)
            assert options[0].startswith("eval") and any(o.startswith("train") for o in options), options
            other = next(o for o in options if o.startswith("train") and "segment 0" not in o)
            choose_dropdown(driver, SEGMENT, other)

            def changed():
                return bool(np.abs(_crop(screenshot(driver), box) - view).mean() > 8)

            wait_until(changed, 300, "new picture after picking another segment", poll=2.0)
            time.sleep(3)
            second = _crop(screenshot(driver), box)
            assert second.std() > 20
            assert np.abs(second - view).mean() > 8

            # a render layer: depth through the viewer's colormap looks nothing like the rgb composite
            choose_dropdown(driver, "Output type", "depth")
            wait_until(lambda: np.abs(_crop(screenshot(driver), box) - second).mean() > 8, 300,
                       "depth layer in the browser", poll=2.0)
        except BaseException:
            try:
                driver.save_screenshot(str(tmp_path / "failure.png"))
            finally:
                print(viewer.log()[-4000:])
            raise
        finally:
            driver.quit()


def test_viewer_refresh_during_training(data_root, tmp_path):
    """ns-train with the viewer on (loopback, no browser): follow training, then refresh the picked segment."""
    from nerfstudio.engine.trainer import Trainer
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    from browser_helpers import free_port
    from evolsplat_ns.pipeline.viewer import VISER_SCALE

    assert VISER_SCALE == VISER_NERFSTUDIO_SCALE_RATIO
    cfg = small_config(data_root, tmp_path / "t", max_num_iterations=7)
    cfg.vis = "viewer"
    cfg.viewer.websocket_host = "127.0.0.1"
    cfg.viewer.websocket_port = free_port()
    cfg.viewer.quit_on_train_completion = True
    cfg.viewer.max_num_display_images = 4
    cfg.pipeline.viewer_refresh_every = 3
    cfg.save_config()  # what ns-train does first (the viewer writes its log next to it)
    trainer = Trainer(cfg, local_rank=0, world_size=1)
    try:
        trainer.setup()
        pipe = trainer.pipeline
        cams = pipe.viewer_cameras
        assert cams.active  # the viewer found the control on the pipeline and handed it its viser server
        dd = pipe.viewer_segment
        label = [o for o in dd.options if o.startswith("eval")][-1]
        key = pipe.display.picker.labels[label]
        shows, seen = [], {}
        show, update = pipe.display.show, trainer._update_viewer_state

        def counted_show(sid, seg):
            shows.append((pipe.train_step.shared_extractions, sid, seg))  # train steps so far
            return show(sid, seg)

        def gui_pick():
            # A change of the dropdown's value runs its callbacks on viser's executor thread, as a browser's pick
            # does (the viewer's wrapper takes the train lock there). Calling the hook here as well would pick
            # twice, the second time at a moment the load decides (a second reconstruction: flaky under load).
            dd.value = label
            deadline = time.monotonic() + 60
            while pipe.display.picker.choice != key and time.monotonic() < deadline:
                time.sleep(0.01)

        def between_steps(step):  # the trainer calls this outside its train lock, after each iteration
            update(step)
            if step == 1:  # after two steps that followed training, a segment is picked in the dropdown
                seen.update(display=pipe.ff_model.displayed_segment, drawn=cams.key, draws=cams.draws,
                            handles=len(cams._handles),
                            hidden=all(not h.visible for h in trainer.viewer_state.camera_handles.values()))
                gui = threading.Thread(target=gui_pick, daemon=True)
                gui.start()
                gui.join(timeout=60)
                assert not gui.is_alive(), "the GUI callback did not get the train lock between two steps"

        pipe.display.show, trainer._update_viewer_state = counted_show, between_steps
        trainer.train()  # steps 0..6
        assert seen["display"] == seen["drawn"] and seen["draws"] >= 1 and seen["handles"] > 0
        assert seen["hidden"]  # nerfstudio's own training-camera frustums are hidden once ours are drawn
        # steps 0, 1 followed training; picked between steps 1 and 2, shown after step 2 (the first iteration after
        # the pick), refreshed after steps 3 and 6 (viewer_refresh_every = 3)
        assert shows == [(3, *key), (4, *key), (7, *key)], shows
        assert pipe.ff_model.displayed_segment == key and cams.key == key
        draws = cams.draws
        pipe.display.show = show
        pipe.display.show(*key)  # a refresh of the same segment does not redraw its cameras
        assert cams.draws == draws
        batch = pipe.datamanager.eval_batch(*key)
        names = list(trainer.viewer_state.viser_server.scene._handle_from_node_name)
        assert sum(n.startswith("/segment/source/") for n in names) == len(batch.source)
        assert sum(n.startswith("/segment/target/") for n in names) == len(batch.target)
    finally:
        trainer.shutdown()


def test_viewer_depth_layer_counts_the_dome(checkpoint):
    """get_outputs_for_camera: the viewer's layers; depth is the composite's, so sky pixels are far, not at 0."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipe, _, _ = eval_setup(checkpoint, test_mode="test")
    cams = pipe.datamanager.train_dataset.cameras[0:1]
    out = pipe.model.get_outputs_for_camera(cams)
    assert {"rgb", "foreground", "background", "depth", "accumulation"} <= set(out)
    a, d = out["accumulation"], out["depth"]
    radius = pipe.ff_model.config.bg_radius
    assert torch.all(d > 0) and torch.all(d <= radius + 1e-3)
    empty = a[..., 0] < 1e-3
    if empty.any():
        assert torch.allclose(d[empty], torch.full_like(d[empty], radius), rtol=1e-3)
