#!/usr/bin/env bash
# On the GPU machine: the whole test suite, GPU-marked tests included (tests needing open3d skip there).
source scripts/gpu/env.sh
python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
