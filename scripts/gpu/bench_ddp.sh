#!/usr/bin/env bash
# On a GPU machine with >= 2 GPUs: multi-GPU scaling of the train step (issue 10), JSON into $OUT.
#   bash scripts/gpu/bench_ddp.sh            # world sizes 1 and 2 (WORLD_SIZES="1 2 4" for more), 800 samples
# Same synthetic data as the GPU demo (16 scenes at 192x576, generated when absent).
source scripts/gpu/env.sh
OUT=${OUT:-outputs}
DATA=${DATA:-data/synthetic}
mkdir -p "$OUT"
if [ ! -d "$DATA" ]; then
    python3 -m evolsplat_ns.cli.synth --out "$DATA" --seed 0 --num-scenes 16 --height 192 --width 576 --frames 40
fi
python3 benchmarks/bench_ddp.py --data "$DATA" --world-sizes ${WORLD_SIZES:-1 2} --samples "${SAMPLES:-800}" \
    --out "$OUT/bench_ddp.json" 2>&1 | tee "$OUT/bench_ddp.log"
