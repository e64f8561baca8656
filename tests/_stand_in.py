"""A project whose kohya is a stand-in for sd-scripts' train_network.py, launched through the real
`accelerate launch`, and a dermkohya process that trains it: for the tests of locks and supervision.

The stand-in writes its pid to output/<run>/stand-in.pid, sleeps STAND_IN_STARTUP_S, prints kohya's
progress lines and writes the LoRA. `start_train` runs `train.train` in a separate Python process (a
real dermkohya that can be signalled, SIGKILL included).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from dermkohya import kohya, locks, render

RUN = """
[model]
base = "models/base.safetensors"
[dataset]
train_data_dir = "data"
[train]
resolution = 64
mixed_precision = "no"
data_loader_workers = 0
persistent_data_loader_workers = false
"""

# What every stand-in train_network.py shares: kohya's setup_parser() with the options of known_keys.json, and
# the rendered --config_file read flat, as kohya's read_config_from_file merges its sections.
STAND_IN_HEAD = '''
import argparse, json, os, shutil, sys, time, tomllib, zipfile
from pathlib import Path

def setup_parser():
    parser = argparse.ArgumentParser()
    for key in json.loads((Path(__file__).parent / "known_keys.json").read_text()):
        parser.add_argument("--" + key)
    parser.add_argument("--config_file")
    parser.add_argument("--dataset_config")
    return parser

def read_config(lenient=False):
    parser = setup_parser()
    args = parser.parse_known_args()[0] if lenient else parser.parse_args()
    config = tomllib.loads(Path(args.config_file).read_text())
    return {k: v for section in config.values() if isinstance(section, dict) for k, v in section.items()}
'''

STAND_IN = STAND_IN_HEAD + '''
if __name__ == "__main__":
    flat = read_config()
    out = Path(flat["output_dir"])
    (out / "stand-in.pid").write_text(str(os.getpid()))
    time.sleep(float(os.environ["STAND_IN_STARTUP_S"]))
    for step in (1, 2):
        sys.stderr.write(f"\\rsteps: {step * 50}%|##| {step}/2 [00:01<00:00, 2.00it/s, avr_loss=0.{step}]")
        sys.stderr.flush()
    (out / (flat["output_name"] + ".safetensors")).write_bytes(b"a LoRA")
    print("\\nsaved")
'''

# A dermkohya that trains one run and says how it ended; kohya's environment is the stand-in's (accelerate only).
DRIVER = """
import sys
from pathlib import Path
from dermkohya import kohya, train
kohya.REQUIRED_MODULES = ("accelerate",)
result = train.train(Path(sys.argv[2]), project_root=Path(sys.argv[1]))
print("ENDED", result.state.value, result.returncode, flush=True)
"""


def base_checkpoint() -> bytes:
    """A .safetensors file whose header names SD 1.5 text-encoder keys (what identifies the family)."""
    header = json.dumps({"cond_stage_model.transformer.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0\0\0\0"


def make_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: tuple[str, ...] = ("tiny",)) -> Path:
    """A project with one image, a base checkpoint and run files `runs/<name>.toml`; the stand-in as sd-scripts."""
    root = tmp_path / "project"
    (root / "runs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "base.safetensors").write_bytes(base_checkpoint())
    folder = root / "data" / "1_derm"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (190, 120, 110)).save(folder / "a.png")
    (folder / "a.txt").write_text("clinical dermatology photograph, plaque")

    sd_scripts = tmp_path / "sd-scripts"
    sd_scripts.mkdir()
    (sd_scripts / "train_network.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(sd_scripts))
    monkeypatch.setenv("KOHYA_PYTHON", sys.executable)
    monkeypatch.setenv("DERMKOHYA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STAND_IN_STARTUP_S", "0.2")
    monkeypatch.setattr(kohya, "REQUIRED_MODULES", ("accelerate",))
    keys: set[str] = set()
    for name in runs:
        (root / "runs" / f"{name}.toml").write_text(RUN)
        keys |= set(render.render(Path(f"runs/{name}.toml"), project_root=root, check_keys=False).config_keys)
    (sd_scripts / "known_keys.json").write_text(json.dumps(sorted(keys - {"config_file", "dataset_config"})))
    return root


def start_train(root: Path, run: str = "tiny", *, startup_s: float = 120, until: str = "kohya runs") -> subprocess.Popen[str]:
    """A dermkohya process training `run`; returns once the stand-in (kohya) runs, or with until="locked"
    as soon as it holds the run's lock (kohya may still be starting)."""
    env = dict(os.environ, STAND_IN_STARTUP_S=str(startup_s))
    process = subprocess.Popen([sys.executable, "-c", DRIVER, str(root), f"runs/{run}.toml"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if until == "locked":
        record = locks.record_path(locks.run_lock(root, run))
        deadline = time.monotonic() + 60
        while (held := locks.holder(locks.run_lock(root, run))) is None or held.pid != process.pid:
            assert process.poll() is None and time.monotonic() < deadline, f"no lock in {record}"
            time.sleep(0.05)
    else:
        stand_in_pid(root, run, process)
    return process


def stand_in_pid(root: Path, run: str, process: subprocess.Popen[str] | None = None, timeout: float = 60) -> int:
    pid_file = root / "output" / run / "stand-in.pid"
    deadline = time.monotonic() + timeout
    while not (pid_file.exists() and pid_file.read_text()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"dermkohya ended before kohya started:\n{process.stdout.read() if process.stdout else ''}")
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.05)
    return int(pid_file.read_text())
