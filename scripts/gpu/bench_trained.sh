#!/usr/bin/env bash
# On the GPU machine: train evolsplat-ff briefly on one-camera synthetic streets (3 source views, as in the
# KITTI-360-size benchmark), then run bench_model.py with those weights (issue 16: what a trained model pays).
#   env: STEPS (default 600), OUT
source scripts/gpu/env.sh
RES=${OUT:-outputs}
mkdir -p "$RES"
DATA=data/synthetic_1cam
if [ ! -f "$DATA/.complete" ]; then
    python3 -m evolsplat_ns.cli.synth --out "$DATA" --seed 0 --num-scenes 12 --height 192 --width 576 --frames 40 \
        --cameras 1 --quiet && touch "$DATA/.complete"
fi
start=$(date +%s)
python3 -m nerfstudio.scripts.train evolsplat-ff --data "$DATA" --max-num-iterations "${STEPS:-600}" \
    --output-dir outputs/trained --experiment-name t --timestamp run --vis tensorboard --steps-per-save 100000 \
    --pipeline.model.pointcloud.outlier-removal False --pipeline.model.pointcloud.max-points 300000 \
    > "$RES/train_1cam.log" 2>&1
echo "train exit $? after $(( $(date +%s) - start )) s"; grep -v "^\s*$" "$RES/train_1cam.log" | tail -3
CKPT=$(ls outputs/trained/t/evolsplat-ff/run/nerfstudio_models/*.ckpt | tail -1)
python3 benchmarks/bench_model.py --weights "$CKPT" --out "$RES/bench_model_trained.json" 2>&1 \
    | tee "$RES/bench_model_trained.log" | grep -v "^ "
python3 benchmarks/profile_render.py "$CKPT" > "$RES/profile_trained.txt" 2>&1
OUT="$RES" python3 benchmarks/profile_view_stages.py "$CKPT" > "$RES/profile_view_stages_trained.txt" 2>&1
