#!/usr/bin/env bash
# Run `demo` exactly as `dermkohya train` launches it — rendered by dermkohya 0.1.0 from runs/demo.toml.
# Runs from the project root wherever it is called from. Override the interpreter or the checkout with
# KOHYA_PYTHON=... / SD_SCRIPTS_DIR=... (dermkohya checks the commit; this script does not).
set -euo pipefail
cd "$(dirname "$0")/../.."
KOHYA_PYTHON="${KOHYA_PYTHON:-.venv-kohya/bin/python}"
SD_SCRIPTS_DIR="${SD_SCRIPTS_DIR:-vendor/sd-scripts}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$KOHYA_PYTHON" -m accelerate.commands.launch --num_cpu_threads_per_process 2 --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  "$SD_SCRIPTS_DIR/train_network.py" \
  --config_file runs/demo/config.toml --dataset_config runs/demo/dataset.toml "$@"
