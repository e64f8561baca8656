"""bench/ti_throughput.py without a GPU: its run files load as dermkohya run files with the bench's steps,
the dataset keeps the asked diagnoses, each kohya launch gets its own progress record, and the summary's
arithmetic. The harness itself runs on the device (`bash bench/gpu_ti.sh`); its CPU smoke is `--smoke`."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from dermkohya import demo, kohya
from dermkohya.spec import load_run

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import ti_throughput as tb  # noqa: E402


def test_the_dataset_keeps_the_first_diagnoses_with_their_metadata(tmp_path: Path) -> None:
    data = demo.make_demo_dataset(tmp_path / "data", per_cell=1, size=32)
    assert tb.limit_diagnoses(data, 2) == ["erythema patch", "pustule-like dots"]
    rows = list(csv.DictReader((data / "metadata.csv").open()))
    assert len(rows) == 12 and len(list(data.glob("*/*.png"))) == 12 and len(list(data.glob("*/*.txt"))) == 12
    assert all((data / r["image"]).is_file() for r in rows)


@pytest.mark.parametrize("smoke", [False, True])
def test_run_files_are_the_shipped_recipes_with_the_bench_steps(tmp_path: Path, smoke: bool) -> None:
    setup = tb.Setup(tmp_path, tmp_path / "work", tmp_path / "data", smoke, ti_steps=50, lora_steps=60)
    ti_spec, name = load_run(tb.run_file(setup, "derm-sd15-ti.toml", "bench-ti-then-lora"))
    lora_spec, _ = load_run(tb.run_file(setup, "derm-sd15.toml", "bench-lora-only"))
    assert name == "bench-ti-then-lora" and ti_spec.method == "ti_then_lora" and lora_spec.method == "lora"
    ti = ti_spec.textual_inversion
    assert (ti.token_scope, ti.max_steps, ti.epochs, ti.learning_rate) == ("diagnosis", 50, None, 5e-3)
    for spec in (ti_spec, lora_spec):
        assert spec.model.base == "random:sd15" and spec.dataset.train_data_dir == str(tmp_path / "data")
        assert (spec.train.max_steps, spec.train.epochs, spec.train.batch_size) == (60, None, 4)
        assert spec.resolution == (64 if smoke else 512) and spec.train.mixed_precision == ("no" if smoke else "fp16")
        assert spec.sample.every_n_epochs is None and spec.network.dim == 16
    assert lora_spec.network.module == ti_spec.network.module == "dermkohya.networks.lora_fast"


def test_each_launch_gets_its_own_progress_and_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timer = tb.LaunchTimer()
    monkeypatch.setattr(kohya, "launch", kohya.launch)  # undone after the test
    timer.install()
    lines = "import sys\nfor i in range(1, 4): sys.stderr.write(f'\\rsteps: {33 * i}%|##| {i}/3 [00:01<00:00, 2.00it/s, avr_loss=0.{i}]')\nprint()"
    for script in ("train_textual_inversion.py", "train_network.py"):
        (tmp_path / script).write_text(lines)
        kohya.launch([sys.executable, str(tmp_path / script)], cwd=tmp_path, log_path=tmp_path / f"{script}.log",
                     env=kohya.kohya_env(), on_line=timer.on_line)
    first, second = (tb.describe(launch, warmup=1) for launch in timer.launches)
    assert first["script"] == "train_textual_inversion.py" and second["script"] == "train_network.py"
    assert first["steps"] == second["steps"] == 3 and first["returncode"] == 0 and second["final_loss"] == 0.3
    assert first["window"] == [1, 3] and first["it_per_s"] is not None and first["startup_s"] >= 0


def _launch(script: str, it_per_s: float, startup: float, wall: float, steps: int) -> dict:
    return {"script": script, "it_per_s": it_per_s, "startup_s": startup, "wall_s": wall, "steps": steps}


def test_the_summary_puts_both_phases_beside_the_lora_only_default() -> None:
    report = {
        "ti_then_lora": {"wall_s": 200.0, "launches": [
            _launch("train_textual_inversion.py", 4.0, 30.0, 50.0, 50), _launch("train_textual_inversion.py", 6.0, 40.0, 50.0, 50),
            _launch("train_network.py", 8.0, 60.0, 80.0, 60)]},
        "lora_only": {"wall_s": 90.0, "launches": [_launch("train_network.py", 10.0, 55.0, 75.0, 60)]},
    }
    tb.summarise(report)
    assert report["phase1_textual_inversion"] == {"runs": 2, "steps": 100, "it_per_s": 5.0, "wall_s": 100.0,
                                                  "startup_s_median": 35.0}
    assert report["phase2_lora"]["it_per_s"] == 8.0 and report["lora_only_default"]["it_per_s"] == 10.0
    assert report["phase2_vs_lora_only_it_per_s"] == 0.8 and report["phase1_vs_lora_only_it_per_s"] == 0.5
    assert report["dermkohya_outside_kohya_s"] == 20.0
    assert report["cell_scope_estimate"]["phase1_s"] == 18 * (35 + 300)


def test_the_summary_reads_the_sdxl_scripts_phases_too() -> None:
    report = {"ti_then_lora": {"wall_s": 300.0, "launches": [
        _launch("sdxl_train_textual_inversion.py", 0.5, 60.0, 96.0, 2), _launch("sdxl_train_network.py", 0.4, 64.0, 107.0, 2)]}}
    tb.summarise(report)
    assert report["phase1_textual_inversion"]["runs"] == 1 and report["phase1_textual_inversion"]["it_per_s"] == 0.5
    assert report["phase2_lora"]["it_per_s"] == 0.4


def test_the_sdxl_run_is_the_shipped_sdxl_recipe_on_random_sdxl(tmp_path: Path) -> None:
    setup = tb.Setup(tmp_path, tmp_path / "work", tmp_path / "data", False, ti_steps=30, lora_steps=40, family="sdxl")
    spec, _ = load_run(tb.run_file(setup, tb.FAMILIES["sdxl"][0], "bench-ti-then-lora"))
    assert spec.method == "ti_then_lora" and spec.model.base == "random:sdxl" and spec.model.vae is None
    assert spec.script == "sdxl_train_network.py" and spec.resolution == 1024 and spec.train.max_steps == 40
    assert tb.FAMILIES["sdxl"][1] is None  # the SDXL LoRA-only numbers are train-throughput-sdxl's
