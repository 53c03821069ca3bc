#!/usr/bin/env bash
# On the GPU machine: the 480x270 A/B of docs/BENCHMARKS.md ("Real data"): spread vs near training batches, and the
# LiDAR free-space filter, trained side by side (TRAIN_S seconds each, default 200), scored at their common step,
# then splatfacto 30 s. Carry .whl and .gpu_data/ab (scripts/gpu/pack_pandaset.py pack ... --downscale 4
# --quality 85 --every 8 --radius 50 --cameras front front_left front_right). Results under $OUT.
set -x
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,memory.used --format=csv
bash scripts/gpu/real.sh unpack > $OUT/unpack.log 2>&1; tail -n 3 $OUT/unpack.log
( timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_knn.py > $OUT/pytest_cuda.log 2>&1; echo "pytest exit $?" >> $OUT/pytest_cuda.log ) &
T=${TRAIN_S:-200}
EVAL_ID=0 SAVE_EVERY=50 bash scripts/gpu/real.sh train spread $T --pipeline.datamanager.view-selection spread --pipeline.model.pointcloud.depth-consistency False &
sleep 3; EVAL_ID=0 SAVE_EVERY=50 bash scripts/gpu/real.sh train near $T --pipeline.model.pointcloud.depth-consistency False &
sleep 3; EVAL_ID=0 SAVE_EVERY=50 bash scripts/gpu/real.sh train nearstatic $T; wait
S=$(for r in spread near nearstatic; do ls /tmp/real_runs/$r/evolsplat-ff/run/nerfstudio_models | sed 's/step-0*\([0-9]*\).ckpt/\1/' | sort -n | tail -n 1; done | sort -n | head -n 1)
echo "common step $S"
STEP=$S bash scripts/gpu/real.sh eval spread near nearstatic
bash scripts/gpu/real.sh splatfacto nearstatic 30
tail -n 5 $OUT/pytest_cuda.log
