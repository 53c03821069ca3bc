# Two commands for a newcomer on a fresh machine:
#   make demo   - set up .venv, generate the synthetic driving scenes, run the main job on them
#   make test   - set up .venv, run the whole CPU test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic

.PHONY: demo test install sysdeps clean-data

# open3d (imported where point clouds are processed) needs Debian's libusb-1.0-0.
sysdeps:
	@if ! ldconfig -p | grep -q 'libusb-1.0.so.0'; then \
		if [ "$$(id -u)" = "0" ]; then \
			echo "installing libusb-1.0-0 (needed by open3d)"; \
			apt-get update -qq && apt-get install -y -qq libusb-1.0-0 >/dev/null; \
		else \
			echo "open3d needs libusb-1.0-0: run 'sudo apt-get install -y libusb-1.0-0'"; exit 1; \
		fi; \
	fi
	@# headless Chromium for the browser viewer test (tests/test_viewer_browser.py skips, saying why, without it)
	@if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
			echo "installing chromium + chromium-driver (browser viewer test)"; \
			{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
				|| echo "chromium could not be installed: the browser viewer test will be skipped"; \
		else \
			echo "chromium not installed (needs root + apt): the browser viewer test will be skipped"; \
		fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

install: sysdeps $(VENV)/.installed

demo: install
	@bash scripts/demo.sh "$(DATA)"

test: install
	$(PY) -m pytest -q

clean-data:
	rm -rf $(DATA)
