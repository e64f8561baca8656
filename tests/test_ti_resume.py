"""ti.py's launches without the real kohya: the typed ti-manifest.json, --resume (a finished phase-1 token is
kept, an interrupted one is trained again, phase 2 continues kohya's saved state) and --gpus, with stand-ins
for train_textual_inversion.py and train_network.py launched through the real `accelerate launch`.

The stand-ins read the rendered config as kohya does (tests/_stand_in.py), append what they were asked to
tests' launches.txt, and write what kohya writes: an `emb_params` file, a saved state, the LoRA."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from _stand_in import STAND_IN_HEAD
from test_ti import _tiny_base
from dermkohya import collect, demo, kohya, manifests, ti
from dermkohya.errors import DermkohyaError
from dermkohya.records import RecordError

REPO = Path(__file__).resolve().parents[1]

STAND_IN_TI = STAND_IN_HEAD + '''
if __name__ == "__main__":
    import numpy as np
    from safetensors.numpy import save_file
    flat = read_config()
    out = Path(flat["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with open(os.environ["STAND_IN_LAUNCHES"], "a") as fh:
        fh.write(flat["token_string"] + "\\n")
    if flat["token_string"] == os.environ.get("STAND_IN_FAIL_TOKEN"):
        sys.exit("stand-in: stopped in the middle of " + flat["token_string"])
    sys.stderr.write("\\rsteps: 100%|##| 1/1 [00:01<00:00, 1.00it/s, avr_loss=0.1]")
    vectors = np.full((int(flat["num_vectors_per_token"]), 32), len(flat["token_string"]), dtype=np.float32)
    save_file({"emb_params": vectors}, str(out / (flat["output_name"] + ".safetensors")))
'''

STAND_IN_LORA = STAND_IN_HEAD + '''
if __name__ == "__main__":
    import zipfile
    import numpy as np
    from safetensors.numpy import save_file
    flat = read_config(lenient=True)
    out, name = Path(flat["output_dir"]), flat["output_name"]
    out.mkdir(parents=True, exist_ok=True)
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else ""
    with open(os.environ["STAND_IN_LAUNCHES"], "a") as fh:
        fh.write(f"LoRA {flat['pretrained_model_name_or_path']} resume={resume}\\n")
    state = out / f"{name}-000001-state"
    state.mkdir(exist_ok=True)
    save_file({"w": np.zeros(1, dtype=np.float32)}, str(state / "model.safetensors"))
    with zipfile.ZipFile(state / "optimizer.bin", "w") as archive:
        archive.writestr("data.pkl", b"state")
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 1}))
    if os.environ.get("STAND_IN_LORA_FAIL"):
        sys.exit("stand-in: phase 2 stopped after epoch 1")
    save_file({"lora_unet_a.lora_down.weight": np.zeros((4, 8), dtype=np.float32)}, str(out / (name + ".safetensors")))
'''


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "p"
    (root / "runs").mkdir(parents=True)
    (root / "dermkohya.toml").write_text("format = 1\n")
    text = (REPO / "runs" / "demo-ti.toml").read_text().replace('base = "random:sd15"', 'base = "models/base"')
    (root / "runs" / "demo-ti.toml").write_text(text.replace("save_state = false", "save_state = true"))
    demo.make_demo_dataset(root / "datasets" / "demo" / "data", per_cell=1, size=64)
    _tiny_base(root / "models" / "base")
    sd_scripts = tmp_path / "sd-scripts"
    sd_scripts.mkdir()
    (sd_scripts / "train_textual_inversion.py").write_text(textwrap.dedent(STAND_IN_TI))
    (sd_scripts / "train_network.py").write_text(textwrap.dedent(STAND_IN_LORA))
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(sd_scripts))
    monkeypatch.setenv("KOHYA_PYTHON", sys.executable)
    monkeypatch.setenv("DERMKOHYA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STAND_IN_LAUNCHES", str(tmp_path / "launches.txt"))
    monkeypatch.setattr(kohya, "REQUIRED_MODULES", ("accelerate",))
    rendered = ti.render_ti(Path("runs/demo-ti.toml"), project_root=root, check_keys=False)
    keys = set(rendered.phases[0].config_keys) | {"resume"}
    from dermkohya import render

    keys |= set(render.render(Path("runs/demo-ti.toml"), project_root=root, check_keys=False).config_keys)
    (sd_scripts / "known_keys.json").write_text(json.dumps(sorted(keys - {"config_file", "dataset_config"})))
    return root


def _launches(root: Path) -> list[str]:
    path = root.parent / "launches.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return lines


def _record(root: Path) -> manifests.TIManifest:
    return manifests.TIManifest.read(root / "output" / "demo-ti" / "ti-manifest.json")


def test_resume_keeps_finished_tokens_retrains_the_interrupted_one_and_continues_phase_two(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Path("runs/demo-ti.toml")
    monkeypatch.setenv("STAND_IN_FAIL_TOKEN", "<pustule-like-dots>")
    first = ti.train_ti(run, project_root=project)
    assert first.returncode != 0 and _launches(project) == ["<erythema-patch>", "<pustule-like-dots>"]
    record = _record(project)
    assert record.format == "dermkohya.ti-manifest/1" and not record.finished
    assert list(record.embeddings) == ["<erythema-patch>"] and [p.exit_code != 0 for p in record.phases] == [False, True]

    with pytest.raises(DermkohyaError, match="unfinished run: pass --resume"):
        ti.train_ti(run, project_root=project)

    monkeypatch.delenv("STAND_IN_FAIL_TOKEN")
    monkeypatch.setenv("STAND_IN_LORA_FAIL", "1")
    second = ti.train_ti(run, project_root=project, resume=True)
    launches = _launches(project)
    assert launches[:2] == ["<pustule-like-dots>", "<scaly-plaque>"], "a finished phase-1 token is not retrained"
    assert launches[2].startswith("LoRA models/derived/demo-ti-") and launches[2].endswith("resume=")
    assert second.returncode != 0 and second.lora is None
    record = _record(project)
    assert [p.kept for p in record.phases] == [True, False, False, False] and record.phases[-1].token is None
    assert sorted(record.embeddings) == ["<erythema-patch>", "<pustule-like-dots>", "<scaly-plaque>"]
    assert record.derived_base is not None and not record.finished

    monkeypatch.delenv("STAND_IN_LORA_FAIL")
    third = ti.train_ti(run, project_root=project, resume=True)
    assert _launches(project) == ["LoRA " + record.derived_base.path + " resume=output/demo-ti/demo-ti-000001-state"]
    assert third.returncode == 0 and third.lora == project / "output" / "demo-ti" / "demo-ti.safetensors"
    assert _record(project).finished and all(p.kept for p in _record(project).phases[:3])
    launch = manifests.LaunchManifest.read(project / "output" / "demo-ti" / "manifest.json")
    assert launch.resumed_from == "output/demo-ti/demo-ti-000001-state" and launch.exit_code == 0
    assert launch.base_model.derived_from == "models/base" and launch.dataset.trigger_words == sorted(record.embeddings)

    with pytest.raises(DermkohyaError, match="nothing left to resume"):
        ti.train_ti(run, project_root=project, resume=True)
    with pytest.raises(DermkohyaError, match="finished run"):
        ti.train_ti(run, project_root=project)


def test_a_changed_image_retrains_its_token_on_resume(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_FAIL_TOKEN", "<scaly-plaque>")
    ti.train_ti(Path("runs/demo-ti.toml"), project_root=project)
    assert _launches(project) == ["<erythema-patch>", "<pustule-like-dots>", "<scaly-plaque>"]
    image = next(p for p in sorted((project / "datasets" / "demo" / "data").rglob("*.png")))  # an erythema patch
    image.write_bytes(image.read_bytes() + b"\0")
    ti.train_ti(Path("runs/demo-ti.toml"), project_root=project, resume=True)  # <scaly-plaque> fails again
    assert _launches(project) == ["<erythema-patch>", "<scaly-plaque>"], "the changed image's token is trained again"


def test_resume_without_a_launch_and_gpus_for_every_phase(project: Path) -> None:
    with pytest.raises(DermkohyaError, match="nothing of this run was trained yet"):
        ti.train_ti(Path("runs/demo-ti.toml"), project_root=project, resume=True)
    result = ti.train_result(Path("runs/demo-ti.toml"), project_root=project, gpu_ids="1")
    assert result.returncode == 0 and result.manifest_path == project / "output" / "demo-ti" / "manifest.json"
    launch = manifests.LaunchManifest.read(result.manifest_path)
    assert launch.gpu_override is not None and launch.gpu_override.gpu_ids == "1"
    assert launch.command[launch.command.index("--gpu_ids") + 1] == "1"
    logs = sorted((project / "output" / "demo-ti" / "ti").glob("*.log"))
    assert len(logs) == 3 and all("--gpu_ids 1 " in log.read_text().splitlines()[0] for log in logs)


def test_an_old_ti_manifest_is_refused_with_the_command_that_rewrites_it(project: Path) -> None:
    path = project / "output" / "demo-ti" / "ti-manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run_name": "demo-ti", "method": "textual_inversion", "returncode": 0, "embeddings": {}}))
    for attempt in (lambda: collect.collect("demo-ti", project_root=project),
                    lambda: ti.train_ti(Path("runs/demo-ti.toml"), project_root=project)):
        with pytest.raises(RecordError, match=r"unversioned or foreign file.*dermkohya train RUN --new"):
            attempt()
    assert os.path.exists(path), "the old file is left as it is"
