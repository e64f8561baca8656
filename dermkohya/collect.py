"""File a trained LoRA with its provenance: `collect` (output/<run>/ → artifacts/<run>/) and `inspect`.

kohya records its own `ss_*` metadata but never verifies the base model, records its commit only in a
git checkout and keeps no dataset hash. collect verifies every LoRA kohya wrote for the run, adds
`dermkohya.*` keys by rewriting only the safetensors header (kohya's `sshs_model_hash` stays valid),
and writes the model card, grid and checklist (card.py) and the artifact manifest (manifests.py) beside it. An artifact is never replaced:
collecting the same result again is a no-op, a different one needs `new_version` (→ `<run>-v2`).
No torch: numpy reads the tensors.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dermkohya import __version__, locks, lora
from dermkohya.card import (  # noqa: F401  (collect's public names: the card, grid and checklist live in card.py)
    DISCLAIMER, INTENDED_USE, NOT_RECORDED, evaluation_reports, lora_fine_checklist, model_card, prompt_texts,
    sample_grid, to_json,
)
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.files import private_temp, write_atomic
from dermkohya.manifests import ArtifactManifest, CandidateCheck, CollectPart, LaunchManifest

__all__ = [
    "DISCLAIMER", "INTENDED_USE", "NOT_RECORDED", "Candidate", "collect", "dermkohya_metadata", "evaluation_reports",
    "find_candidates", "inspect", "lora_fine_checklist", "model_card", "run_lock", "run_name", "sample_grid", "verify",
]  # fmt: skip

# ---- finding and verifying kohya's outputs -----------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One LoRA file kohya wrote for the run: the final one, a per-epoch or a per-step save."""

    path: Path
    kind: str  # "final", "epoch" or "step"
    number: int | None

    @property
    def label(self) -> str:
        return "final" if self.kind == "final" else f"{self.kind} {self.number}"


def find_candidates(output_dir: Path, run: str) -> list[Candidate]:
    """kohya's names: `<run>.safetensors`, `<run>-000001.safetensors`, `<run>-step00000001.safetensors`."""
    pattern = re.compile(rf"^{re.escape(run)}(?:-(?P<epoch>\d{{6}})|-step(?P<step>\d{{8}}))?\.safetensors$")
    found: list[Candidate] = []
    for path in sorted(output_dir.glob("*.safetensors")) if output_dir.is_dir() else []:
        match = pattern.match(path.name)
        if not match:
            continue
        if match["epoch"]:
            found.append(Candidate(path, "epoch", int(match["epoch"])))
        elif match["step"]:
            found.append(Candidate(path, "step", int(match["step"])))
        else:
            found.append(Candidate(path, "final", None))
    return sorted(found, key=lambda c: ({"epoch": 0, "step": 1, "final": 2}[c.kind], c.number or 0))


def _choose(candidates: list[Candidate], which: str, output_dir: Path, run: str) -> Candidate:
    match = re.fullmatch(r"(final)|(epoch|step)[:=]?(\d+)", which.strip().lower())
    if not match:
        raise DermkohyaError(f"--which {which!r}: use `final`, `epoch:N` or `step:N`")
    kind, number = (match[1], None) if match[1] else (match[2], int(match[3]))
    for candidate in candidates:
        if candidate.kind == kind and candidate.number == number:
            return candidate
    found = ", ".join(c.label for c in candidates) or "none"
    expected = {"final": f"{run}.safetensors", "epoch": f"{run}-{number or 0:06d}.safetensors",
                "step": f"{run}-step{number or 0:08d}.safetensors"}[kind]  # fmt: skip
    raise DermkohyaError(
        f"{output_dir / expected}: not found (LoRA files there: {found}); train the run first "
        f"(`dermkohya train runs/{run}.toml`) or pick one with --which"
    )


def verify(path: Path, *, dim: int | None = None, alpha: float | None = None, family: str | None = None) -> lora.LoraInfo:
    """Describe `path` and raise ProblemsError listing every reason it is not the LoRA the run asked for."""
    info = lora.describe(path)
    problems = lora.kohya_problems(info, dim=dim, alpha=alpha, family=family)
    if problems:
        raise ProblemsError(f"{path} (re-train the run or collect another checkpoint with --which)", problems)
    return info


# ---- the run: name, manifest -----------------------------------------------------------------------


def run_name(run: str | Path) -> str:
    """A run name as given, or the name a run file declares (`name`, else its stem)."""
    text = str(run)
    if text.endswith(".toml") or Path(text).is_file():
        from dermkohya.spec import load_run

        return load_run(Path(text))[1]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise DermkohyaError(f"{text!r}: not a run name or run file (give `demo` or `runs/demo.toml`)")
    return text


def _load_manifest(root: Path, run: str) -> tuple[LaunchManifest, Path]:
    """train's launch manifest (rendered facts + launch facts), read through its record."""
    path = root / "output" / run / "manifest.json"
    if not path.is_file():
        raise DermkohyaError(
            f"{path}: not found; collect files what `dermkohya train runs/{run}.toml` produced, so train the run first"
        )
    return LaunchManifest.read(path), path


def dermkohya_metadata(manifest: LaunchManifest, candidate: Candidate) -> dict[str, str]:
    """The `dermkohya.*` keys: what made this adapter. Deterministic (no clock), so re-collecting matches."""
    base, dataset = manifest.base_model, manifest.dataset
    values: dict[str, Any] = {
        "version": manifest.dermkohya_version,
        "run_name": manifest.run_name,
        "run_file": manifest.run_file,
        "run_file_sha256": manifest.run_file_sha256,
        "family": manifest.family,
        "source_file": candidate.path.name,
        "checkpoint": candidate.label,
        "dataset.content_hash": dataset.content_hash,
        "dataset.counts": dataset.counts,
        "dataset.images": dataset.images,
        "dataset.effective_samples": dataset.effective_samples,
        "dataset.train_data_dir": dataset.train_data_dir,
        "caption_template": dataset.caption_template,
        "base_model.name": Path(base.path).name,
        "base_model.sha256": base.sha256,
        "base_model.verified": base.verified,
        "base_model.smoke": base.smoke,
        "sd_scripts.commit": manifest.sd_scripts.commit,
        "sd_scripts.pinned_commit": manifest.sd_scripts.pinned_commit,
        "network": manifest.network.model_dump(),
        "hyperparameters": manifest.train,
        "command": manifest.command,
        "sample_prompts": prompt_texts(manifest) or None,
        "training.started": manifest.started,
        "training.finished": manifest.finished,
        "training.exit_code": manifest.exit_code,
        "textual_inversion": manifest.textual_inversion,  # ti_then_lora: the tokens the LoRA was trained with
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
    }
    return {f"dermkohya.{k}": v if isinstance(v, str) else to_json(v) for k, v in values.items() if v is not None}


# ---- writing without ever replacing an artifact -------------------------------------------------------


def _suffix(version: int) -> str:
    return "" if version == 1 else f"-v{version}"


def _versions(artifact_dir: Path, run: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(run)}(?:-v(\d+))?\.safetensors$")
    found = {}
    for path in artifact_dir.glob(f"{run}*.safetensors"):
        match = pattern.match(path.name)
        if match:
            found[int(match[1] or 1)] = path
    return dict(sorted(found.items()))


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text)


# ---- collect ---------------------------------------------------------------------------------------


def run_lock(run: str | Path, *, project_root: Path | None = None, break_lock: bool = False) -> AbstractContextManager[locks.Held]:
    """The run's lock (locks.py): collect never files a LoRA that a running train is still writing."""
    return locks.hold_run((project_root or Path.cwd()).resolve(), run_name(run), "collect", break_lock=break_lock)


def collect(
    run: str | Path,
    *,
    project_root: Path | None = None,
    which: str = "final",
    new_version: bool = False,
    break_lock: bool = False,
    after_failure: bool = False,
) -> Path:
    """Verify kohya's LoRA files for `run` and file the chosen one in artifacts/<run>/; returns its path.

    Holds the run's lock: refused at once while another dermkohya trains or collects the run (`dermkohya
    train` collects under the lock it trained under)."""
    with run_lock(run, project_root=project_root, break_lock=break_lock):
        return _collect_locked(run, project_root=project_root, which=which, new_version=new_version, after_failure=after_failure)


def _collect_locked(
    run: str | Path,
    *,
    project_root: Path | None = None,
    which: str = "final",
    new_version: bool = False,
    after_failure: bool = False,
) -> Path:
    """`after_failure`: `train` files a final LoRA kohya wrote before it failed (verified like any other)."""
    root = (project_root or Path.cwd()).resolve()
    name = run_name(run)
    from dermkohya import embeddings  # textual inversion: the learned embeddings are filed beside (or instead of) a LoRA

    if embeddings.embeddings_only(root, name):
        return embeddings.collect_embeddings(root, name)
    manifest, manifest_path = _load_manifest(root, name)
    output_dir = root / "output" / name
    candidates = find_candidates(output_dir, name)
    chosen = _choose(candidates, which, output_dir, name)
    if chosen.kind == "final" and manifest.exit_code not in (None, 0) and not after_failure:
        raise DermkohyaError(
            f"{manifest_path}: training exited with code {manifest.exit_code}, so {chosen.path.name} may not be "
            f"the finished run; read output/{name}/train.log, or collect a saved epoch with --which epoch:N"
        )

    dim, alpha, family = manifest.network.dim, manifest.network.alpha, manifest.family
    checks: list[CandidateCheck] = []
    info: lora.LoraInfo | None = None
    for candidate in candidates:
        try:
            described = verify(candidate.path, dim=dim, alpha=alpha, family=family)
            checks.append(CandidateCheck(file=candidate.path.name, checkpoint=candidate.label, ok=True, problems=[]))
        except ProblemsError as exc:
            if candidate == chosen:
                raise
            checks.append(CandidateCheck(file=candidate.path.name, checkpoint=candidate.label, ok=False, problems=exc.problems))
            continue
        except DermkohyaError as exc:
            if candidate == chosen:
                raise
            checks.append(CandidateCheck(file=candidate.path.name, checkpoint=candidate.label, ok=False, problems=[str(exc)]))
            continue
        if candidate == chosen:
            info = described
    assert info is not None

    artifact_dir = root / "artifacts" / name
    if manifest.textual_inversion:
        embeddings.collect_embeddings(root, name)
    try:
        return _file(root, name, artifact_dir, manifest, chosen, info, checks, new_version)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        raise DermkohyaError(f"{artifact_dir}: {exc.strerror} while collecting {chosen.path.name}; the LoRA was not "
                             f"filed (its partial copy is removed): make room there and run `dermkohya collect {name}` again") from None


def _file(root: Path, name: str, artifact_dir: Path, manifest: LaunchManifest, chosen: Candidate, info: lora.LoraInfo,
          checks: list[CandidateCheck], new_version: bool) -> Path:
    """Write the artifact and its sidecars: a new version, or the existing one when the bytes are the same."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    metadata = {**info.metadata, **dermkohya_metadata(manifest, chosen)}
    tmp = private_temp(artifact_dir, name, ".safetensors.tmp")
    try:
        lora.write_with_metadata(info.file, metadata, tmp)
        sha256 = lora.file_sha256(tmp)
        existing = _versions(artifact_dir, name)
        for version, path in existing.items():
            if lora.file_sha256(path) == sha256:
                tmp.unlink()
                _write_sidecars(root, name, version, path, sha256, manifest, chosen, info, checks, missing_only=True)
                return path
        if existing and not new_version:
            latest = existing[max(existing)]
            raise DermkohyaError(
                f"{latest}: already holds a different result for run {name!r}; it is never replaced. "
                f"Collect as a new version with `dermkohya collect {name} --new-version`"
            )
        version = max(existing, default=0) + 1
        dest = artifact_dir / f"{name}{_suffix(version)}.safetensors"
        collected = lora.describe(tmp)
        if collected.scan.data_sha256 != info.scan.data_sha256 or collected.hash_ok is False:
            raise DermkohyaError(f"{tmp}: tensor bytes changed while rewriting the header (a bug: report it)")
        _write_sidecars(root, name, version, dest, sha256, manifest, chosen, info, checks, missing_only=False)
        lora.publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _write_sidecars(
    root: Path,
    name: str,
    version: int,
    artifact: Path,
    sha256: str,
    manifest: LaunchManifest,
    chosen: Candidate,
    info: lora.LoraInfo,
    checks: list[CandidateCheck],
    *,
    missing_only: bool,
) -> None:
    """`.sha256`, sample grid, model card, manifest. Written before the artifact itself is published, so a
    published artifact always has them; `missing_only` fills gaps beside an existing one."""
    folder = artifact.parent
    suffix = _suffix(version)
    paths = {
        "sha256": folder / f"{artifact.name}.sha256",
        "grid": folder / f"samples{suffix}.png",
        "card": folder / f"model_card{suffix}.md",
        "manifest": folder / f"manifest{suffix}.json",
    }
    if missing_only and all(p.exists() for k, p in paths.items() if k != "grid"):
        return
    if not (missing_only and paths["sha256"].exists()):
        _write_text(paths["sha256"], f"{sha256}  {artifact.name}\n")

    samples = sample_grid(root / "output" / name / "sample", name, manifest)
    if samples["cells"] and not (missing_only and paths["grid"].exists()):
        image = samples.pop("image")
        tmp = private_temp(folder, "samples", ".png")
        image.save(tmp, format="PNG")
        os.replace(tmp, paths["grid"])
    samples.pop("image", None)
    samples["file"] = paths["grid"].name if samples["cells"] else None

    source_sha256 = lora.file_sha256(chosen.path)
    checklist = lora_fine_checklist(root, name, manifest, info, samples, {sha256, source_sha256})
    part = CollectPart(
        collected_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dermkohya_version=__version__,
        version=version,
        source={"file": f"output/{name}/{chosen.path.name}", "checkpoint": chosen.label, "sha256": source_sha256},
        artifact={"file": artifact.name, "sha256": sha256, "size_bytes": info.size_bytes,
                  "sshs_model_hash": info.recorded_hash, "tensor_sha256": info.scan.data_sha256, "hash_ok": info.hash_ok},
        lora={k: v for k, v in info.to_dict().items() if k not in ("path", "metadata")},
        modules=sorted(info.modules),
        candidates=checks,
        samples=samples,
        checklist=checklist,
    )  # fmt: skip
    if not (missing_only and paths["manifest"].exists()):
        launch = manifest.model_dump(mode="json", exclude={"format"})
        ArtifactManifest.model_validate({**launch, "collect": part.model_dump(mode="json")}).write(paths["manifest"])
    if not (missing_only and paths["card"].exists()):
        _write_text(paths["card"], model_card(name, version, artifact.name, sha256, manifest, (chosen.path.name, chosen.label),
                                              info, samples, checklist))



# ---- inspect ---------------------------------------------------------------------------------------


def inspect(path: Path) -> dict[str, Any]:
    """A readable summary of any kohya/diffusers LoRA: grouped metadata, rank, alpha, modules, hash check;
    for a textual-inversion file (embeddings.py), its token, vectors and dermkohya.* keys (`kind` says which)."""
    from dermkohya.embeddings import describe_embedding

    embedding = describe_embedding(Path(path))
    if embedding is not None:
        return embedding
    info = lora.describe(Path(path))
    summary = info.to_dict()
    summary["size_mb"] = round(info.size_bytes / 2**20, 2)
    summary["kohya_problems"] = lora.kohya_problems(info) if info.format == "kohya" else []
    return summary
