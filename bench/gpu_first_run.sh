#!/usr/bin/env bash
# A new user's first run on a GPU machine without internet (issue #11), measured end to end:
#   1. the random-weight SD 1.5 smoke model, built here, converted by sd-scripts' own
#      tools/convert_diffusers20_original_sd.py into ONE file, models/v1-5-pruned.safetensors, where
#      the card's run file expects the user's download (a 2 GB file cannot be carried);
#   2. demo data in the card's layout, data/1_derm/*.png + *.txt;
#   3. `dermkohya train runs/derm-sd15.toml`, the run file UNCHANGED, with HF_HUB_OFFLINE=1 and an
#      empty HF_HOME (nothing may come from the hub: the tokenizer cache is built offline);
#   4. `dermkohya generate` of a small plan from the same single file with the collected LoRA;
#   5. a JSON summary (steps, it/s, wall times, exit codes, LoRA path and sha256, images/s) written to
#      $OUT/first-run-h200.json and bench/results/first-run-h200.json, kohya's log beside it.
# Here, first: `bash bench/gpu_prepare.sh` (makes .device/ and .whl/). On the device, from the
# repository root, carrying .device and .whl: `bash bench/gpu_first_run.sh`. dermkohya itself travels
# with the working tree and runs from it (PYTHONPATH); nothing is installed into the image.
# Knobs: PER_CELL (demo images per diagnosis x skin type, default 8: 144 images), GEN_COUNT (images
# generated, default 24), GEN_BATCH (default 8), NAME (result name, default first-run-h200).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
NAME="${NAME:-first-run-h200}"
DEST="${OUT:-bench/results}"
PER_CELL="${PER_CELL:-8}"
GEN_COUNT="${GEN_COUNT:-24}"
GEN_BATCH="${GEN_BATCH:-8}"
RUN=derm-sd15
BASE=models/v1-5-pruned.safetensors
PLAN_NAME="$NAME"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"

step() { echo "== [$(date -u +%H:%M:%S)] $*"; }
die() { echo "error: $*" >&2; exit 1; }
trap 'rc=$?; [[ $- == *e* ]] && echo "error: bench/gpu_first_run.sh stopped at line $LINENO (exit $rc); the output above says why" >&2' ERR

step "checking what was carried"
[ -f .device/sd-scripts/train_network.py ] || die ".device/sd-scripts is missing: run bench/gpu_prepare.sh here and carry .device"
[ -f .device/sd-scripts/tools/convert_diffusers20_original_sd.py ] \
  || die ".device/sd-scripts/tools/convert_diffusers20_original_sd.py is missing: re-run bench/gpu_prepare.sh (it carries tools/ now)"
compgen -G ".whl/*.whl" >/dev/null || die ".whl/ holds no wheels: run bench/gpu_prepare.sh here and carry .whl"
[ -f runs/$RUN.toml ] || die "runs/$RUN.toml is missing from the working tree"
command -v python3 >/dev/null || die "python3 not found"

step "installing the carried wheels beside the image's torch"
WORK="$(mktemp -d)"
SITE="$WORK/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# kohya pins accelerate 1.6.0; keep the image's own if the pin does not import beside its torch
python3 -c "import accelerate.commands.launch" 2>/dev/null \
  || { echo "accelerate 1.6.0 does not import here: using the image's"; rm -rf "$SITE"/accelerate "$SITE"/accelerate-*; }
python3 -c "import torch, diffusers, transformers, peft, safetensors, dermkohya; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
export SD_SCRIPTS_DIR="$ROOT/.device/sd-scripts" KOHYA_PYTHON="$(command -v python3)"
export DERMKOHYA_CACHE="$WORK/dermkohya-cache"  # hash cache and kohya's option list: a first run's, empty
GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo unknown)"
echo "GPU: $GPU"
dk() { python3 -c 'import sys; from dermkohya.cli import main; sys.argv[0] = "dermkohya"; main()' "$@"; }

# a warm machine may hold an earlier call's results: keep them aside, so this is a first run again
for old in output/$RUN artifacts/$RUN synthetic/$PLAN_NAME data; do
  if [ -e "$old" ]; then mv "$old" "$old.before-$STAMP"; echo "kept an earlier $old as $old.before-$STAMP"; fi
done

step "1/5 the smoke model as a single-file checkpoint: $BASE"
mkdir -p models
t0=$SECONDS
if [ -f "$BASE" ] && dk base info "$BASE" >/dev/null 2>&1; then
  echo "$BASE exists (an earlier call made it) and reads as a checkpoint: reused"
else
  rm -f "$BASE"  # an earlier call's unreadable file (e.g. a pickle under this name) is made again
  dk base random-sd15 "$WORK/smoke-sd15" --tokenizer-cache "$WORK/smoke-tokenizers"
  (cd .device/sd-scripts && PYTHONPATH="$PWD:$PYTHONPATH" python3 tools/convert_diffusers20_original_sd.py \
      --v1 --fp16 "$WORK/smoke-sd15" "$ROOT/${BASE%.safetensors}.partial.safetensors")
  # the converter picks the format from the extension: a name not ending in .safetensors becomes a pickle
  mv "${BASE%.safetensors}.partial.safetensors" "$BASE"
  rm -rf "$WORK/smoke-sd15" "$WORK/smoke-tokenizers"  # the user has the file only
fi
dk base info "$BASE"
BASE_S=$((SECONDS - t0))

step "2/5 demo data in the card's layout: data/1_derm/ ($PER_CELL per diagnosis x skin type)"
dk demo-data data --per-cell "$PER_CELL" --size 512
ls data/1_derm | sed -n 1,4p
echo "$(ls data/1_derm/*.png | wc -l) images, $(ls data/1_derm/*.txt | wc -l) captions"

step "3/5 dermkohya train runs/$RUN.toml (unchanged) with HF_HUB_OFFLINE=1 and an empty HF_HOME"
if git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet -- runs/$RUN.toml; then
  echo "warning: runs/$RUN.toml differs from the commit"
fi
HF_EMPTY="$WORK/hf-home"
mkdir -p "$HF_EMPTY"
mkdir -p "$DEST"
TRAIN_LOG="$DEST/$NAME-train.out"
t0=$SECONDS
set +e
HF_HUB_OFFLINE=1 HF_HOME="$HF_EMPTY" dk train runs/$RUN.toml 2>&1 | tee "$TRAIN_LOG"
TRAIN_RC=${PIPESTATUS[0]}
set -e
TRAIN_S=$((SECONDS - t0))
echo "train: exit $TRAIN_RC after ${TRAIN_S} s"
[ -f output/$RUN/train.log ] && cp output/$RUN/train.log "$DEST/$NAME-kohya.log"

step "4/5 dermkohya generate from the same single file with the collected LoRA"
PLAN="$WORK/$PLAN_NAME.toml"
cat >"$PLAN" <<EOF
name = "$PLAN_NAME"
description = "first run: the single-file base the run trained on, with its collected LoRA"
[model]
base = "$BASE"
[[lora]]
path = "artifacts/$RUN/$RUN.safetensors"
weight = 1.0
[classes]
diagnoses = ["severe inflammatory skin lesions, erythema, pustules"]
skin_types = "equal"
count = $GEN_COUNT
[sampler]
steps = 28
width = 512
height = 512
[engine]
batch_size = $GEN_BATCH
[filter]
enabled = false
EOF
GEN_RC=-1
GEN_S=0
if [ "$TRAIN_RC" -eq 0 ] && [ -f artifacts/$RUN/$RUN.safetensors ]; then
  t0=$SECONDS
  set +e
  HF_HUB_OFFLINE=1 HF_HOME="$HF_EMPTY" dk generate "$PLAN" --no-progress 2>&1 | tee "$DEST/$NAME-generate.out"
  GEN_RC=${PIPESTATUS[0]}
  set -e
  GEN_S=$((SECONDS - t0))
  echo "generate: exit $GEN_RC after ${GEN_S} s"
else
  echo "skipped: training did not leave artifacts/$RUN/$RUN.safetensors"
fi

step "5/5 summary → $DEST/$NAME.json"
export NAME DEST RUN BASE PLAN_NAME GPU TRAIN_RC TRAIN_S GEN_RC GEN_S BASE_S HF_EMPTY PER_CELL TRAIN_LOG
python3 - <<'PY'
import hashlib, json, os, platform
from pathlib import Path

from dermkohya import kohya

env = os.environ
run, name = env["RUN"], env["NAME"]
log = Path(f"output/{run}/train.log")
rates, steps, loss = [], None, None
for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
    for part in line.split("\r"):
        progress = kohya.parse_progress(part)
        if progress:
            steps = (progress.step, progress.total)
            if progress.it_per_s:
                rates.append(progress.it_per_s)
            loss = progress.loss if progress.loss is not None else loss
manifest_path = Path(f"output/{run}/manifest.json")
manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
lora = Path(f"artifacts/{run}/{run}.safetensors")
summary_path = Path(f"synthetic/{env['PLAN_NAME']}/summary.json")
gen = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
hf_files = [str(p.relative_to(env["HF_EMPTY"])) for p in Path(env["HF_EMPTY"]).rglob("*") if p.is_file()]


def commit(path: str) -> str | None:
    p = Path(path)
    return p.read_text().strip() if p.is_file() else None


result = {
    "what": "issue #11 first run: single-file SD 1.5 base (the random smoke model converted by sd-scripts' "
            "convert_diffusers20_original_sd.py --v1 --fp16), runs/derm-sd15.toml unchanged, HF_HUB_OFFLINE=1, empty HF_HOME",
    "gpu": env["GPU"],
    "python": platform.python_version(),
    "dermkohya_commit": commit(".device/repo.commit"),
    "sd_scripts_commit": commit(".device/sd-scripts.commit"),
    "base": {"path": env["BASE"], "build_and_convert_s": int(env["BASE_S"]),
             "sha256": (manifest.get("base_model") or {}).get("sha256")},
    "data": {"folder": "data/1_derm", "per_cell": int(env["PER_CELL"]),
             "images": len(list(Path("data/1_derm").glob("*.png")))},
    "train": {
        "command": f"dermkohya train runs/{run}.toml",
        "exit_code": int(env["TRAIN_RC"]),
        "wall_s": int(env["TRAIN_S"]),
        "kohya_s": manifest.get("kohya_seconds"),
        "steps": steps[0] if steps else None,
        "total_steps": steps[1] if steps else None,
        "it_per_s_final": rates[-1] if rates else None,
        "it_per_s_max": max(rates) if rates else None,
        "loss_last": manifest.get("loss_last", loss),
        "timing": manifest.get("timing"),
        "tokenizer_cache_dir": "models/tokenizers",
        "hint": None,
    },
    "lora": {"path": str(lora) if lora.is_file() else None,
             "sha256": hashlib.sha256(lora.read_bytes()).hexdigest() if lora.is_file() else None,
             "bytes": lora.stat().st_size if lora.is_file() else None},
    "generate": {
        "exit_code": int(env["GEN_RC"]),
        "wall_s": int(env["GEN_S"]),
        "planned": gen.get("planned"), "finished": gen.get("finished"),
        "load_s": gen.get("load_s"),
        "images_per_s": gen.get("images_per_s"),
        "steady_images_per_s": gen.get("steady_images_per_s"),
        "device": gen.get("device"),
        "size": 512, "steps": 28,
    },
    "hf_home_files_after": hf_files,
}
if int(env["TRAIN_RC"]) != 0 and log.is_file():
    result["train"]["hint"] = kohya.hint_for(log.read_text(errors="replace").splitlines()[-60:])
    result["train"]["log_tail"] = log.read_text(errors="replace").splitlines()[-25:]
text = json.dumps(result, indent=2) + "\n"
for folder in {env["DEST"], "bench/results"}:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.json").write_text(text)
print(text)
PY
rm -rf "$WORK"
step "done: train exit $TRAIN_RC, generate exit $GEN_RC"
[ "$TRAIN_RC" -eq 0 ] && [ "$GEN_RC" -eq 0 ]
