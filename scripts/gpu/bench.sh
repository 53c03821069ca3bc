#!/usr/bin/env bash
# On the GPU machine: the model benchmarks (B1-B4), the sparse U-Net benchmark (B5) and the render / extraction
# profile, JSON and logs into $OUT.
source scripts/gpu/env.sh
OUT=${OUT:-outputs}
mkdir -p "$OUT"
python3 benchmarks/bench_model.py --out "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log" | grep -v "^ "
python3 benchmarks/bench_sparse_unet.py --device cuda --num-voxels 813000 --out "$OUT/bench_sparse_unet.json" \
    > "$OUT/bench_sparse_unet.log" 2>&1
tail -5 "$OUT/bench_sparse_unet.log"
if [ "${PROFILE:-1}" = 1 ]; then
    python3 benchmarks/profile_render.py > "$OUT/profile.txt" 2>&1
    OUT="$OUT" python3 benchmarks/profile_view_stages.py > "$OUT/profile_view_stages.txt" 2>&1
fi
