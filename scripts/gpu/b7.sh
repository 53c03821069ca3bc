#!/usr/bin/env bash
# On the GPU machine: B7 quality. Step "train": the GPU demo (16 synthetic scenes at 192x576, evolsplat-ff, STEPS
# steps) then B7a/B6 (benchmarks/bench_quality.py). Step "splatfacto": B7b on the same machine afterwards
# (benchmarks/bench_splatfacto.py, budgets in seconds). Results into $OUT.
#   usage: bash scripts/gpu/b7.sh train | splatfacto [BUDGETS...]
source scripts/gpu/env.sh
RES=${OUT:-outputs/b7}
mkdir -p "$RES"
CFG=outputs/demo/demo/evolsplat-ff/run/config.yml
case "${1:-train}" in
train)
    start=$(date +%s)
    OUT=outputs/demo PYTHON=python3 bash scripts/demo.sh data/synthetic > "$RES/demo.log" 2>&1
    echo "demo exit $? after $(( $(date +%s) - start )) s"; tail -8 "$RES/demo.log"
    cp outputs/demo/metrics.json "$RES/gpu_demo_metrics.json" 2>/dev/null
    python3 benchmarks/bench_quality.py --load-config "$CFG" --out "$RES/quality" > "$RES/quality.log" 2>&1
    echo "bench_quality exit $?"; tail -30 "$RES/quality.log"
    ;;
splatfacto)
    shift
    python3 benchmarks/bench_splatfacto.py --load-config "$CFG" --budgets "${@:-30 300}" --out "$RES/splatfacto" \
        > "$RES/splatfacto.log" 2>&1
    echo "bench_splatfacto exit $?"; grep -v "^\s*$" "$RES/splatfacto.log" | tail -40
    rm -rf "$RES/splatfacto/runs" "$RES/splatfacto"/scene*/images
    ;;
esac
