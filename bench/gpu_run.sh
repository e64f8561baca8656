#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .device/ and .whl/ carried (bench/gpu_prepare.sh):
# install the pinned wheels beside the image's torch, run the harness, draw the plot. Results go to
# $OUT (the device tool's folder) or bench/results/. Extra arguments go to bench/train_throughput.py;
# `--family sdxl` measures SDXL and writes train-throughput-sdxl-h100.{json,png} and -kohya.log instead.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
FAMILY=sd15 prev=
for arg in "$@"; do
  [ "$prev" = --family ] && FAMILY="$arg"
  case "$arg" in --family=*) FAMILY="${arg#--family=}" ;; esac
  prev="$arg"
done
case "$FAMILY" in
  sd15) NAME=train-throughput-h100 ;;
  sdxl) NAME=train-throughput-sdxl-h100 ;;
  *) echo "--family $FAMILY: use sd15 or sdxl" >&2; exit 2 ;;
esac
SITE="$(mktemp -d)"  # the carried wheels, installed beside the image's torch
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# kohya pins accelerate 1.6.0; keep the image's own if the pin does not import beside its torch
python3 -c "import accelerate.commands.launch" 2>/dev/null || { echo "accelerate 1.6.0 does not import here: using the image's"; rm -rf "$SITE"/accelerate "$SITE"/accelerate-*; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/train_throughput.py --out "$DEST/$NAME.json" --log "$DEST/$NAME-kohya.log" "$@"
python3 bench/plot_train_throughput.py "$DEST/$NAME.json" --png "$DEST/$NAME.png"
