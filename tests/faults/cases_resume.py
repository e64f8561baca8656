"""`train --resume`: it continues the same run or refuses, saying what differs; a resume past the end is a
no-op. The interrupted run is laid out as kohya leaves it (a state folder per saved epoch, train_state.json
written first, the launch manifest of the first launch)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from dermkohya import train

from .project import RUN, Project, refused, succeeded
from .registry import case

A = "resume"


def interrupted_run(project: Project, *, epoch: int = 1) -> Path:
    """output/tiny/ as kohya leaves it when it dies in epoch `epoch + 1`: the launch manifest, epoch `epoch`'s
    LoRA and its state folder. Returns the state folder."""
    prepared = train.prepare_launch(Path("runs/tiny.toml"), project_root=project.root, overlap=False)
    out = project.root / "output/tiny"
    out.mkdir(parents=True)
    manifest = prepared.manifest | {"state": "failed", "exit_code": 1, "started": "2026-11-30T10:00:00+00:00"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(project.lora, out / f"tiny-{epoch:06d}.safetensors")
    state = out / f"tiny-{epoch:06d}-state"
    state.mkdir()
    shutil.copyfile(project.lora, state / "model.safetensors")
    for part in ("optimizer.bin", "scheduler.bin"):
        with zipfile.ZipFile(state / part, "w") as z:
            z.writestr("archive/data.pkl", b"kohya state" * 100)
    (state / "random_states_0.pkl").write_bytes(b"rng")
    (state / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": 2 * epoch}))
    return state


def _argv(project: Project) -> list[str]:
    return json.loads((project.root / "output/tiny/stand-in.argv.json").read_text())


@case("resume-changed-run-file", A, "`--resume` after a training setting changed in the run file (learning rate, rank)",
      "refuses before launch: lists each changed `[section] key` old → new, says to undo it or use --new")
def _(project: Project) -> None:
    interrupted_run(project)
    project.write("runs/tiny.toml", RUN.replace("dim = 4", "dim = 8") + "learning_rate = 2e-4\n")
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml", "--resume"), "[network] dim: 4 → 8", "[train] learning_rate: 0.0001 → 0.0002",
            "undo the change, or train afresh with --new", "train.epochs", code=1)
    assert not (project.root / "output/tiny/stand-in.argv.json").exists()


@case("resume-allowed-changes", A, "`--resume` after raising epochs and changing save and sample settings",
      "works: those keys may change on a resume; kohya is launched with --resume <last state>")
def _(project: Project) -> None:
    interrupted_run(project)
    project.write("runs/tiny.toml", RUN.replace("epochs = 2", "epochs = 3\nsave_every_n_epochs = 2\nsave_precision = \"float\"")
                  + '[sample]\nprompts = ["plaque psoriasis"]\nevery_n_epochs = 1\n')
    project.freeze()
    succeeded(project.cli("train", "runs/tiny.toml", "--resume"), "trained", "collected")
    argv = _argv(project)
    assert argv[argv.index("--resume") + 1] == "output/tiny/tiny-000001-state"


@case("resume-changed-dataset", A, "`--resume` after the dataset changed (one caption edited)",
      "refuses before launch: names the dataset and both content hashes; a resume never mixes datasets")
def _(project: Project) -> None:
    interrupted_run(project)
    project.write("data/1_derm/1.txt", "clinical dermatology photograph, eczema")
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml", "--resume"), "the dataset", "changed (content hash", "--new", code=1)


@case("resume-changed-base", A, "`--resume` after the base checkpoint was replaced by another file of the same name",
      "refuses before launch: names the base and both sha256s")
def _(project: Project) -> None:
    interrupted_run(project)
    path = project.root / "models/base.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] = 7
    path.write_bytes(bytes(data))
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml", "--resume"), "the base model", "models/base.safetensors changed (sha256", code=1)


@case("resume-no-state", A, "`--resume` when no state folder was saved (or it was deleted)",
      "refuses: names output/<run>/, says states need save_state = true, and to start afresh with --new")
def _(project: Project) -> None:
    shutil.rmtree(interrupted_run(project))
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml", "--resume"), "--resume: no saved kohya state in", "output/tiny",
            "save_state = true", "--new", code=1)


@case("resume-truncated-state", A, "`--resume` from a state folder kohya was killed while writing (a truncated optimizer.bin)",
      "refuses before launch: names the broken file, says to remove that state (to resume from the one before) or use --new")
def _(project: Project) -> None:
    state = interrupted_run(project)
    data = (state / "optimizer.bin").read_bytes()
    (state / "optimizer.bin").write_bytes(data[: len(data) // 2])
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml", "--resume"), "tiny-000001-state/optimizer.bin is truncated",
            "remove", "--new", code=1)


@case("resume-other-sd-scripts", A, "`--resume` of a state that another sd-scripts commit saved",
      "works, with a warning naming both commits (kohya may load the state differently)")
def _(project: Project) -> None:
    interrupted_run(project)
    manifest_path = project.root / "output/tiny/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sd_scripts"]["commit"] = "0123456789abcdef0123456789abcdef01234567"
    manifest_path.write_text(json.dumps(manifest))
    project.freeze()
    ran = project.cli("train", "runs/tiny.toml", "--resume")
    succeeded(ran, "warning: --resume: tiny-000001-state was saved by sd-scripts 0123456789abcdef", "trained")


@case("resume-after-last-epoch", A, "`--resume` when the saved state is already at the run's last epoch",
      "nothing to do: says so and how to train further; exit 0; nothing launched or rewritten")
def _(project: Project) -> None:
    interrupted_run(project, epoch=2)
    project.freeze()
    before = (project.root / "output/tiny/manifest.json").read_bytes()
    succeeded(project.cli("train", "runs/tiny.toml", "--resume"), "is at epoch 2 of 2 ([train] epochs): nothing left to resume",
              "Raise [train] epochs")
    assert (project.root / "output/tiny/manifest.json").read_bytes() == before
    assert not (project.root / "output/tiny/stand-in.argv.json").exists() and not os.path.exists(project.root / "output/tiny/train.log")
