"""The three manifests as records: each round-trips through its file, an older or foreign file is refused
with the command that rewrites it, and the committed demo manifest is current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dermkohya.manifests import ArtifactManifest, LaunchManifest, LaunchStatus, RunManifest, launch_from, launch_status
from dermkohya.records import RecordError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "runs" / "demo" / "manifest.json"


def run_data() -> dict:
    return {
        "run_name": "demo", "run_file": "runs/demo.toml", "run_file_sha256": "a" * 64, "dermkohya_version": "0.1.0",
        "family": "sd15", "script": "train_network.py", "spec": {"description": "a run"},
        "network": {"module": "networks.lora", "dim": 16, "alpha": 16.0},
        "train": {"learning_rate": 1e-4, "batch_size": 4, "epochs": 2, "resolution": 64},
        "sd_scripts": {"path": "vendor/sd-scripts", "commit": None, "pinned_commit": "48d368fa" * 5},
        "base_model": {"spec": "random:sd15", "path": "models/smoke/x", "expected_sha256": None, "sha256": None,
                       "verified": False, "smoke": True},
        "dataset": {"train_data_dir": "datasets/demo/data", "prepared": None, "content_hash": "c" * 64,
                    "counts": {"eczema": {"I": 2, "VI": 1}}, "images": 3, "effective_samples": 6,
                    "effective_counts": {"eczema": {"I": 4, "VI": 2}}, "caption_template": None,
                    "skin_types": ["I", "II", "III", "IV", "V", "VI"]},
        "sample_prompts": ["eczema, Fitzpatrick skin type I --n blurry"],
        "rendered_sha256": {"config.toml": "d" * 64}, "launch_args": ["-m", "accelerate.commands.launch"],
        "script_args": ["--config_file", "runs/demo/config.toml"],
    }  # fmt: skip


def launch_data() -> dict:
    return launch_from(RunManifest.model_validate(run_data()), command=["python", "train_network.py"],
                       started="2026-11-30T10:00:00+00:00", state="finished", exit_code=0, loss_last=0.12,
                       stopped={"cause": "signal", "signal": "SIGTERM"}, gpu_override={"gpu_ids": "1", "run_file_gpu_ids": None, "by": "--gpus"},
                       timing={"dermkohya_before_launch_s": 1.5, "checks_finished_after_launch_s": None,
                               "kohya_first_step_after_launch_s": 3.0, "kohya_held_back_s": 0.0})  # fmt: skip


def artifact_data() -> dict:
    collect = {"collected_at": "2026-11-30T11:00:00+00:00", "dermkohya_version": "0.1.0", "version": 1,
               "source": {"file": "output/demo/demo.safetensors", "checkpoint": "final", "sha256": "e" * 64},
               "artifact": {"file": "demo.safetensors", "sha256": "f" * 64, "size_bytes": 10, "hash_ok": True},
               "lora": {"rank": 16}, "modules": ["lora_unet_x"],
               "candidates": [{"file": "demo.safetensors", "checkpoint": "final", "ok": True, "problems": []}],
               "samples": {"cells": []}, "checklist": [{"letter": "L", "item": "x", "ticked": True, "evidence": "y"}]}  # fmt: skip
    return {k: v for k, v in launch_data().items() if k != "format"} | {"collect": collect}


@pytest.mark.parametrize("record, data", [(RunManifest, run_data), (LaunchManifest, launch_data), (ArtifactManifest, artifact_data)])
def test_each_manifest_round_trips_through_its_file(tmp_path: Path, record: type[RunManifest], data: object) -> None:
    written = record.model_validate(data())  # type: ignore[operator]
    path = written.write(tmp_path / "manifest.json")
    text = path.read_text(encoding="utf-8")
    assert json.loads(text)["format"] == f"dermkohya.{record.KIND}/1"
    again = record.read(path)
    assert again == written and again.to_json() == text


def test_launch_fields_are_typed() -> None:
    launch = LaunchManifest.model_validate(launch_data())
    assert launch.network.dim == 16 and launch.dataset.effective_samples == 6 and launch.stopped is not None
    assert launch.stopped.signal == "SIGTERM" and launch.timing is not None and launch.timing.kohya_first_step_after_launch_s == 3.0
    assert launch.description == "a run" and launch.base_model.derived_from is None


def test_a_run_manifest_without_format_names_render(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(run_data()), encoding="utf-8")  # as dermkohya wrote it before records
    with pytest.raises(RecordError, match=r"manifest.json: an unversioned or foreign file, not a run-manifest record "
                                          r"\(dermkohya.run-manifest/1; run `dermkohya render RUN` to rewrite it\)"):
        RunManifest.read(path)


def test_a_run_manifest_is_not_a_launch_manifest(tmp_path: Path) -> None:
    path = RunManifest.model_validate(run_data()).write(tmp_path / "manifest.json")
    with pytest.raises(RecordError, match="a run-manifest record, not a launch-manifest record.*dermkohya train RUN --new"):
        LaunchManifest.read(path)


def test_a_key_nothing_writes_is_refused(tmp_path: Path) -> None:
    data = launch_data()
    data["base_model"] = data["base_model"] | {"hub_id": "someone/sd15"}  # issue #12: read by collect, written by nothing
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RecordError, match="base_model.hub_id: Extra inputs are not permitted"):
        LaunchManifest.read(path)


def test_the_committed_demo_manifest_is_a_current_run_manifest() -> None:
    demo = RunManifest.read(DEMO)  # `dermkohya render runs/demo.toml` rewrites it
    assert demo.run_name == "demo" and demo.base_model.smoke and demo.dataset.images == 18


def test_status_readers_get_a_launch_through_its_record_and_older_files_still_read(tmp_path: Path) -> None:
    path = LaunchManifest.model_validate(launch_data()).write(tmp_path / "manifest.json")
    status = launch_status(path)
    assert status is not None and (status.state, status.exit_code, status.loss_last) == ("finished", 0, 0.12)
    path.write_text(json.dumps({"exit_code": 130, "interrupted": True}), encoding="utf-8")  # before records
    assert launch_status(path) == LaunchStatus(exit_code=130, interrupted=True)
    broken = {k: v for k, v in launch_data().items() if k != "network"}
    path.write_text(json.dumps(broken), encoding="utf-8")
    assert launch_status(path) is None  # a versioned file that is not a valid record counts as missing
    assert launch_status(tmp_path / "absent.json") is None
