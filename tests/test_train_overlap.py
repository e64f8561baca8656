"""The slow first-run checks (base-model hash, kohya's option list) run while kohya starts.

These drive `dermkohya train` end to end through the real `accelerate launch`, with a stand-in for
sd-scripts' train_network.py: it proves the orchestration (what runs when, what is stopped, what the
manifest says), never that training works — tests/test_train.py does that with the real kohya.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from dermkohya import basemodel, kohya, render, train
from dermkohya.errors import DermkohyaError, ProblemsError

from _processes import running
from _stand_in import STAND_IN_HEAD, base_checkpoint

pytest.importorskip("accelerate", reason="the stand-in is launched through accelerate, as kohya is")

BASE = base_checkpoint()  # an SD 1.5 checkpoint as far as the base resolver reads it
RUN = """
[model]
base = "models/base.safetensors"
{pin}
[dataset]
train_data_dir = "data"
[train]
resolution = 64
mixed_precision = "no"
data_loader_workers = 0
persistent_data_loader_workers = false
"""

# kohya's train_network.py as far as dermkohya sees it: setup_parser() with the options of known_keys.json,
# a slow start-up, tqdm progress lines, the LoRA in --output_dir.
STAND_IN = STAND_IN_HEAD + '''
if __name__ == "__main__":
    flat = read_config()
    Path(os.environ["STAND_IN_PID"]).write_text(str(os.getpid()))
    time.sleep(float(os.environ["STAND_IN_STARTUP_S"]))
    for step in (1, 2):
        sys.stderr.write(f"\\rsteps: {step * 50}%|##| {step}/2 [00:01<00:00, 2.00it/s, avr_loss=0.{step}]")
        sys.stderr.flush()
    out = Path(flat["output_dir"]) / (flat["output_name"] + ".safetensors")
    out.write_bytes(b"a LoRA")
    print("\\nsaved", out)
'''


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    (root / "runs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "base.safetensors").write_bytes(BASE)
    folder = root / "data" / "1_derm"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (190, 120, 110)).save(folder / "a.png")
    (folder / "a.txt").write_text("clinical dermatology photograph, plaque")

    sd_scripts = tmp_path / "sd-scripts"
    sd_scripts.mkdir()
    (sd_scripts / "train_network.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(sd_scripts))
    monkeypatch.setenv("KOHYA_PYTHON", sys.executable)
    monkeypatch.setenv("DERMKOHYA_CACHE", str(tmp_path / "cache"))  # cold: no cached hash, no cached option list
    monkeypatch.setenv("STAND_IN_PID", str(tmp_path / "stand-in.pid"))
    monkeypatch.setenv("STAND_IN_STARTUP_S", "0.5")
    monkeypatch.setattr(kohya, "REQUIRED_MODULES", ("accelerate",))  # the stand-in needs no more of kohya's environment
    return root


def _write_run(root: Path, *, pin: str = "", drop_key: str | None = None) -> Path:
    run = root / "runs" / "tiny.toml"
    run.write_text(RUN.format(pin=pin))
    keys = set(render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False).config_keys)
    keys -= {"config_file", "dataset_config", drop_key}
    sd_scripts = Path(os.environ["SD_SCRIPTS_DIR"])
    (sd_scripts / "known_keys.json").write_text(json.dumps(sorted(keys)))
    return Path("runs/tiny.toml")


def _after_kohya_started(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Make a check finish only once the stand-in runs, so the stop hits a running kohya, not accelerate's start."""
    real = getattr(module, name)
    pid_file = Path(os.environ["STAND_IN_PID"])

    def later(*args: object, **kwargs: object) -> object:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, later)


def test_first_run_checks_while_kohya_starts_and_caches_their_answers(project: Path) -> None:
    run = _write_run(project, pin=f'sha256 = "{hashlib.sha256(BASE).hexdigest()}"')
    result = train.train(run, project_root=project)
    assert result.returncode == 0 and result.lora and result.lora.read_bytes() == b"a LoRA"
    assert result.overlapped_checks == ["base model sha256", "rendered keys against kohya's parser"]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["checked_while_kohya_starts"] == result.overlapped_checks
    assert manifest["base_model"]["sha256"] == hashlib.sha256(BASE).hexdigest()
    assert manifest["base_model"]["verified"] is True
    timing = manifest["timing"]
    checks, first_step = timing["checks_finished_after_launch_s"], timing["kohya_first_step_after_launch_s"]
    assert checks > 0 and first_step > 0
    assert abs(timing["kohya_held_back_s"] - max(0.0, checks - first_step)) < 0.02
    assert round(result.overhead_seconds, 3) >= timing["dermkohya_before_launch_s"]

    # The answers are cached now: the second run checks everything before the launch, nothing beside kohya.
    again = train.train(run, project_root=project, new=True)
    assert again.returncode == 0 and again.overlapped_checks == [] and again.checks_seconds is None
    second = json.loads(again.manifest_path.read_text())
    assert second["base_model"]["verified"] is True and second["timing"]["kohya_held_back_s"] == 0


def test_a_different_checkpoint_stops_kohya_before_it_trains(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _write_run(project, pin=f'sha256 = "{"0" * 64}"')
    monkeypatch.setenv("STAND_IN_STARTUP_S", "120")  # kohya still loading when the hash is known
    _after_kohya_started(monkeypatch, basemodel, "sha256_path")
    with pytest.raises(DermkohyaError, match="expects 0{64}: you have a different checkpoint.*kohya was stopped, its log is"):
        train.train(run, project_root=project)
    pid = int(Path(os.environ["STAND_IN_PID"]).read_text())
    time.sleep(0.2)
    assert not running(pid)
    output = project / "output" / "tiny"
    assert not (output / "tiny.safetensors").exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["stopped"]["cause"] == "check" and "different checkpoint" in manifest["stopped"]["message"]
    assert manifest["exit_code"] != 0 and manifest["state"] == "stopped"
    assert (output / "train.log").read_text().startswith("$ ")


def test_an_option_kohya_does_not_know_stops_kohya_and_is_named(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _write_run(project, drop_key="network_dim")
    monkeypatch.setenv("STAND_IN_STARTUP_S", "120")
    _after_kohya_started(monkeypatch, kohya, "argument_names")
    with pytest.raises(ProblemsError) as raised:
        train.train(run, project_root=project)
    assert any("`network_dim` is not an option of sd-scripts' train_network.py" in p for p in raised.value.problems)
    assert "kohya was stopped" in raised.value.problems[-1]
    assert not running(int(Path(os.environ["STAND_IN_PID"]).read_text()))
    assert not (project / "output" / "tiny" / "tiny.safetensors").exists()


def test_overlap_false_checks_everything_before_anything_starts(project: Path) -> None:
    run = _write_run(project, pin=f'sha256 = "{"0" * 64}"')
    with pytest.raises(DermkohyaError, match="different checkpoint"):
        train.prepare_launch(run, project_root=project, overlap=False)
    assert not Path(os.environ["STAND_IN_PID"]).exists() and not (project / "output" / "tiny").exists()


def test_cached_sha256_reads_nothing_and_notices_a_changed_file(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    cache = tmp_path / "cache"
    assert basemodel.cached_sha256(model, cache_root=cache) is None
    digest = basemodel.sha256_path(model, cache_root=cache)
    assert basemodel.cached_sha256(model, cache_root=cache) == digest
    folder = tmp_path / "diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"u")
    (folder / "model_index.json").write_text("{}")
    assert basemodel.cached_sha256(folder, cache_root=cache) is None
    assert basemodel.cached_sha256(folder, cache_root=cache) is None
    assert basemodel.sha256_path(folder, cache_root=cache) == basemodel.cached_sha256(folder, cache_root=cache)
    model.write_bytes(b"other weights")
    assert basemodel.cached_sha256(model, cache_root=cache) is None


def test_a_stop_after_new_says_where_the_previous_run_is(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = project / "output" / "tiny"
    previous.mkdir(parents=True)
    (previous / "tiny.safetensors").write_bytes(b"the first LoRA")
    run = _write_run(project, pin=f'sha256 = "{"0" * 64}"')
    monkeypatch.setenv("STAND_IN_STARTUP_S", "120")
    with pytest.raises(DermkohyaError, match=r"previous outputs are kept in .*tiny\.1"):
        train.train(run, project_root=project, new=True)
    assert (project / "output" / "tiny.1" / "tiny.safetensors").read_bytes() == b"the first LoRA"
