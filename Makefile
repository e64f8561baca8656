# dermkohya — `make train` trains the embedded demo (or RUN=runs/<run>.toml; several, RUN="runs/a.toml runs/b.toml",
# are a queue: one after another, past failures, ending with a table); `make test` runs the tests.
# Two environments: .venv is dermkohya's own (CLI, tests, generation); .venv-kohya is kohya's, built
# from sd-scripts' pinned requirements. KOHYA_PYTHON / SD_SCRIPTS_DIR select existing ones instead.

PYTHON      ?= python3
VENV        ?= .venv
DK          := $(VENV)/bin/dermkohya
# dermkohya's environment: the same torch/torchvision pair as kohya's (torchvision is needed by the metrics).
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
# kohya's environment: a torch/torchvision pair that imports together.
KOHYA_TORCH ?= torch==2.14.1 torchvision==0.29.1
KOHYA_VENV  ?= .venv-kohya
SD_SCRIPTS_DIR ?= vendor/sd-scripts
export SD_SCRIPTS_DIR
RUN ?=

.PHONY: setup sd-scripts kohya-env env train test test-all bench bench-gpu clean-venvs wheel browser

env: $(VENV)/.installed

# open-clip-torch only for the CLIP BPE merges the offline tokenizer is built from: --no-deps keeps torch as
# it is (dermkohya reads the data file through package metadata and never imports open_clip).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[ml,utility,serve,test]"
	$(VENV)/bin/pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

# The submodule, where GitHub is reachable; an existing checkout in SD_SCRIPTS_DIR is used as it is.
sd-scripts:
	@if [ ! -f "$(SD_SCRIPTS_DIR)/train_network.py" ]; then \
	  git submodule update --init vendor/sd-scripts || { \
	    echo "error: sd-scripts is missing: clone kohya-ss/sd-scripts and set SD_SCRIPTS_DIR, or make GitHub reachable"; exit 1; }; \
	fi

# kohya's requirements minus their trailing `-e .` (it installs stub top-level packages; kohya runs from its folder).
kohya-env: sd-scripts
	@if [ -n "$$KOHYA_PYTHON" ]; then echo "using KOHYA_PYTHON=$$KOHYA_PYTHON"; else $(MAKE) --no-print-directory $(KOHYA_VENV)/.installed; fi

$(KOHYA_VENV)/.installed:
	$(PYTHON) -m venv $(KOHYA_VENV)
	$(KOHYA_VENV)/bin/pip install -q --upgrade pip
	$(KOHYA_VENV)/bin/pip install -q $(KOHYA_TORCH)
	grep -v '^-e' "$(SD_SCRIPTS_DIR)/requirements.txt" > $(KOHYA_VENV)/requirements.txt
	printf '%s\n' $(KOHYA_TORCH) > $(KOHYA_VENV)/constraints.txt
	$(KOHYA_VENV)/bin/pip install -q -r $(KOHYA_VENV)/requirements.txt -c $(KOHYA_VENV)/constraints.txt
	$(KOHYA_VENV)/bin/pip check
	touch $@

setup: env kohya-env

train: setup
ifeq ($(RUN),)
	$(DK) demo-data datasets/demo/data --per-cell 1
	$(DK) train runs/demo.toml --new
else
	$(if $(filter runs/demo.toml,$(RUN)),$(DK) demo-data datasets/demo/data --per-cell 1)
	$(DK) train $(RUN)
endif

# CI's command: no sd-scripts, no GPU needed; tests that need them skip with one line saying why.
# `slow` cases (whole trainings, generation runs, wheel builds) are left to test-all.
test: env
	$(VENV)/bin/python -m pytest -m "not slow"

# Everything: slow cases too; kohya/gpu/browser cases still skip with their reason where those are missing.
test-all: env
	$(VENV)/bin/python -m pytest

bench: env
	$(VENV)/bin/python bench/check_scan.py
	$(VENV)/bin/python bench/prepare_throughput.py
	$(VENV)/bin/python bench/overhead.py

# What the GPU training benchmark needs on a machine that cannot download: .device/ and .whl/ (git-ignored).
# Then, on the GPU machine with both: bash bench/gpu_run.sh (writes bench/results/train-throughput-h100.*).
bench-gpu: env
	PYTHON=$(VENV)/bin/python SD_SCRIPTS_DIR=$(SD_SCRIPTS_DIR) bash bench/gpu_prepare.sh

# The web UI's browser test: Debian's chromium (Playwright drives it; no `playwright install` download), then the test.
browser: env
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	$(VENV)/bin/pip install -q playwright==1.65.2
	$(VENV)/bin/python -m pytest -m browser tests/test_serve_browser.py

# The installable package (templates and dermkohya.networks inside), built offline with .venv's setuptools.
wheel: env
	$(VENV)/bin/python -m pip wheel --no-build-isolation --no-deps -q -w dist .

clean-venvs:
	rm -rf $(VENV) $(KOHYA_VENV)
