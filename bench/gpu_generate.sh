#!/usr/bin/env bash
# On one GPU (nvidia-h200), with .device/ and .whl/ carried (bench/gpu_prepare.sh): where generation time
# goes, in one call of at most ~8 minutes — a plain batched diffusers pipeline vs the engine at the same
# batch and compile settings, each engine lever alone, a timed breakdown of one batch, and the headline
# `dermkohya generate` run (bench/generate_throughput.py --suite levers). Writes $OUT/generate-h200.json
# (or bench/results/), after every measurement, so a call cut short still returns what it measured.
# Knobs: GEN_BUDGET (seconds for the suite, default 380; 300 with GEN_TEST=1), GEN_BATCH (16), GEN_VARIANTS
# (default all), NAME (result name, default generate-h200), GEN_TEST=1 (first the `gpu` test of the engine
# under CUDA graphs, tests/test_generate.py, about a minute; its log in $DEST/NAME-gpu-test.log).
# Extra arguments go to bench/generate_throughput.py.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
NAME="${NAME:-generate-h200}"
. bench/gpu_env.sh  # the carried wheels in $SITE beside the image's torch, on PYTHONPATH
mkdir -p "$DEST"
start=$(date +%s)
BUDGET="${GEN_BUDGET:-380}"
if [ "${GEN_TEST:-0}" = 1 ]; then
  BUDGET="${GEN_BUDGET:-300}"
  timeout 150 python3 -m pytest tests/test_generate.py -q -p no:cacheprovider -m gpu -k cuda_graphs -rs \
    >"$DEST/$NAME-gpu-test.log" 2>&1
  rc=$?
  echo "gpu test: exit $rc ($(( $(date +%s) - start )) s): $(tail -1 "$DEST/$NAME-gpu-test.log")"
fi
timeout "${GEN_TIMEOUT:-450}" python3 bench/generate_throughput.py --suite levers --model random:sd15 --random-lora \
  --batch "${GEN_BATCH:-16}" --budget "$BUDGET" ${GEN_VARIANTS:+--variants "$GEN_VARIANTS"} \
  --out "$DEST/$NAME.json" "$@" 2>&1 | grep -v "Loading pipeline" | tail -60
echo "generate levers: $(( $(date +%s) - start )) s → $DEST/$NAME.json"
