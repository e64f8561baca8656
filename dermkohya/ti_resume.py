"""`dermkohya train --resume` of a textual-inversion run (ti.py): what an interrupted launch leaves that a
resume keeps. A phase-1 embedding is kept while everything it was trained from is unchanged (its rendered
files, its images' bytes, the base); a token whose run was interrupted is trained again (phase-1 runs are
short and save no state); phase 2 continues kohya's last saved state, checked as a LoRA run's resume is.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dermkohya import render
from dermkohya.errors import DermkohyaError
from dermkohya.files import sha256_file
from dermkohya.manifests import TIEmbedding, TIManifest
from dermkohya.resume import check_resume, saved_states

if TYPE_CHECKING:
    from dermkohya.ti import Phase, TIRun


def phase_sha256(phase: Phase, base_sha256: str) -> str:
    """What a phase-1 embedding depends on: its rendered files, its images' bytes and the base. A --resume
    keeps an embedding only while this is unchanged."""
    digest = hashlib.sha256(base_sha256.encode())
    for path in sorted(phase.out_dir.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for image, repeats, _ in phase.token.images if phase.token else ():
        digest.update(f"{image.name}\0{repeats}\0{sha256_file(image)}".encode())
    return digest.hexdigest()


def previous_launch(run: TIRun, output_dir: Path, *, resume: bool, new: bool) -> TIManifest | None:
    """The record of the launch a --resume continues; refusals for a run that holds outputs without it."""
    path = output_dir / "ti-manifest.json"
    rerun = f"`dermkohya train {render.project_path(run.run_file, run.root)}"
    if resume:
        if not path.exists():
            raise DermkohyaError(f"--resume: no {path}: nothing of this run was trained yet; start it with {rerun}`")
        previous = TIManifest.read(path)
        if previous.finished:
            raise DermkohyaError(f"--resume: {path} says every phase finished: nothing left to resume; `dermkohya "
                                 f"collect {run.name}` it, or train afresh with {rerun} --new`")
        return previous
    if new or not (path.exists() or (output_dir / f"{run.name}.safetensors").exists()):
        return None
    if path.exists() and not TIManifest.read(path).finished:
        raise DermkohyaError(f"{output_dir} holds an unfinished run: pass --resume to continue it (finished phase-1 "
                             "tokens are kept, phase 2 continues from kohya's saved state) or --new to keep it aside "
                             "and start afresh")
    raise DermkohyaError(f"{output_dir} holds a finished run: `dermkohya collect {run.name}` it, or pass --new to keep "
                         "it as output/<run>.N and start afresh")


def kept_embedding(previous: TIManifest | None, token: str, rendered_sha256: str, root: Path) -> TIEmbedding | None:
    """A phase-1 embedding of the interrupted launch that a --resume keeps: same inputs, same file."""
    entry = previous.embeddings.get(token) if previous else None
    if entry is None or entry.rendered_sha256 != rendered_sha256:
        return None
    path = root / entry.path
    return entry if path.is_file() and sha256_file(path) == entry.sha256 else None


def lora_state(run: TIRun, rendered: render.RenderedRun, warnings: list[str]) -> Path | None:
    """kohya's last saved state of phase 2, checked as `train --resume` checks a LoRA run's (the base compared
    is the one the tokens were added to); None: phase 2 starts from its beginning."""
    states = saved_states(rendered.output_dir, run.name)
    if not states:
        warnings.append(f"--resume: no saved kohya state of phase 2 in {rendered.output_dir}: phase 2 starts from its "
                        "beginning (states are saved when [train] save_state = true)")
        return None
    warnings += check_resume(replace(rendered, base_path=run.base_path), states[-1])
    return states[-1]
