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
