"""Driving nerfstudio's browser viewer from tests: ``ns-viewer`` on a loopback port, headless Chromium via Selenium.

Used by ``tests/test_viewer_browser.py`` and ``scripts/viewer_screenshot.py`` (the screenshot in docs/).
Chromium and its driver are Debian's ``chromium`` / ``chromium-driver`` (``make sysdeps`` installs them as root).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--mute-audio"]
_URL = re.compile(r"HTTP\W+(http://[0-9.]+:\d+)")
_RES = re.compile(r"Resolution: (\d+)x(\d+)px")


def find_chromium() -> Union[Tuple[str, str], str]:
    """(chromium binary, chromedriver) or the reason why a browser test cannot run here."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    binary = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.access(p, os.X_OK)),
                  None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "")
                   if p and os.access(p, os.X_OK)), None)
    if binary is None or driver is None:
        return ("Chromium is not installed: the Debian packages chromium and chromium-driver are needed "
                "('make sysdeps' installs them as root; apt-get failed or this is not root)")
    return binary, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ViewerProcess:
    """``ns-viewer --load-config CONFIG`` on 127.0.0.1 in its own process group, always killed on exit."""

    def __init__(self, config: Path, startup_timeout: float = 300.0, extra_args=()):
        self.config = Path(config)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="ns-viewer-", suffix=".log", delete=False)

    def __enter__(self) -> "ViewerProcess":
        exe = Path(sys.executable).parent / "ns-viewer"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nerfstudio.scripts.viewer.run_viewer"]
        cmd += ["--load-config", str(self.config), "--viewer.websocket-host", "127.0.0.1",
                "--viewer.websocket-port", str(free_port()), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", TERM="dumb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        try:
            self.url = self._wait_for_url()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def _wait_for_url(self) -> str:
        t0 = time.time()
        while time.time() - t0 < self.startup_timeout:
            m = _URL.search(self.log())  # viser's own banner has the port it really bound (it moves on if taken)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ns-viewer exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"ns-viewer did not start in {self.startup_timeout:.0f} s:\n{self.log()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


def open_browser(binary: str, driver_path: str, width: int = 1200, height: int = 800):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for a in CHROMIUM_ARGS + [f"--window-size={width},{height}"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(120)
    return driver


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except Exception:  # noqa: BLE001 - the page is still being built
        return ""


def rendered_resolution(driver) -> Optional[Tuple[int, int]]:
    """The viewer's "Resolution: WxHpx" line (updated each time a render is sent to the browser); None before."""
    m = _RES.search(page_text(driver))
    if not m or m.group(1) == "0":
        return None
    return int(m.group(1)), int(m.group(2))


def wait_until(cond, timeout: float, what: str, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def screenshot(driver) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))


def viewport_box(driver) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the 3D view in screenshot pixels: the canvas, left of the control panel."""
    from selenium.webdriver.common.by import By

    r = driver.find_element(By.TAG_NAME, "canvas").rect
    x0, y0, x1, y1 = int(r["x"]), int(r["y"]), int(r["x"] + r["width"]), int(r["y"] + r["height"])
    for el in driver.find_elements(By.CSS_SELECTOR, ".mantine-Paper-root"):
        pr = el.rect  # the floating control panel covers the right of the canvas
        if pr["width"] > 100 and pr["height"] > 100 and pr["x"] > x0 + (x1 - x0) / 3:
            x1 = min(x1, int(pr["x"]))
    scale = driver.execute_script("return window.devicePixelRatio") or 1
    return tuple(int(round(v * scale)) for v in (x0, y0, x1, y1))


def _text(el) -> str:
    return (el.get_attribute("textContent") or "").strip()  # .text is empty while the list is still animating


def _options(driver, box) -> list:
    """The items of this dropdown's open list (other dropdowns' lists may stay in the page)."""
    from selenium.webdriver.common.by import By

    lid = box.get_attribute("aria-controls")
    if not lid:
        return []
    lists = driver.find_elements(By.ID, lid)
    return lists[0].find_elements(By.CSS_SELECTOR, "[role=option]") if lists else []


def choose_dropdown(driver, label: str, option: str) -> None:
    """Pick ``option`` in the viser dropdown labelled ``label`` the way a person does: click, then click the item."""
    from selenium.webdriver.common.by import By

    lab = driver.find_element(By.XPATH, f"//label[normalize-space(text())='{label}']")
    box = driver.find_element(By.ID, lab.get_attribute("for"))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    item = wait_until(lambda: [e for e in _options(driver, box) if _text(e) == option], 30,
                      f"option {option!r} in {label!r}")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'});", item)
    time.sleep(0.5)
    driver.execute_script("arguments[0].click();", item) if not item.is_displayed() else item.click()
    wait_until(lambda: box.get_attribute("value") == option, 30, f"{label!r} showing {option!r}")


def dropdown_options(driver, label: str) -> list:
    from selenium.webdriver.common.by import By

    lab = driver.find_element(By.XPATH, f"//label[normalize-space(text())='{label}']")
    box = driver.find_element(By.ID, lab.get_attribute("for"))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    opts = wait_until(lambda: [_text(e) for e in _options(driver, box)],
                      30, f"options of {label!r}")
    from selenium.webdriver.common.keys import Keys

    box.send_keys(Keys.ESCAPE)
    return opts
