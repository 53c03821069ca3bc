#!/usr/bin/env bash
# On the GPU machine: bring spconv in from the parts made by scripts/gpu/prepare_spconv.sh, which arrive over
# several runs (each run carries at most 64 MiB; /tmp survives between runs only while the machine stays warm).
#
#   bash scripts/gpu/spconv.sh stash     copy the .spconv/part_* (and .sha256) carried by this run to /tmp/spconv_parts/
#   bash scripts/gpu/spconv.sh install   stash, then - once every part is there - join them, check the sha256, untar
#                                        and `pip install --no-index --no-deps --target /tmp/site` the wheels, and
#                                        smoke-test `import spconv.pytorch` (plus one small convolution on CUDA)
#   bash scripts/gpu/spconv.sh status    what is stashed, what is missing, whether spconv is installed
#
# /tmp/site is where scripts/gpu/env.sh installs the project's other wheels (PYTHONPATH=/tmp/site:$PWD); either
# order works. Exit status: 0 when done (install: spconv imports), 2 when parts are still missing, 1 on an error.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/../.."
PARTS=${SPCONV_PARTS:-/tmp/spconv_parts}
SITE=${SPCONV_SITE:-/tmp/site}
PY=${PYTHON:-python3}
SUMS=spconv_wheels.sha256

stash() {
    mkdir -p "$PARTS"
    local n=0
    for f in .spconv/part_* .spconv/$SUMS; do
        [ -f "$f" ] || continue
        cp -f "$f" "$PARTS/" && n=$((n + 1))
    done
    echo "stashed $n file(s) from .spconv/ into $PARTS"
}

# prints the missing parts (none: all there with the right sizes); returns 1 when the sha256 file is missing
missing() {
    if [ ! -f "$PARTS/$SUMS" ]; then
        echo "  $SUMS (send it along with any part)"
        return 1
    fi
    local name size have
    while read -r _ kind name size; do
        [ "$kind" = part ] || continue
        have=$(stat -c %s "$PARTS/$name" 2>/dev/null || echo 0)
        [ "$have" = "$size" ] || echo "  $name ($size bytes expected, $have here)"
    done < <(grep '^# part ' "$PARTS/$SUMS")
}

smoke() {
    PYTHONPATH=$SITE:$PWD "$PY" - <<'EOF'
import time
t = time.perf_counter()
import torch
import spconv
import spconv.pytorch as spconv_torch
from spconv.cppconstants import CPU_ONLY_BUILD
import spconv.constants as C
print(f"spconv {spconv.__version__} imported in {time.perf_counter() - t:.1f} s; CPU_ONLY_BUILD={CPU_ONLY_BUILD}; "
      f"SPCONV_ALLOW_TF32={C.SPCONV_ALLOW_TF32}")
if torch.cuda.is_available():
    g = torch.Generator().manual_seed(0)
    c = torch.unique(torch.randint(0, 32, (4000, 3), generator=g), dim=0)
    idx = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), c.int()], 1).cuda()
    x = spconv_torch.SparseConvTensor(torch.randn(len(c), 8, device="cuda"), idx, [32, 32, 32], 1)
    conv = spconv_torch.SubMConv3d(8, 16, 3, padding=1, bias=False).cuda()
    y = conv(x)
    y.features.square().sum().backward()
    torch.cuda.synchronize()
    print(f"SubMConv3d on CUDA ({conv.algo}): {tuple(y.features.shape)} OK")
EOF
}

status() {
    echo "stashed in $PARTS:"
    ls -l "$PARTS" 2>/dev/null | tail -n +2 | awk '{printf "  %-24s %10s\n", $9, $5}'
    echo "missing:"
    local m
    m=$(missing)
    echo "${m:-  nothing}"
    if [ -f "$SITE/.spconv_ready" ]; then echo "spconv installed in $SITE"; else echo "spconv not installed"; fi
}

install() {
    stash
    if [ -f "$SITE/.spconv_ready" ] && smoke; then
        echo "spconv already installed in $SITE"
        return 0
    fi
    local m
    m=$(missing)
    if [ -n "$m" ]; then
        echo "NOT INSTALLED: parts still missing (send them along and run 'stash' or 'install' again):"
        echo "$m"
        return 2
    fi
    local tar=/tmp/spconv_wheels.tar
    : > "$tar"
    local name
    for name in $(grep '^# part ' "$PARTS/$SUMS" | cut -d' ' -f3); do
        cat "$PARTS/$name" >> "$tar" || return 1
    done
    local want got
    want=$(head -n1 "$PARTS/$SUMS" | cut -d' ' -f1)
    got=$(sha256sum "$tar" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then
        echo "sha256 mismatch: $got, expected $want; parts in $PARTS:"
        ls -l "$PARTS"
        return 1
    fi
    echo "sha256 OK ($want)"
    rm -rf /tmp/spconv_whl && mkdir -p /tmp/spconv_whl
    tar -xf "$tar" -C /tmp/spconv_whl || return 1
    (cd /tmp/spconv_whl && sha256sum -c --quiet SHA256SUMS) || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" /tmp/spconv_whl/*.whl \
        2>&1 | grep -v 'already exists. Specify --upgrade' || true
    rm -f "$tar"
    if smoke; then
        touch "$SITE/.spconv_ready"
        echo "spconv installed in $SITE (use PYTHONPATH=$SITE:\$PWD, as scripts/gpu/env.sh sets)"
    else
        echo "spconv installed in $SITE but the smoke test failed"
        return 1
    fi
}

case "${1:-}" in
    stash) stash; echo "missing:"; m=$(missing); echo "${m:-  nothing (run 'install')}" ;;
    install) install ;;
    status) status ;;
    *) echo "usage: bash scripts/gpu/spconv.sh stash|install|status" >&2; exit 1 ;;
esac
