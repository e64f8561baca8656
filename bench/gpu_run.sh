#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .device/ and .whl/ carried (bench/gpu_prepare.sh):
# install the pinned wheels beside the image's torch, run the harness, draw the plot. Results go to
# $OUT (the device tool's folder) or bench/results/, named after the GPU they ran on (bench/gpu_name.py:
# h200, h100, …). Extra arguments go to bench/train_throughput.py. Without any: `--preset pairs`
# (card-raw/default twice back to back, profiled, then levers) → train-throughput-<gpu>.{json,png}, -kohya.log
# and train-throughput-<gpu>-profile.json / -profile.collapsed.txt.gz (every profiled variant); `--wall-1000` → train-wall-1000-<gpu>.*;
# `--family sdxl` → train-throughput-sdxl-<gpu>.*. RESULT_TAG=x appends -x to the name.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
FAMILY=sd15 MODE= prev=
for arg in "$@"; do
  [ "$prev" = --family ] && FAMILY="$arg"
  [ "$prev" = --preset ] && [ "$arg" = wall-1000 ] && MODE=wall
  case "$arg" in --family=*) FAMILY="${arg#--family=}" ;; --wall-1000|--preset=wall-1000) MODE=wall ;; esac
  prev="$arg"
done
GPU="$(python3 bench/gpu_name.py)"
case "$FAMILY" in
  sd15) NAME=train-throughput-$GPU ;;
  sdxl) NAME=train-throughput-sdxl-$GPU ;;
  *) echo "--family $FAMILY: use sd15 or sdxl" >&2; exit 2 ;;
esac
[ "$MODE" = wall ] && NAME=train-wall-1000-$GPU
# RESULT_TAG=levers (letters, digits, -): a second call of the same kind keeps its own files
if [ -n "${RESULT_TAG:-}" ]; then
  case "$RESULT_TAG" in *[!A-Za-z0-9-]*) echo "RESULT_TAG=$RESULT_TAG: use letters, digits and -" >&2; exit 2 ;; esac
  NAME="$NAME-$RESULT_TAG"
fi
SITE="$(mktemp -d)"  # the carried wheels, installed beside the image's torch
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# kohya pins accelerate 1.6.0; keep the image's own if the pin does not import beside its torch
python3 -c "import accelerate.commands.launch" 2>/dev/null || { echo "accelerate 1.6.0 does not import here: using the image's"; rm -rf "$SITE"/accelerate "$SITE"/accelerate-*; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/train_throughput.py --gpu "$GPU" --out "$DEST/$NAME.json" --log "$DEST/$NAME-kohya.log" "$@"
[ "$MODE" = wall ] || python3 bench/plot_train_throughput.py "$DEST/$NAME.json" --png "$DEST/$NAME.png"
