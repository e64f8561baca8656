"""`dermkohya train --resume`: what may change on a resume, and whether kohya's saved state can be resumed.

A resume continues kohya's saved state with the run file as it is now. Keys that only extend or observe a
run (more epochs or steps, saving and sampling) may change; anything else, the dataset's or the base's
hash, refuses and names what changed. A state kohya was still writing (a crash, a full disk) is refused
before kohya reads it; a state at the last epoch means nothing is left to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dermkohya import basemodel, kohya, manifests, render
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.records import RecordError


def saved_states(output_dir: Path, name: str) -> list[Path]:
    """kohya's state folders for this run, oldest first (`<name>-000001-state`, `<name>-step…-state`, `<name>-state`)."""
    if not output_dir.is_dir():
        return []
    states = [p for p in output_dir.glob(f"{name}*-state") if p.is_dir() and (p / "train_state.json").is_file()]
    return sorted(states, key=lambda p: json.loads((p / "train_state.json").read_text()).get("current_step", 0))


RESUMABLE_KEYS = ("description", "train.epochs", "train.max_steps", "train.save_every_n_epochs", "train.save_state",
                  "train.save_precision", "sample.")
_STATE_FILES = (("model", (".safetensors", ".bin")), ("optimizer", (".bin",)))


def check_resume(rendered: render.RenderedRun, state: Path) -> list[str]:
    """Refuse a --resume that would continue a different run: a changed run file (other than RESUMABLE_KEYS),
    dataset or base model, or a state kohya cut short; warn when another sd-scripts commit saved it."""
    where = f"output/{rendered.name}/manifest.json"
    previous = _read_manifest(rendered.output_dir / "manifest.json")
    _check_state_files(state)
    if previous is None:
        return [f"--resume: no readable {where} to compare the run file, dataset and base model with; resuming {state.name} as it is"]
    problems = []
    before, now = _flat(previous.spec), _flat(rendered.spec.model_dump(mode="json"))
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_KEYS):
            section, _, leaf = key.rpartition(".")
            problems.append(f"[{section}] {leaf}: {before.get(key)!r} → {now.get(key)!r}" if section else f"{key}: {before.get(key)!r} → {now.get(key)!r}")
    old_data = previous.dataset.content_hash
    if old_data and old_data != rendered.manifest["dataset"]["content_hash"]:
        problems.append(f"the dataset {rendered.dataset_dir} changed (content hash {old_data[:12]}… → "
                        f"{rendered.manifest['dataset']['content_hash'][:12]}…)")
    old_base = previous.base_model.sha256
    if old_base and not problems:
        sha256 = basemodel.sha256_path(rendered.base_path)
        if sha256 != old_base:
            problems.append(f"the base model {rendered.base_path} changed (sha256 {old_base[:12]}… → {sha256[:12]}…)")
    if problems:
        raise ProblemsError(
            f"--resume of {rendered.run_file} from {state}",
            [*problems, f"a resume continues the same run: undo the change, or train afresh with --new (only "
                        f"{', '.join(k.rstrip('.') for k in RESUMABLE_KEYS)} may change on a resume)"],
        )
    warnings = []
    old_commit = previous.sd_scripts.commit
    current = kohya.sd_scripts_commit(kohya.find_sd_scripts(rendered.project_root))
    if old_commit != current:
        warnings.append(f"--resume: {state.name} was saved by sd-scripts {old_commit or 'of no git commit'}, now "
                        f"{current or 'of no git commit'}: kohya may load it differently; resume with the same commit "
                        "if it fails")
    return warnings


def _check_state_files(state: Path) -> None:
    """kohya writes train_state.json first, then accelerate the weights: a crash or a full disk while saving
    leaves a folder that looks like a state but cannot be loaded."""
    import zipfile

    from dermkohya import lora

    fix = f"kohya was stopped while saving it: remove {state} to resume from the state before it, or start afresh with --new"
    for part, suffixes in _STATE_FILES:
        files = [p for p in state.iterdir() if p.name.startswith(part) and p.suffix in suffixes]
        if not files:
            raise DermkohyaError(f"--resume: {state} has no {part} file ({part}{'/'.join(suffixes)}): {fix}")
        for path in files:
            try:
                if path.suffix == ".safetensors":
                    lora.read_header(path)
                else:
                    with zipfile.ZipFile(path) as archive:
                        archive.namelist()
            except (zipfile.BadZipFile, DermkohyaError, OSError, ValueError) as exc:
                raise DermkohyaError(f"--resume: {path} is truncated or unreadable ({str(exc).splitlines()[0][:120]}): {fix}") from None


def _resume_done(rendered: render.RenderedRun, state: Path) -> str | None:
    """Why a resume of `state` has nothing left to train, or None."""
    saved = json.loads((state / "train_state.json").read_text(encoding="utf-8"))
    train_spec = rendered.spec.train
    epoch, step = int(saved.get("current_epoch", 0)), int(saved.get("current_step", 0))
    if train_spec.epochs is not None and epoch >= train_spec.epochs:
        reached = f"epoch {epoch} of {train_spec.epochs} ([train] epochs)"
    elif train_spec.epochs is None and train_spec.max_steps is not None and step >= train_spec.max_steps:
        reached = f"step {step} of {train_spec.max_steps} ([train] max_steps)"
    else:
        return None
    return (f"{state} is at {reached}: nothing left to resume. Raise [train] epochs or max_steps in "
            f"{rendered.run_file} to train further, or `dermkohya collect {rendered.name}` the result")


def _read_manifest(path: Path) -> manifests.LaunchManifest | None:
    """The previous launch's record; None when missing or unreadable (an older dermkohya's): resume then warns."""
    try:
        return manifests.LaunchManifest.read(path)
    except RecordError:
        return None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


