#!/usr/bin/env bash
# The main job on the embedded synthetic data: generate scenes, train evolsplat-ff, evaluate on held-out scenes.
# Small on a CPU-only machine (a few minutes), useful size on a GPU machine.
#   usage: scripts/demo.sh [DATA_DIR]        (env: STEPS, OUT, PYTHON to override)
set -euo pipefail
DATA="${1:-data/synthetic}"
OUTDIR="${OUT:-outputs/demo}"
PY="${PYTHON:-.venv/bin/python}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "GPU found: 16 synthetic scenes at 192x576, evolsplat-ff"
    SYNTH=(--num-scenes 16 --height 192 --width 576 --frames 40)
    METHOD=evolsplat-ff; STEPS="${STEPS:-800}"
    EXTRA=(--pipeline.datamanager.num-target-keyframes 2 --steps-per-save 1000
           --pipeline.model.pointcloud.outlier-removal False --pipeline.model.pointcloud.max-points 300000)
else
    echo "No GPU: 4 small synthetic scenes at 48x144, evolsplat-ff-small (the PyTorch rasterizer is slow)"
    SYNTH=(--num-scenes 4 --height 48 --width 144 --frames 30)
    METHOD=evolsplat-ff-small; STEPS="${STEPS:-120}"
    EXTRA=(--machine.device-type cpu)
fi
if [ ! -f "$DATA/.complete" ]; then
    "$PY" -m evolsplat_ns.cli.synth --out "$DATA" --seed 0 "${SYNTH[@]}"
    touch "$DATA/.complete"
fi
"$PY" -m evolsplat_ns.cli.inspect --data "$DATA"
"$PY" -m nerfstudio.scripts.train "$METHOD" --data "$DATA" --max-num-iterations "$STEPS" --output-dir "$OUTDIR" \
    --experiment-name demo --timestamp run --vis tensorboard --viewer.quit-on-train-completion True "${EXTRA[@]}"
CFG="$OUTDIR/demo/$METHOD/run/config.yml"
"$PY" -m nerfstudio.scripts.eval --load-config "$CFG" --output-path "$OUTDIR/metrics.json" --render-output-path "$OUTDIR/renders"
echo
echo "Held-out scenes (every odd frame's images, each reconstructed from the nearest even frames):"
"$PY" -c "import json; r = json.load(open('$OUTDIR/metrics.json'))['results']; print('  ' + ', '.join(f'{k} {v:.4g}' for k, v in r.items() if k != 'views'))"
echo "Renders (ground truth | prediction | error): $OUTDIR/renders/"
echo "Config (for ns-viewer --load-config / evolsplat-ns-infer): $CFG"
