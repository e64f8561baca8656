"""cli: behaviour of the command line itself that no stage module owns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _imports import heavy_imports
from click.testing import CliRunner

import dermkohya
from dermkohya.cli import main


def test_train_fails_before_kohya_runs_when_collect_cannot_be_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dermkohya.collect` needs only dermkohya's core dependencies, so an ImportError there is a bug: it
    surfaces at once (with its traceback) instead of a training that silently skips collecting."""
    monkeypatch.delattr(dermkohya, "collect", raising=False)
    monkeypatch.setitem(sys.modules, "dermkohya.collect", None)  # what a broken module looks like to `import`
    result = CliRunner().invoke(main, ["train", str(tmp_path / "runs" / "r.toml")])
    assert isinstance(result.exception, ImportError) and "dermkohya.collect" in str(result.exception)
    assert result.exit_code == 1 and not (tmp_path / "runs").exists() and not (tmp_path / "output").exists()


def test_collect_imports_with_the_core_dependencies_only() -> None:
    """Why the import above is not guarded: collect (and what it imports) needs no optional extra."""
    assert heavy_imports("import dermkohya.collect") == []


def _project(root: Path, run: str) -> Path:
    """A tiny project: the marker file, one run file and a kohya folder with one captioned image."""
    from PIL import Image

    (root / "dermkohya.toml").write_text("")
    (root / "runs").mkdir()
    (root / "runs" / "tiny.toml").write_text(run)
    folder = root / "data" / "1_derm"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (190, 120, 110)).save(folder / "a.png")
    (folder / "a.txt").write_text("clinical dermatology photograph, plaque")
    return root


RUN = '[model]\nbase = "random:sd15"\n[dataset]\ntrain_data_dir = "data"\n[train]\nresolution = 64\nmixed_precision = "no"\n'


def _one_error(result) -> str:
    """A user mistake: exit 1, the message on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.output


def test_render_names_a_typo_with_its_line_and_the_nearest_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path, RUN.replace("resolution = 64", "resolution = 64\nlearnig_rate = 1e-4"))
    monkeypatch.chdir(root)
    out = _one_error(CliRunner().invoke(main, ["render", "runs/tiny.toml", "--no-kohya-check"]))
    assert "tiny.toml" in out and "`[train] learnig_rate` (line 7)" in out and "did you mean `learning_rate`" in out
    assert not (root / "runs" / "tiny").exists()


def test_train_without_sd_scripts_names_the_fix_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path, RUN)
    monkeypatch.chdir(root)
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(tmp_path / "no-sd-scripts"))
    out = _one_error(CliRunner().invoke(main, ["train", "runs/tiny.toml"]))
    assert "sd-scripts not found" in out and "SD_SCRIPTS_DIR" in out and "make setup" in out
    assert not (root / "output").exists() and not (root / "artifacts").exists()


def test_train_of_a_missing_run_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path, RUN)
    monkeypatch.chdir(root)
    out = _one_error(CliRunner().invoke(main, ["train", "runs/nope.toml"]))
    assert "runs/nope.toml" in out


def test_merge_refuses_a_missing_lora_and_an_existing_output(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # an empty but valid safetensors file
    out = tmp_path / "merged.safetensors"
    missing = _one_error(CliRunner().invoke(main, ["merge", "--base", str(base), "--lora", str(tmp_path / "gone.safetensors"),
                                                   "-o", str(out)]))
    assert "gone.safetensors" in missing and not out.exists()
    out.write_bytes(b"the user's earlier merge")
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(base.read_bytes())
    existing = _one_error(CliRunner().invoke(main, ["merge", "--base", str(base), "--lora", str(lora), "-o", str(out)]))
    assert "merged.safetensors" in existing and out.read_bytes() == b"the user's earlier merge"
