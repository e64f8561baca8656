"""What `dermkohya train` refuses before anything runs: nothing of a previous run is overwritten.

These need neither sd-scripts nor a model: the refusals come before the environment checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dermkohya import train
from dermkohya.errors import DermkohyaError

RUN = '[model]\nbase = "random:sd15"\n[dataset]\ntrain_data_dir = "data"\n[train]\nresolution = 64\nmixed_precision = "no"\n'


def _project(tmp_path: Path) -> Path:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny.toml").write_text(RUN)
    folder = tmp_path / "data" / "1_derm"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (190, 120, 110)).save(folder / "a.png")
    (folder / "a.txt").write_text("clinical dermatology photograph, plaque")
    return tmp_path


def test_a_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    root = _project(tmp_path)
    output = root / "output" / "tiny"
    output.mkdir(parents=True)
    (output / "tiny.safetensors").write_bytes(b"kohya's LoRA")
    with pytest.raises(DermkohyaError, match="holds a finished run.*--new.*--resume"):
        train.prepare_launch(Path("runs/tiny.toml"), project_root=root)
    assert (output / "tiny.safetensors").read_bytes() == b"kohya's LoRA"


def test_an_unfinished_run_needs_resume_or_new(tmp_path: Path) -> None:
    root = _project(tmp_path)
    output = root / "output" / "tiny"
    output.mkdir(parents=True)
    (output / "tiny-000001.safetensors").write_bytes(b"epoch 1")
    with pytest.raises(DermkohyaError, match="unfinished run: pass --resume"):
        train.prepare_launch(Path("runs/tiny.toml"), project_root=root)
    with pytest.raises(DermkohyaError, match="--resume: no saved kohya state"):
        train.prepare_launch(Path("runs/tiny.toml"), project_root=root, resume=True)
    assert (output / "tiny-000001.safetensors").read_bytes() == b"epoch 1"
