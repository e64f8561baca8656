#!/usr/bin/env bash
# On a 2-GPU machine (nvidia-h200-x2), from the repository root, with .device/ and .whl/ carried
# (bench/gpu_prepare.sh): CUDA graphs under DDP (issue #18) in one call of ≤ 5 minutes —
# bench/ddp_graphs.py's self-test (tiny models: lora_fast's capture under DDP, a failing capture's eager
# fallback, full tracebacks in check.selftest), its check (graphs vs eager DDP on kohya's SD 1.5 U-Net,
# 2 processes; all four modes with DDP_BUDGET ≥ 400), then
# `dermkohya train` on 1 GPU vs `[launch] processes = 2`. Writes $OUT/train-throughput-h200x2.json
# (`scaling_2gpu_vs_1gpu_default`) and -kohya.log. DDP_BUDGET=540 (a 9-minute call) adds the lever
# variants (2 GPUs with kohya's per-tensor sync, 2 GPUs eager).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
BUDGET="${DDP_BUDGET:-285}"
. bench/gpu_env.sh
timeout "$((${BUDGET%.*} + 25))" python3 bench/ddp_graphs.py --budget "$BUDGET" \
  --out "$DEST/train-throughput-h200x2.json" --log "$DEST/train-throughput-h200x2-kohya.log" "$@" 2>&1 | tail -120
