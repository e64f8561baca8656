#!/usr/bin/env bash
# On a 2-GPU machine (nvidia-h200-x2), with .device/ and .whl/ carried (bench/gpu_prepare.sh): `dermkohya
# generate` as two launches of one process each (torchrun node ranks 0 and 1, one GPU each, as two nodes
# sharing a filesystem would run it) and as one process on one GPU, same plan (random:sd15 + a random
# LoRA, 512 px, 50 steps, CFG 7.5, batch 16); files compared byte for byte. Writes
# $OUT/generate-h200x2-ranks.json. About 3 minutes; RANKS_BUDGET (s) bounds the two runs together.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
SITE="$(mktemp -d)"  # the carried wheels, installed beside the image's torch
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DERMKOHYA_CACHE="$SITE/cache"
# multi-GPU hosts here: NVLink multicast stays off (generate's ranks talk over gloo, but keep the host's rule)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import accelerate.commands.launch" 2>/dev/null || rm -rf "$SITE"/accelerate "$SITE"/accelerate-*
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${RANKS_TIMEOUT:-235}" python3 bench/generate_ranks.py --model random:sd15 --random-lora \
  --count "${RANKS_COUNT:-96}" --batch-size 16 --budget "${RANKS_BUDGET:-180}" --threads 4 \
  --work "$SITE/work" --out "$DEST/generate-h200x2-ranks.json" 2>&1 | grep -v "Loading pipeline" | tail -30
