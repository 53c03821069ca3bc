#!/usr/bin/env bash
# On this (CPU) machine: download what the GPU machine lacks into .whl/ (Python 3.12 wheels of nerfstudio,
# gsplat, ... plus the prebuilt gsplat CUDA extension), see ../shared/device/README.md. Send .whl along
# (carry) with every GPU run; scripts/gpu/env.sh installs it there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/device/wheels.sh hypothesis
