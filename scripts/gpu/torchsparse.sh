#!/usr/bin/env bash
# torchsparse 2.1, built from its source on the GPU machine, for the same-run U-Net comparison of issue 16
# (benchmarks/compare_sparse_backends.py; its code is never copied into this repository).
#
#   here:  bash scripts/gpu/torchsparse.sh prepare GIT_DIR SPARSEHASH_GIT_DIR
#          GIT_DIR: the bare mirror that the search tool's `fetch github:mit-han-lab/torchsparse` printed;
#          SPARSEHASH_GIT_DIR: `fetch github:sparsehash/sparsehash`'s (torchsparse's CPU hash map includes
#          <google/dense_hash_map>; the GPU machine has no libsparsehash-dev). Writes .gpu_extra/torchsparse.tgz (its
#          tree, ~1 MB), sparsehash_include.tgz (its installed headers, configured here) and the two pure-Python
#          wheels it imports (rootpath, backports.cached_property). Carry .gpu_extra along.
#   there: bash scripts/gpu/torchsparse.sh build             # FORCE_CUDA build into /tmp/site (~3 min on 16 cores)
#          bash scripts/gpu/torchsparse.sh compare [ARGS]    # ours (gather, Triton) and torchsparse, same input and
#                                                            # weights; ARGS go to compare_sparse_backends.py
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/../.."
case "${1:-}" in
prepare)
    src=${2:?give the torchsparse git directory that fetch printed}
    mkdir -p .gpu_extra  # ignored (.gitignore)
    git -C "$src" archive --format=tar.gz -o "$PWD/.gpu_extra/torchsparse.tgz" HEAD
    sh_src=${3:?give the sparsehash git directory that fetch printed}
    tmp=$(mktemp -d)
    git -C "$sh_src" archive HEAD | tar x -C "$tmp"
    (cd "$tmp" && chmod +x configure && ./configure -q --prefix="$tmp/inst" >/dev/null && make -s install >/dev/null 2>&1)
    tar czf .gpu_extra/sparsehash_include.tgz -C "$tmp/inst" include
    rm -rf "$tmp"
    python3 -m pip download -q --no-deps -d .gpu_extra rootpath backports.cached_property
    du -sh .gpu_extra ;;
build)
    source scripts/gpu/env.sh
    set -e  # env.sh ends with errexit off
    rm -rf /tmp/torchsparse_src /tmp/sparsehash && mkdir -p /tmp/torchsparse_src /tmp/sparsehash
    tar xzf .gpu_extra/sparsehash_include.tgz -C /tmp/sparsehash
    export CPATH=/tmp/sparsehash/include${CPATH:+:$CPATH}
    tar xzf .gpu_extra/torchsparse.tgz -C /tmp/torchsparse_src
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_extra/*.whl
    start=$(date +%s)
    (cd /tmp/torchsparse_src && FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site .)
    echo "torchsparse built in $(( $(date +%s) - start )) s"
    python3 -c "import torchsparse, torchsparse.backend; print('torchsparse', torchsparse.__version__)" ;;
compare)
    shift
    source scripts/gpu/env.sh
    python3 benchmarks/compare_sparse_backends.py --backends torch,triton,torchsparse "$@" ;;
*)
    sed -n 2,11p "$0"; exit 1 ;;
esac
