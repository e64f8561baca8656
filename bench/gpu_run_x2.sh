#!/usr/bin/env bash
# On a 2-GPU machine (nvidia-h200-x2), with .device/ and .whl/ carried (bench/gpu_prepare.sh): generation
# (plain loop vs engine, 1 and 2 processes) and training scaling (1 vs 2 GPUs), in one call.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
. bench/gpu_env.sh  # the carried wheels in $SITE beside the image's torch, on PYTHONPATH
timeout "${GEN_TIMEOUT:-330}" python3 bench/generate_throughput.py --model random:sd15 --random-lora \
  --processes 1,2 --count "${GEN_COUNT:-96}" --plain-count 8 --batch-sizes 16 --compile "${GEN_COMPILE:-both}" \
  --out "$DEST/generate-h200x2.json" 2>&1 | grep -v "Loading pipeline" | tail -40
timeout "${TRAIN_TIMEOUT:-220}" python3 bench/train_throughput.py --variants dermkohya-lora_fast-eager,dermkohya-eager-2gpu \
  --budget 200 --out "$DEST/train-throughput-h200x2.json" --log "$DEST/train-throughput-h200x2-kohya.log" 2>&1 | tail -20
