#!/usr/bin/env bash
# On the GPU machine: the model benchmarks (B1-B4) and the sparse U-Net benchmark (B5), JSON into $OUT.
source scripts/gpu/env.sh
OUT=${OUT:-outputs}
mkdir -p "$OUT"
python3 benchmarks/bench_model.py --out "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log"
python3 benchmarks/bench_sparse_unet.py --device cuda --num-voxels 813000 --out "$OUT/bench_sparse_unet.json" 2>&1 \
    | tee "$OUT/bench_sparse_unet.log"
