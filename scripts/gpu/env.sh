#!/usr/bin/env bash
# On the GPU machine, sourced at the start of every command:
#   source scripts/gpu/env.sh && <command>
# Installs the carried wheels into /tmp/site, reuses the prebuilt gsplat CUDA build instead of compiling it,
# and installs this project there so that nerfstudio finds the plugin's entry points.
set -e
if [ ! -f /tmp/site/.evolsplat_ready ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    bash .whl/use_prebuilt_gsplat.sh /tmp/site .whl/gsplat_cuda-*.so
    # nerfstudio finds methods through installed entry points: install the project itself there too.
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null 2>&1 \
        || echo "project install failed; falling back to NERFSTUDIO_*_CONFIGS"
    touch /tmp/site/.evolsplat_ready
fi
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1
if ! ls /tmp/site/evolsplat_ns-*.dist-info >/dev/null 2>&1; then
    export NERFSTUDIO_METHOD_CONFIGS="evolsplat-ff=evolsplat_ns.configs:evolsplat_ff,evolsplat-ff-small=evolsplat_ns.configs:evolsplat_ff_small"
    export NERFSTUDIO_DATAPARSER_CONFIGS="evolsplat-multiscene=evolsplat_ns.data.registration:evolsplat_multiscene"
fi
set +e
