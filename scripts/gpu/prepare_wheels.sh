#!/usr/bin/env bash
# On this (CPU) machine: download what the GPU machine lacks into .whl/ (Python 3.12 wheels of nerfstudio,
# gsplat, ... plus the prebuilt gsplat CUDA extension), see ../shared/device/README.md. Send .whl along
# (carry) with every GPU run; scripts/gpu/env.sh installs it there.
#   bash scripts/gpu/prepare_wheels.sh            # + hypothesis (the property tests)
#   bash scripts/gpu/prepare_wheels.sh --real     # + pandas instead (raw PandaSet sweeps; bench_real), 12 MB more
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if [ "${1:-}" = "--real" ]; then
    bash ../shared/device/wheels.sh pandas python-dateutil pytz tzdata six
else
    bash ../shared/device/wheels.sh hypothesis
fi
