"""The run file schema: card defaults, every error at once, unknown keys named with the nearest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.spec import load_run

PROJECT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_card_defaults(tmp_path: Path) -> None:
    spec, name = load_run(_write(tmp_path, '[model]\nbase = "m.safetensors"\n[dataset]\ntrain_data_dir = "data"\n'))
    assert name == "run"
    assert (spec.model.family, spec.resolution, spec.script) == ("sd15", 512, "train_network.py")
    assert (spec.network.dim, spec.network.alpha) == (16, 16)
    assert (spec.train.learning_rate, spec.train.batch_size, spec.train.epochs) == (1e-4, 4, 3)
    assert spec.train.mixed_precision == "fp16"


def test_sdxl_defaults_to_1024_and_its_script(tmp_path: Path) -> None:
    spec, _ = load_run(_write(tmp_path, '[model]\nbase = "x"\nfamily = "sdxl"\n[dataset]\ntrain_data_dir = "d"\n'))
    assert (spec.resolution, spec.script) == (1024, "sdxl_train_network.py")


def test_every_problem_reported_at_once_with_lines_and_suggestions(tmp_path: Path) -> None:
    text = (
        '[model]\nbase = "m"\n'
        '[dataset]\ntrain_data_dir = "d"\n'
        "[train]\nlearnig_rate = 1e-4\nbatch_size = 0\nmixed_precision = \"fp8\"\n"
        "[netwrok]\ndim = 8\n"
    )
    with pytest.raises(ProblemsError) as caught:
        load_run(_write(tmp_path, text))
    problems = "\n".join(caught.value.problems)
    assert len(caught.value.problems) == 4
    assert "unknown key `[train] learnig_rate` (line 6): did you mean `learning_rate`?" in problems
    assert "[train] batch_size` (line 7)" in problems
    assert "mixed_precision" in problems and "fp8" in problems
    assert "unknown key `netwrok`" in problems and "did you mean `network`?" in problems


def test_missing_sections_and_dataset_source(tmp_path: Path) -> None:
    with pytest.raises(ProblemsError) as caught:
        load_run(_write(tmp_path, '[dataset]\ntrain_data_dir = "a"\nprepared = "b"\n'))
    problems = "\n".join(caught.value.problems)
    assert "missing key `model`" in problems
    assert "exactly one of `train_data_dir`" in problems


def test_smoke_base_must_match_family(tmp_path: Path) -> None:
    with pytest.raises(ProblemsError, match="random:sd15"):
        load_run(_write(tmp_path, '[model]\nbase = "random:sd15"\nfamily = "sdxl"\n[dataset]\ntrain_data_dir = "d"\n'))


def test_multi_node_needs_an_address(tmp_path: Path) -> None:
    with pytest.raises(ProblemsError, match="main_process_ip"):
        load_run(_write(tmp_path, '[model]\nbase = "m"\n[dataset]\ntrain_data_dir = "d"\n[launch]\nmachines = 2\n'))


def test_bad_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match="run.toml: not valid TOML"):
        load_run(_write(tmp_path, "[model\n"))
    with pytest.raises(DermkohyaError, match="nope.toml: run file not found"):
        load_run(tmp_path / "nope.toml")


@pytest.mark.parametrize("run", ["demo", "derm-sd15", "derm-sdxl"])
def test_shipped_run_files_validate(run: str) -> None:
    spec, name = load_run(PROJECT / "runs" / f"{run}.toml")
    assert name == run
    if run == "derm-sd15":  # the user's card, exactly
        assert (spec.resolution, spec.network.dim, spec.network.alpha, spec.train.learning_rate,
                spec.train.batch_size, spec.train.epochs, spec.train.mixed_precision) == (512, 16, 16, 1e-4, 4, 3, "fp16")
