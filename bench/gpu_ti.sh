#!/usr/bin/env bash
# On the GPU machine (one H200), from the repository root, with .device/ and .whl/ carried
# (bench/gpu_prepare.sh, `make bench-gpu`): runs/derm-sd15-ti.toml's two phases (textual inversion, then
# LoRA on the derived base) and the LoRA-only default on the random-weight SD 1.5, 512 px, fp16, through
# dermkohya train; writes $OUT/ti-sd15-<gpu>.json (ti-sd15-h200.json; or bench/results/) and the kohya logs. About 5 minutes.
# Extra arguments go to bench/ti_throughput.py (`--smoke` runs it on a CPU here, 64 px, fp32; `--family sdxl`
# trains runs/derm-sdxl-ti.toml's two phases on random:sdxl at 1024 px → ti-sdxl-<gpu>.json, ~6 min).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
FAMILY=sd15 prev=
for arg in "$@"; do
  [ "$prev" = --family ] && FAMILY="$arg"
  case "$arg" in --family=*) FAMILY="${arg#--family=}" ;; esac
  prev="$arg"
done
NAME="${TI_NAME:-ti-$FAMILY-$("$PY" bench/gpu_name.py)}"  # named after the GPU: ti-sd15-h200 (a CPU smoke: -cpu)
SITE="$(mktemp -d)"  # the carried wheels, installed beside the image's torch (the device has no diffusers)
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import accelerate.commands.launch" 2>/dev/null || rm -rf "$SITE"/accelerate "$SITE"/accelerate-*
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
LIMIT=500; case " $* " in *" --smoke "*) LIMIT=1600 ;; esac  # the CPU smoke run is slow (shared 2-core machine)
timeout "${TI_TIMEOUT:-$LIMIT}" "$PY" bench/ti_throughput.py --out "$DEST/$NAME.json" "$@"
rc=$?
# kohya's own logs of the phases, beside the JSON
for log in output/bench-ti-then-lora/ti/*.log output/bench-ti-then-lora/train.log output/bench-lora-only/train.log; do
  [ -f "$log" ] && { echo "== $log"; tail -n 400 "$log"; } >>"$DEST/$NAME-kohya.log"
done
exit $rc
