#!/usr/bin/env bash
# Prepare what bench/train_throughput.py needs on a GPU machine that cannot download anything:
#   .device/sd-scripts/   the files kohya's training scripts run (top-level scripts, library/, networks/,
#                         and tools/convert_diffusers20_original_sd.py for bench/gpu_first_run.sh),
#                         copied from the pinned checkout, with its commit in .device/sd-scripts.commit
#   .device/tokenizers/   the CLIP tokenizer cache kohya's --tokenizer_cache_dir reads (built offline)
#   .whl/                 wheels the device image lacks, for its Python 3.12 (kohya's pinned versions)
# Both folders are git-ignored (and added to .git/info/exclude). `make bench-gpu` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

SD="${SD_SCRIPTS_DIR:-vendor/sd-scripts}"
PY="${PYTHON:-.venv/bin/python}"
PIN=48d368fa557731ad0488c07304dfeba8c07910eb
WHEELS=(
  transformers==4.54.1 diffusers==0.32.1 huggingface-hub==0.34.3 tokenizers==0.21.4 accelerate==1.6.0
  voluptuous==0.15.2 imagesize==1.4.1 toml==0.10.2 ftfy==6.3.1 wcwidth==0.9.4 importlib-metadata==8.7.0 typing-extensions==4.16.0
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 tomli-w==1.2.0
  peft==0.17.1 rich==14.1.0 markdown-it-py==4.0.0 mdurl==0.1.2 pygments==2.19.2 click==8.4.0  # generate (peft loads kohya LoRAs in diffusers), dermkohya CLI
  open-clip-torch==3.3.0  # only its CLIP BPE merges file, read by dermkohya.basemodel (never imported)
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1  # the `gpu` tests on the device: python3 -m pytest -m gpu …
)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .device .whl
for entry in /.whl/ /.device/; do grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >>"$exclude"; done

commit="$(git -C "$SD" rev-parse HEAD)"
[ "$commit" = "$PIN" ] || echo "warning: $SD is at $commit, not the pinned $PIN" >&2
rm -rf .device/sd-scripts && mkdir -p .device/sd-scripts
git -C "$SD" ls-files -z -- ':(glob)*.py' ':(glob)library/**' ':(glob)networks/**' LICENSE.md \
  tools/convert_diffusers20_original_sd.py \
  | (cd "$SD" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
  | tar -C .device/sd-scripts -xf -
echo "$commit" >.device/sd-scripts.commit
{ git rev-parse HEAD 2>/dev/null || echo unknown; } >.device/repo.commit

"$PY" -c "from dermkohya import basemodel; basemodel.build_tokenizer_cache('.device/tokenizers')"

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

du -sh .device .whl
echo "ready: run on the device (carry .device and .whl): bash bench/gpu_run.sh"
