#!/usr/bin/env bash
# The main job on the embedded synthetic data: small on a CPU-only machine, larger on a GPU machine.
set -euo pipefail
DATA="${1:-data/synthetic}"
VENV="${VENV:-.venv}"
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SIZE=(--num-scenes 16 --height 192 --width 576 --frames 40)
    echo "GPU found: synthetic scenes at 192x576"
else
    SIZE=(--num-scenes 6 --height 96 --width 288 --frames 40)
    echo "No GPU: small synthetic scenes at 96x288"
fi
if [ ! -f "$DATA/.complete" ]; then
    "$VENV/bin/evolsplat-ns-synth" --out "$DATA" --seed 0 "${SIZE[@]}"
    touch "$DATA/.complete"
fi
"$VENV/bin/evolsplat-ns-inspect" --data "$DATA"
