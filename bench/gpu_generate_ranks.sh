#!/usr/bin/env bash
# On a 2-GPU machine (nvidia-h200-x2), with .device/ and .whl/ carried (bench/gpu_prepare.sh): `dermkohya
# generate` as two launches of one process each (torchrun node ranks 0 and 1, one GPU each, as two nodes
# sharing a filesystem would run it) and as one process on one GPU, same plan (random:sd15 + a random
# LoRA, 512 px, 50 steps, CFG 7.5, batch 16); files compared byte for byte. Writes
# $OUT/generate-h200x2-ranks.json. About 3 minutes (at most 4): RANKS_BUDGET (s) bounds the two runs
# together, RANKS_TIMEOUT the whole harness (model and LoRA made first), RANKS_COUNT the images.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
. bench/gpu_env.sh
timeout "${RANKS_TIMEOUT:-215}" python3 bench/generate_ranks.py --model random:sd15 --random-lora \
  --count "${RANKS_COUNT:-96}" --batch-size 16 --budget "${RANKS_BUDGET:-150}" --threads 4 \
  --work "$SITE/work" --out "$DEST/generate-h200x2-ranks.json" 2>&1 | grep -v "Loading pipeline" | tail -30
