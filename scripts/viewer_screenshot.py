"""Screenshot of ns-viewer on a checkpoint in headless Chromium (docs/images/viewer_synthetic.png).

usage: .venv/bin/python scripts/viewer_screenshot.py --load-config outputs/.../config.yml --out docs/images/viewer_synthetic.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser_helpers import ViewerProcess, find_chromium, open_browser, rendered_resolution, wait_until  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-config", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/images/viewer_synthetic.png"))
    ap.add_argument("--settle", type=float, default=25.0, help="seconds for the full-resolution render")
    args = ap.parse_args()
    found = find_chromium()
    if isinstance(found, str):
        sys.exit(found)
    with ViewerProcess(args.load_config) as viewer:
        driver = open_browser(*found)
        try:
            driver.get(viewer.url)
            wait_until(lambda: rendered_resolution(driver), 300, "render")
            time.sleep(args.settle)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(args.out)


if __name__ == "__main__":
    main()
