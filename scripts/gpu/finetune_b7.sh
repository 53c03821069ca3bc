#!/usr/bin/env bash
# On the GPU machine (issue 17): the GPU demo (16 synthetic streets, evolsplat-ff, STEPS steps), then per held-out
# scene: splatfacto from its seed cloud and fine-tuning from our feed-forward Gaussians, both on the clock for the
# same BUDGETS, scored on the same held-out views (benchmarks/bench_splatfacto.py --finetune). Results into $OUT.
#   usage: bash scripts/gpu/finetune_b7.sh [BUDGETS...]     env: STEPS (800), SCENES (1)
source scripts/gpu/env.sh
BUDGETS=("$@"); [ ${#BUDGETS[@]} -eq 0 ] && BUDGETS=(10 30 60)
RES=${OUT:-outputs/finetune_b7}
mkdir -p "$RES"
start=$(date +%s)
STEPS=${STEPS:-800} OUT=outputs/demo PYTHON=python3 bash scripts/demo.sh data/synthetic > "$RES/demo.log" 2>&1
echo "demo exit $? after $(( $(date +%s) - start )) s"; tail -3 "$RES/demo.log"
python3 benchmarks/bench_splatfacto.py --load-config outputs/demo/demo/evolsplat-ff/run/config.yml --finetune \
    --budgets "${BUDGETS[@]}" --scenes "${SCENES:-1}" --images 2 --out outputs/ft > "$RES/finetune.log" 2>&1
echo "bench exit $? after $(( $(date +%s) - start )) s"; grep -v "^\s*$" "$RES/finetune.log" | tail -12
cp outputs/ft/bench_splatfacto.json outputs/ft/psnr_vs_seconds.png "$RES/" 2>/dev/null
cp outputs/ft/b7b_scene*_view00.png "$RES/" 2>/dev/null
