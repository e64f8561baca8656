"""End to end with the real kohya: dermkohya train → a LoRA; train_command.sh → the same LoRA; Ctrl-C → resume.

Marked `kohya` (needs sd-scripts and .venv-kohya) and `slow` (kohya on the CPU, minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermkohya import basemodel, train
from dermkohya.errors import DermkohyaError
from dermkohya.lora import read_header

pytestmark = [pytest.mark.kohya, pytest.mark.slow]

RUN = """
[model]
base = "random:sd15"
[dataset]
train_data_dir = "data"
min_bucket_reso = 64
max_bucket_reso = 64
[train]
resolution = 64
batch_size = 2
epochs = 2
mixed_precision = "no"
data_loader_workers = 0
persistent_data_loader_workers = false
[sample]
prompts = ["clinical dermatology photograph, plaque, Fitzpatrick skin type V"]
every_n_epochs = 2
steps = 2
"""


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random SD 1.5 smoke model for the session (models/ of every test project links to it)."""
    models = tmp_path_factory.mktemp("models")
    basemodel.ensure_smoke_model("sd15", cache_root=models)
    return models


def _project(root: Path, models: Path) -> Path:
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "tiny.toml").write_text(RUN)
    folder = root / "data" / "1_derm"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"clinical dermatology photograph, plaque, Fitzpatrick skin type {['I', 'III', 'V', 'VI'][i]}")
    (root / "models").symlink_to(models)
    return root


def _tensors(path: Path) -> bytes:
    return path.read_bytes()[read_header(path).data_offset:]


def test_train_then_train_command_sh_gives_the_same_lora(tmp_path: Path, smoke_models: Path) -> None:
    a = _project(tmp_path / "a", smoke_models)
    result = train.train(Path("runs/tiny.toml"), project_root=a)
    assert result.returncode == 0, "\n".join(result.tail)
    assert result.lora and result.lora.is_file()
    lora = read_header(result.lora)
    meta = lora.metadata
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] in ("16", "16.0")
    assert sum(1 for k in lora.tensors if k.endswith(".lora_down.weight")) == 264
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["exit_code"] == 0 and manifest["base_model"]["sha256"] and manifest["sd_scripts"]["commit"]
    assert list((a / "output" / "tiny" / "sample").glob("*.png")), "kohya's sample image is missing"
    assert (a / "output" / "tiny" / "train.log").read_text().count("steps:") > 0

    b = _project(tmp_path / "b", smoke_models)
    train.render.render(Path("runs/tiny.toml"), project_root=b)
    env = dict(os.environ, KOHYA_PYTHON=str(train.kohya.find_python()), SD_SCRIPTS_DIR=str(train.kohya.find_sd_scripts()))
    done = subprocess.run(["bash", str(b / "runs" / "tiny" / "train_command.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert _tensors(b / "output" / "tiny" / "tiny.safetensors") == _tensors(result.lora)

    with pytest.raises(DermkohyaError, match="holds a finished run"):
        train.train(Path("runs/tiny.toml"), project_root=a)


FAST = """
[network]
module = "dermkohya.networks.lora_fast"
"""


@pytest.mark.parametrize("module", ["networks.lora", "lora_fast"])
def test_interrupted_run_resumes_from_kohyas_saved_state(tmp_path: Path, smoke_models: Path, module: str) -> None:
    root = _project(tmp_path / "p", smoke_models)
    if module == "lora_fast":  # its optimizer state in one buffer per kind (flat_state.py): saved and resumed
        run = root / "runs" / "tiny.toml"
        run.write_text(run.read_text().replace("[train]\n", '[train]\noptimizer_args = ["fused=True"]\n') + FAST)

    def stop_after_first_state(line: str) -> None:
        if "Random states saved" in line:
            raise KeyboardInterrupt

    first = train.train(Path("runs/tiny.toml"), project_root=root, on_line=stop_after_first_state)
    assert first.interrupted and first.returncode != 0
    assert first.saved_states and first.saved_states[-1].name == "tiny-000001-state"
    assert not (root / "output" / "tiny" / "tiny.safetensors").exists()

    with pytest.raises(DermkohyaError, match="--resume"):
        train.train(Path("runs/tiny.toml"), project_root=root)
    resumed = train.train(Path("runs/tiny.toml"), project_root=root, resume=True)
    assert resumed.returncode == 0, "\n".join(resumed.tail)
    manifest = json.loads(resumed.manifest_path.read_text())
    assert manifest["resumed_from"].endswith("tiny-000001-state")
    log = (root / "output" / "tiny" / "train.log").read_text()
    assert "resume training from local state" in log
    if module == "lora_fast":
        assert log.count("optimizer state in one buffer per kind") == 2  # the first run's and the resumed run's
        with zipfile.ZipFile(first.saved_states[-1] / "optimizer.bin") as archive:
            # exp_avg, exp_avg_sq and steps in a few records (the writer thread's host copy joins same-dtype ones),
            # not ~1,600
            assert 1 <= sum(1 for name in archive.namelist() if "/data/" in name) <= 3


def test_exit_zero_without_a_lora_is_a_failure(tmp_path: Path, smoke_models: Path) -> None:
    """kohya exits 0 with "No data found" when no folder parses; dermkohya refuses before launch."""
    root = _project(tmp_path / "p", smoke_models)
    shutil.move(root / "data" / "1_derm", root / "data" / "derm")
    with pytest.raises(DermkohyaError, match="no folder kohya will train on"):
        train.train(Path("runs/tiny.toml"), project_root=root)


def test_bad_base_path_fails_before_kohya_starts(tmp_path: Path, smoke_models: Path) -> None:
    root = _project(tmp_path / "p", smoke_models)
    (root / "runs" / "tiny.toml").write_text(RUN.replace('"random:sd15"', '"models/missing.safetensors"'))
    with pytest.raises(DermkohyaError, match="missing.safetensors.*not found"):
        train.train(Path("runs/tiny.toml"), project_root=root)
