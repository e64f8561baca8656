"""kohya's own failures, as kohya prints them (a stand-in for train_network.py under the real `accelerate
launch`): dermkohya's exit code says what happened and its hint says what to change."""

from __future__ import annotations

import json

from .project import Project, refused, succeeded
from .registry import case

A = "kohya's failures"


def _train(project: Project, fault: str, *args: str, process: bool = False):
    project.freeze()
    return project.cli("train", "runs/tiny.toml", *args, env={"STAND_IN_FAULT": fault}, process=process)


def _manifest(project: Project) -> dict:
    return json.loads((project.root / "output/tiny/manifest.json").read_text())


@case("kohya-trains", A, "a run that kohya finishes (the baseline every other case departs from)",
      "works: kohya's LoRA is verified and collected into artifacts/tiny/ with its card; exit 0")
def _(project: Project) -> None:
    ran = _train(project, "ok", process=True)
    succeeded(ran, "trained", "collected")
    assert (project.root / "artifacts/tiny/tiny.safetensors").is_file()
    assert _manifest(project)["state"] == "finished"


@case("kohya-cuda-oom", A, "kohya runs out of GPU memory (`CUDA out of memory`)",
      "exit 1; the hint names batch_size, resolution, gradient checkpointing and the memory-saver settings")
def _(project: Project) -> None:
    ran = _train(project, "oom")
    refused(ran, "kohya failed (exit 1)", "CUDA out of memory", "hint:", "batch_size", "gradient_checkpointing", "resolution", code=1)
    assert _manifest(project)["state"] == "failed"


@case("kohya-nan-loss", A, "the loss becomes NaN (fp16 overflow): kohya carries on and writes a NaN LoRA",
      "exit 1, nothing collected; the hint says mixed_precision = \"bf16\" (or a lower learning rate)")
def _(project: Project) -> None:
    ran = _train(project, "nan")
    refused(ran, "NaN", "hint:", 'mixed_precision = "bf16"', code=1)
    assert not (project.root / "artifacts/tiny").exists()


@case("kohya-no-data", A, "kohya logs \"No data found\" and exits 0 without writing a LoRA",
      "exit 1 (kohya's 0 is not a success); the hint says [dataset] must be the parent of the N_concept folders")
def _(project: Project) -> None:
    ran = _train(project, "nodata")
    refused(ran, "No data found", "hint:", "N_concept", code=1)
    assert not (project.root / "artifacts/tiny").exists()


@case("kohya-module-missing", A, "kohya's Python lacks a package (`ModuleNotFoundError`)",
      "exit 1; the hint says to rebuild kohya's environment with `make setup` or fix KOHYA_PYTHON")
def _(project: Project) -> None:
    ran = _train(project, "module")
    refused(ran, "No module named 'imagesize'", "hint:", "make setup", code=1)


@case("kohya-xformers-missing", A, "the run asks for xformers, which kohya's environment lacks",
      "exit 1; the hint says to set [train] attention = \"sdpa\"")
def _(project: Project) -> None:
    ran = _train(project, "xformers")
    refused(ran, "No xformers", "hint:", 'attention = "sdpa"', code=1)


@case("kohya-crash-after-final-save", A, "kohya crashes after it wrote the final LoRA (e.g. while freeing the GPU)",
      "the complete LoRA is still verified and collected; the exit code is kohya's (1) and the message says both")
def _(project: Project) -> None:
    ran = _train(project, "crash-after-save", process=True)
    refused(ran, "kohya failed (exit 1)", "after writing", "collected", code=1)
    assert (project.root / "artifacts/tiny/tiny.safetensors").is_file()
