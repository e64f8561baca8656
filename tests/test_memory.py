"""The pre-launch memory check: the table from the benchmark, matching a run to it, the verdict and its refusal,
the shipped SDXL run files it is about, and where train and the OOM hint name the same settings."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from dermkohya import kohya, memory, render, train
from dermkohya.errors import DermkohyaError
from dermkohya.spec import RunSpec, load_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TABLE = memory.load_table()
RTX_4090 = memory.Gpu("0", "GPU-4090", "NVIDIA GeForce RTX 4090", free_gib=23.3, total_gib=23.99)
H200 = memory.Gpu("0", "GPU-h200", "NVIDIA H200", free_gib=139.3, total_gib=139.8)


def _shipped(name: str) -> RunSpec:
    return load_run(PROJECT_ROOT / "runs" / f"{name}.toml")[0]


def _with(spec: RunSpec, **sections: dict) -> RunSpec:
    data = spec.model_dump()
    for section, values in sections.items():
        data[section] = data[section] | values
    return RunSpec.model_validate(data)


def _gpu(free_gib: float) -> memory.Gpu:
    return memory.Gpu("0", "GPU-test", "a test GPU", free_gib=free_gib, total_gib=free_gib + 0.5)


# --- the table ----------------------------------------------------------------------------------------

def test_the_shipped_table_is_what_the_benchmark_results_give() -> None:
    assert _generator().build().to_json() == (PROJECT_ROOT / "dermkohya" / memory.TABLE_FILE).read_text(encoding="utf-8"), \
        "dermkohya/memory_table.json is stale: python bench/memory_table.py"


def test_the_table_holds_the_measured_sdxl_profiles() -> None:
    assert TABLE.format == "dermkohya.memory-table/1"
    by_variant = {(m.source.rsplit("/", 1)[-1], m.variant): m for m in TABLE.measurements}
    # the same profile measured twice keeps the larger peak: lora_fast with graphs and norms=autocast (44.35) over the
    # default's 37.16 (norms=half) in the same H200 call, the earlier H200 calls' 43.57 and the H100's
    fast = by_variant["train-throughput-sdxl-h200.json", "sdxl-dermkohya-norms-autocast"]
    assert (fast.family, fast.resolution, fast.batch_size, fast.network, fast.gradient_checkpointing) == (
        "sdxl", 1024, 4, "lora_fast+graphs", False)
    assert fast.peak_gib == 44.35 and fast.gpu == "NVIDIA H200"
    assert ("train-throughput-sdxl-h100.json", "sdxl-dermkohya-lora_fast") not in by_variant
    saver = next(m for m in TABLE.measurements if m.family == "sdxl" and m.gradient_checkpointing
                 and m.network == "networks.lora")
    assert saver.peak_gib == 13.27 and saver.variant == "sdxl-dermkohya-24gb"
    card = by_variant["train-throughput-sdxl-h100.json", "sdxl-card-raw"]  # out of memory on 80 GB: a lower bound
    assert card.at_least and card.attention == "none" and not card.cache_latents
    measured = next(m for (source, variant), m in by_variant.items()  # the whole run on 141 GB (two H200 calls: one kept)
                    if source.startswith("train-throughput-sdxl-h200") and variant == "sdxl-card-raw")
    assert not measured.at_least and measured.peak_gib == 116.25
    two_gpus = {m.network: m for m in TABLE.measurements if m.processes == 2}  # batch per process
    assert two_gpus["lora_fast"].batch_size == two_gpus["lora_fast+graphs"].batch_size == 4  # eager, then graphs under DDP


def _generator():
    module_spec = importlib.util.spec_from_file_location("memory_table", PROJECT_ROOT / "bench" / "memory_table.py")
    generator = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(generator)
    return generator


def test_the_generator_reads_reports_as_the_harness_writes_them(tmp_path: Path) -> None:
    import json

    shipped = json.loads((PROJECT_ROOT / "bench" / "results" / "train-throughput-sdxl-h100.json").read_text())
    variants = {v["name"]: v for v in shipped["variants"]}
    again = dict(variants["sdxl-dermkohya-lora_fast"], peak_gpu_mem_gib=44.0)  # the same profile, measured higher
    broken = dict(variants["sdxl-raw+sdpa"], ok=False, error="RuntimeError: something else")  # says nothing of memory
    (tmp_path / "train-throughput-sdxl-h200.json").write_text(json.dumps(
        shipped | {"variants": [variants["sdxl-card-raw"], again, broken]}))
    (tmp_path / "train-throughput-h200-profile-default.json").write_text(json.dumps({"collapsed": []}))  # not a report
    (tmp_path / "train-throughput-sdxl-h100.json").write_text(json.dumps(shipped))
    table = _generator().build(tmp_path)
    assert [s.file for s in table.sources] == ["bench/results/train-throughput-sdxl-h100.json",
                                               "bench/results/train-throughput-sdxl-h200.json"]
    fast = [m for m in table.measurements if m.network == "lora_fast+graphs"]
    assert len(fast) == 1 and fast[0].peak_gib == 44.0 and fast[0].source.endswith("sdxl-h200.json")
    assert [m.variant for m in table.measurements if m.at_least] == ["sdxl-card-raw"]
    assert len(table.measurements) == len(shipped["variants"])  # the failure that was not memory left no entry


def test_a_table_of_another_format_is_refused_with_the_command_that_rewrites_it(tmp_path: Path) -> None:
    path = tmp_path / "memory_table.json"
    path.write_text('{"format": "dermkohya.memory-table/0", "measurements": []}')
    with pytest.raises(DermkohyaError, match="python bench/memory_table.py"):
        memory.load_table(path)


# --- a run's profile and its estimate -----------------------------------------------------------------

def test_the_shipped_sdxl_runs_are_the_fast_and_the_24gb_profiles() -> None:
    fast = memory.profile_of(_shipped("derm-sdxl"))
    assert (fast.network, fast.gradient_checkpointing, fast.resolution, fast.batch_size) == ("lora_fast+graphs", False, 1024, 4)
    saver = memory.profile_of(_shipped("derm-sdxl-24gb"))
    assert (saver.network, saver.gradient_checkpointing) == ("networks.lora", True)
    assert memory.estimate(fast, TABLE).kind == memory.estimate(saver, TABLE).kind == "measured"
    assert memory.estimate(fast, TABLE).peak_gib == 44.35 and memory.estimate(saver, TABLE).peak_gib == 13.27


def test_lora_fast_graphs_follow_its_own_rules() -> None:
    fast = _shipped("derm-sdxl")
    assert memory.graphs_off_reason(fast) is None
    assert memory.graphs_off_reason(_with(fast, network={"args": ["cuda_graph=off"]})) == "cuda_graph=off"
    assert memory.graphs_off_reason(_with(fast, train={"gradient_accumulation_steps": 2})) == "gradient accumulation"
    assert memory.graphs_off_reason(_with(fast, launch={"processes": 2})) is None  # each process captures its own (DDP)
    assert memory.profile_of(_with(fast, train={"gradient_checkpointing": True})).network == "lora_fast"


def test_an_unmeasured_profile_takes_the_smallest_measurement_that_needs_at_least_as_much() -> None:
    # SD 1.5 with checkpointing was never measured: lora_fast without graphs and without checkpointing bounds it
    saver = memory.profile_of(_with(_shipped("derm-sd15"), train={"gradient_checkpointing": True}))
    found = memory.estimate(saver, TABLE)
    assert found.kind == "upper bound" and found.peak_gib == 8.56
    assert found.basis.variant == "dermkohya-lora_fast-eager" and not found.basis.gradient_checkpointing


def test_batch_and_resolution_scale_up_never_down_and_say_so() -> None:
    saver = _shipped("derm-sdxl-24gb")
    batch8 = memory.estimate(memory.profile_of(_with(saver, train={"batch_size": 8})), TABLE)
    assert batch8.kind == "upper bound" and batch8.peak_gib == pytest.approx(2 * 13.27)
    assert any("batch 8 not measured" in note for note in batch8.notes)
    small = memory.estimate(memory.profile_of(_with(saver, train={"batch_size": 1, "resolution": 512})), TABLE)
    assert small.kind == "upper bound" and small.peak_gib == 13.27 and not small.notes


def test_a_higher_rank_adds_its_weights_and_optimizer_state() -> None:
    rank32 = memory.estimate(memory.profile_of(_with(_shipped("derm-sdxl-24gb"), network={"dim": 32})), TABLE)
    lora_params = rank32.basis.lora_params
    assert lora_params and 50e6 < lora_params < 65e6  # SDXL rank 16, both text encoders: ~57M parameters
    assert rank32.peak_gib == pytest.approx(13.27 + lora_params * 16 / 2**30)
    assert any("rank 32 not measured" in note for note in rank32.notes)


def test_the_card_as_typed_needs_more_than_an_80_gb_card() -> None:
    card = _with(_shipped("derm-sdxl"), network={"module": "networks.lora", "args": []},
                 train={"attention": "none", "cache_latents": False})
    found = memory.estimate(memory.profile_of(card), TABLE)
    # out of memory on an H100 (79.64 GiB, kept as a lower bound); measured whole on an H200 since
    assert found.kind == "measured" and found.peak_gib == 116.25 and found.basis.gpu == "NVIDIA H200"
    refused = memory.verdict(card, "runs/card.toml", [memory.Gpu("0", "u", "NVIDIA H100 80GB HBM3", 79.0, 79.6)], TABLE)
    assert refused.fits is False and 'set [train] attention = "sdpa" (≈44.8 GiB)' in refused.line  # the card + --sdpa
    # on a 24 GB card, the fewest changes that reach a measured profile that fits
    small = memory.verdict(card, "runs/card.toml", [RTX_4090], TABLE)
    assert ('set [train] attention = "sdpa" and [train] cache_latents = true and [train] gradient_checkpointing = true'
            in small.line)


def test_a_module_never_measured_is_matched_to_the_nearest_and_only_warned_about() -> None:
    other = _with(_shipped("derm-sdxl-24gb"), network={"module": "lycoris.kohya"})
    found = memory.estimate(memory.profile_of(other), TABLE)
    assert found.kind == "nearest" and "may be higher" in found.notes[-1]
    small = memory.verdict(other, "runs/x.toml", [_gpu(8.0)], TABLE)
    assert small.fits is None and small.warning and "may not fit" in small.line


# --- the verdict --------------------------------------------------------------------------------------

def test_the_fast_sdxl_run_fits_an_h200() -> None:
    fits = memory.verdict(_shipped("derm-sdxl"), "runs/derm-sdxl.toml", [H200], TABLE)
    assert fits.fits is True and "needs ≈46.6 GiB" in fits.line and fits.line.endswith("fits")
    assert any("one image shape" in note for note in fits.notes)  # graphs per bucket shape: said, not counted


def test_the_fast_sdxl_run_on_a_24gb_card_is_refused_with_file_keys_and_the_24gb_run() -> None:
    refused = memory.verdict(_shipped("derm-sdxl"), "runs/derm-sdxl.toml", [RTX_4090], TABLE)
    assert refused.fits is False and "\n" not in refused.line
    assert refused.line.startswith("runs/derm-sdxl.toml: needs ≈46.6 GiB of GPU memory, GPU 0 (NVIDIA GeForce RTX 4090) "
                                   "has 23.3 of 24.0 GiB free")
    assert "set [train] gradient_checkpointing = true (≈13.9 GiB)" in refused.line
    assert "runs/derm-sdxl-24gb.toml" in refused.line and "--skip-memory-check" in refused.line
    assert "bench/results/train-throughput-sdxl-h200.json" in refused.line  # where the number comes from
    assert memory.verdict(_shipped("derm-sdxl-24gb"), "runs/derm-sdxl-24gb.toml", [RTX_4090], TABLE).fits is True


def test_the_tightest_of_several_gpus_decides() -> None:
    two = _with(_shipped("derm-sd15"), launch={"processes": 2})  # measured on 2 GPUs: 9.42 GiB on each
    assert memory.estimate(memory.profile_of(two), TABLE).kind == "measured"
    assert memory.verdict(two, "runs/two.toml", [_gpu(40.0), _gpu(12.0)], TABLE).fits is True
    refused = memory.verdict(two, "runs/two.toml", [_gpu(40.0), memory.Gpu("1", "u1", "busy GPU", 5.0, 80.0)], TABLE)
    assert refused.fits is False and "GPU 1 (busy GPU) has 5.0 of 80.0 GiB free" in refused.line
    assert "no measured setting fits" in refused.line


def test_a_larger_batch_than_measured_is_told_the_measured_batch() -> None:
    big = _with(_shipped("derm-sdxl-24gb"), train={"batch_size": 8})
    refused = memory.verdict(big, "runs/big.toml", [_gpu(20.0)], TABLE)
    assert refused.fits is False and "set [train] batch_size = 4 (≈13.9 GiB)" in refused.line


def test_highvram_in_the_shipped_runs_is_not_called_outside_the_estimate() -> None:
    shipped = _shipped("derm-sdxl-24gb")
    assert shipped.kohya.get("highvram") is True  # start-up only: no gc.collect() between latent batches
    assert not any("[kohya] options" in note for note in memory.verdict(shipped, "runs/x.toml", [H200], TABLE).notes)


def test_kohya_pass_through_options_are_named_as_outside_the_estimate() -> None:
    passed = _with(_shipped("derm-sdxl-24gb"), kohya={"fp8_base": True})
    assert memory.verdict(passed, "runs/p.toml", [H200], TABLE).notes == [
        "[kohya] options (fp8_base) are not part of the estimate"]


# --- the GPUs ---------------------------------------------------------------------------------------

NVIDIA_SMI = """0, GPU-11111111-2222-3333-4444-555555555555, NVIDIA H200, 142641, 143771
1, GPU-66666666-7777-8888-9999-000000000000, NVIDIA H200, 20480, 143771
2, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee, NVIDIA H200, [N/A], 143771
"""


def test_nvidia_smi_csv_is_read_in_gib() -> None:
    gpus = memory.parse_nvidia_smi(NVIDIA_SMI)
    assert [g.index for g in gpus] == ["0", "1"]
    assert gpus[0].free_gib == pytest.approx(139.30, abs=0.01) and gpus[1].free_gib == 20.0


def test_the_gpus_a_run_uses() -> None:
    run = _with(_shipped("derm-sdxl"), launch={"processes": 2})
    assert memory.gpu_selectors(run, None, {}) == ["0", "1"]
    assert memory.gpu_selectors(run, "1,0", {"CUDA_VISIBLE_DEVICES": "0"}) == ["1", "0"]  # --gpus wins
    assert memory.gpu_selectors(_shipped("derm-sdxl"), None, {"CUDA_VISIBLE_DEVICES": "1,0"}) == ["1"]
    gpus = memory.parse_nvidia_smi(NVIDIA_SMI)
    assert [g.index for g in memory.selected(gpus, ["GPU-66666666-7777-8888-9999-000000000000"])] == ["1"]
    assert "MIG instance" in memory.selected(gpus, ["MIG-1234"])
    assert "not in nvidia-smi's list" in memory.selected(gpus, ["7"])


def _nvidia_smi_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, csv: str) -> None:
    """An `nvidia-smi` that answers the query with `csv`, first on PATH (this machine has no GPU)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{csv}EOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_no_gpu_no_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    found = memory.check_before_launch(_shipped("derm-sdxl"), "runs/derm-sdxl.toml")
    assert found.fits is None and found.line == "memory: not checked: no NVIDIA GPU here (nvidia-smi is not on PATH)"


def test_check_before_launch_asks_nvidia_smi_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nvidia_smi_on_path(tmp_path, monkeypatch, NVIDIA_SMI)
    fast = _shipped("derm-sdxl")
    assert memory.check_before_launch(fast, "runs/derm-sdxl.toml", env={}).fits is True  # GPU 0: 139 GiB free
    with pytest.raises(DermkohyaError, match=r"runs/derm-sdxl.toml: needs ≈46.6 GiB of GPU memory, GPU 1 .*"
                                             r"gradient_checkpointing = true"):
        memory.check_before_launch(fast, "runs/derm-sdxl.toml", gpu_ids="1", env={})
    hidden = memory.check_before_launch(fast, "runs/derm-sdxl.toml", env={"CUDA_VISIBLE_DEVICES": "-1"})
    assert hidden.fits is None and "hides every GPU" in hidden.line


# --- train and the OOM hint ---------------------------------------------------------------------------

def _project(tmp_path: Path, run: str) -> Path:
    root = tmp_path / "project"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / f"{run}.toml").write_text((PROJECT_ROOT / "runs" / f"{run}.toml").read_text(encoding="utf-8"))
    (root / "data" / "2_derm").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 120, 110)).save(root / "data" / "2_derm" / f"img{i}.png")
        (root / "data" / "2_derm" / f"img{i}.txt").write_text("clinical dermatology photograph, plaque")
    return root


def test_train_refuses_before_the_launch_and_skip_memory_check_lets_it_through(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _nvidia_smi_on_path(tmp_path, monkeypatch, "0, GPU-4090, NVIDIA GeForce RTX 4090, 23800, 24564\n")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    root = _project(tmp_path, "derm-sdxl")
    with pytest.raises(DermkohyaError) as refused:
        train.prepare_launch(Path("runs/derm-sdxl.toml"), project_root=root)
    assert str(refused.value).startswith("runs/derm-sdxl.toml: needs ≈46.6 GiB of GPU memory, GPU 0 (NVIDIA GeForce RTX 4090)")
    assert not (root / "output").exists()  # refused before anything was written
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(tmp_path / "no-sd-scripts"))
    with pytest.raises(DermkohyaError, match="sd-scripts not found"):  # past the memory check: the next one stops it
        train.prepare_launch(Path("runs/derm-sdxl.toml"), project_root=root, skip_memory_check=True)


def test_the_override_takes_one_run_file() -> None:
    from click.testing import CliRunner

    from dermkohya.cli import main

    result = CliRunner().invoke(main, ["train", "runs/a.toml", "runs/b.toml", "--skip-memory-check"])
    assert result.exit_code == 2 and "--skip-memory-check take one run file" in result.output


def test_the_oom_hint_names_the_same_settings_and_the_24gb_run() -> None:
    hint = kohya.hint_for(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 120.00 MiB"])
    assert "runs/derm-sdxl-24gb.toml" in hint
    saver = tomllib.loads((PROJECT_ROOT / "runs" / "derm-sdxl-24gb.toml").read_text(encoding="utf-8"))
    assert f"gradient_checkpointing = {str(saver['train']['gradient_checkpointing']).lower()}" in hint
    assert f'module = "{saver["network"]["module"]}"' in hint
    assert "batch_size" in hint and "resolution" in hint  # the fault corpus's kohya-cuda-oom case reads these


# --- the shipped run files -------------------------------------------------------------------------------

@pytest.mark.parametrize("run", ["derm-sdxl", "derm-sdxl-24gb"])
def test_the_shipped_sdxl_runs_render_what_they_say(tmp_path: Path, run: str) -> None:
    root = _project(tmp_path, run)
    rendered = render.render(Path(f"runs/{run}.toml"), project_root=root, check_keys=False)
    config = tomllib.loads(rendered.files["config.toml"].read_text(encoding="utf-8"))
    flat = {k: v for section in config.values() for k, v in section.items()}
    fast = run == "derm-sdxl"
    assert rendered.spec.script == "sdxl_train_network.py" and flat["resolution"] == "1024,1024"
    assert flat["gradient_checkpointing"] is (not fast)
    assert flat["network_module"] == ("dermkohya.networks.lora_fast" if fast else "networks.lora")
    assert flat.get("network_args", []) == (["cuda_graph=on"] if fast else [])
    assert "gradient_checkpointing" in rendered.files["train_command.sh"].read_text() or "--config_file" in \
        rendered.files["train_command.sh"].read_text()


@pytest.mark.kohya
def test_the_24gb_run_renders_keys_sd_scripts_accepts(tmp_path: Path) -> None:
    """derm-sdxl.toml is checked in tests/test_render.py; its 24 GB variant here, the same way."""
    root = _project(tmp_path, "derm-sdxl-24gb")
    rendered = render.render(Path("runs/derm-sdxl-24gb.toml"), project_root=root, check_keys=True)
    assert not any("not checked" in w for w in rendered.warnings)
    assert rendered.spec.script == "sdxl_train_network.py"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
