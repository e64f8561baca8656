"""File a trained LoRA with its provenance: `collect` (output/<run>/ → artifacts/<run>/) and `inspect`.

kohya records its own `ss_*` metadata but never verifies the base model, records its commit only in a
git checkout and keeps no dataset hash. collect verifies every LoRA kohya wrote for the run, adds
`dermkohya.*` keys by rewriting only the safetensors header (kohya's `sshs_model_hash` stays valid),
and writes the model card, manifest and LORA-FINE checklist beside it. An artifact is never replaced:
collecting the same result again is a no-op, a different one needs `new_version` (→ `<run>-v2`).
No torch: numpy reads the tensors.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from dermkohya import __version__, locks, lora
from dermkohya.templating import file_environment
from dermkohya.files import private_temp, write_atomic
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN, fst_from_caption

INTENDED_USE = (
    "Research on synthetic dermatology images: augmenting and auditing training data across diagnoses and "
    "Fitzpatrick skin types. Not for diagnosis, treatment, clinical decisions or any use on patients."
)
DISCLAIMER = (
    "Research use only. This adapter generates synthetic dermatological images. They are not clinical "
    "evidence, can be wrong in ways that look plausible, and are no substitute for real clinical data or "
    "expert judgement."
)
NOT_RECORDED = "not recorded"
_FAMILY_LABELS = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL"}
_LICENSES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++"}
_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
_SAMPLE_RE = r"^{run}_(?:e(?P<epoch>\d{{6}})|(?P<step>\d{{6}}))_(?P<index>\d{{2}})_(?P<ts>\d{{14}})(?:_\d+)?\.png$"
# kohya's own record of the training run, shown beside dermkohya's in the card
_KOHYA_KEYS = (
    "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_batch_size_per_device", "ss_total_batch_size",
    "ss_num_epochs", "ss_epoch", "ss_steps", "ss_max_train_steps", "ss_num_train_images", "ss_resolution",
    "ss_mixed_precision", "ss_optimizer", "ss_lr_scheduler", "ss_seed", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_min_snr_gamma", "ss_noise_offset", "ss_gradient_accumulation_steps",
    "ss_training_started_at", "ss_training_finished_at",
)  # fmt: skip


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


def _load_manifest(root: Path, run: str) -> tuple[dict[str, Any], Path]:
    """train's manifest (rendered facts + launch facts), else render's alone; train writes the former."""
    for path in (root / "output" / run / "manifest.json", root / "runs" / run / "manifest.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")), path
            except ValueError as exc:
                raise DermkohyaError(f"{path}: not valid JSON ({exc}); re-run `dermkohya train` to rewrite it") from None
    raise DermkohyaError(
        f"{root / 'output' / run / 'manifest.json'}: not found; collect files what `dermkohya train runs/{run}.toml` "
        "produced, so train the run first"
    )


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _prompt_texts(manifest: dict[str, Any]) -> list[str]:
    prompts = manifest.get("sample_prompts") or []
    texts = [(p.get("text") or p.get("prompt") or "") if isinstance(p, dict) else str(p) for p in prompts]
    return [t.split(" --")[0].strip() for t in texts]


def dermkohya_metadata(manifest: dict[str, Any], candidate: Candidate) -> dict[str, str]:
    """The `dermkohya.*` keys: what made this adapter. Deterministic (no clock), so re-collecting matches."""
    base = manifest.get("base_model") or {}
    dataset = manifest.get("dataset") or {}
    values: dict[str, Any] = {
        "version": manifest.get("dermkohya_version"),
        "run_name": manifest.get("run_name"),
        "run_file": manifest.get("run_file"),
        "run_file_sha256": manifest.get("run_file_sha256"),
        "family": manifest.get("family"),
        "source_file": candidate.path.name,
        "checkpoint": candidate.label,
        "dataset.content_hash": dataset.get("content_hash"),
        "dataset.counts": dataset.get("counts"),
        "dataset.images": dataset.get("images"),
        "dataset.effective_samples": dataset.get("effective_samples"),
        "dataset.train_data_dir": dataset.get("train_data_dir"),
        "caption_template": dataset.get("caption_template"),
        "base_model.name": Path(str(base["path"])).name if base.get("path") else None,
        "base_model.sha256": base.get("sha256"),
        "base_model.verified": base.get("verified"),
        "base_model.smoke": base.get("smoke"),
        "sd_scripts.commit": _get(manifest, "sd_scripts.commit"),
        "sd_scripts.pinned_commit": _get(manifest, "sd_scripts.pinned_commit"),
        "network": manifest.get("network"),
        "hyperparameters": manifest.get("train"),
        "command": manifest.get("command"),
        "sample_prompts": _prompt_texts(manifest) or None,
        "training.started": manifest.get("started"),
        "training.finished": manifest.get("finished"),
        "training.exit_code": manifest.get("exit_code"),
        "textual_inversion": manifest.get("textual_inversion"),  # ti_then_lora: the tokens the LoRA was trained with
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
    }
    return {f"dermkohya.{k}": v if isinstance(v, str) else _json(v) for k, v in values.items() if v is not None}


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
    from dermkohya import ti  # textual inversion: the learned embeddings are filed beside (or instead of) a LoRA

    if ti.embeddings_only(root, name):
        return ti.collect_embeddings(root, name)
    manifest, manifest_path = _load_manifest(root, name)
    output_dir = root / "output" / name
    candidates = find_candidates(output_dir, name)
    chosen = _choose(candidates, which, output_dir, name)
    if chosen.kind == "final" and manifest.get("exit_code") not in (None, 0) and not after_failure:
        raise DermkohyaError(
            f"{manifest_path}: training exited with code {manifest['exit_code']}, so {chosen.path.name} may not be "
            f"the finished run; read output/{name}/train.log, or collect a saved epoch with --which epoch:N"
        )

    dim = _get(manifest, "network.dim")
    alpha = _get(manifest, "network.alpha")
    family = manifest.get("family")
    checks = []
    info: lora.LoraInfo | None = None
    for candidate in candidates:
        try:
            described = verify(candidate.path, dim=dim, alpha=alpha, family=family)
            checks.append({"file": candidate.path.name, "checkpoint": candidate.label, "ok": True, "problems": []})
        except ProblemsError as exc:
            if candidate == chosen:
                raise
            checks.append({"file": candidate.path.name, "checkpoint": candidate.label, "ok": False, "problems": exc.problems})
            continue
        except DermkohyaError as exc:
            if candidate == chosen:
                raise
            checks.append({"file": candidate.path.name, "checkpoint": candidate.label, "ok": False, "problems": [str(exc)]})
            continue
        if candidate == chosen:
            info = described
    assert info is not None

    artifact_dir = root / "artifacts" / name
    if manifest.get("textual_inversion"):
        ti.collect_embeddings(root, name)
    try:
        return _file(root, name, artifact_dir, manifest, chosen, info, checks, new_version)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        raise DermkohyaError(f"{artifact_dir}: {exc.strerror} while collecting {chosen.path.name}; the LoRA was not "
                             f"filed (its partial copy is removed): make room there and run `dermkohya collect {name}` again") from None


def _file(root: Path, name: str, artifact_dir: Path, manifest: dict[str, Any], chosen: Candidate, info: lora.LoraInfo,
          checks: list[dict[str, Any]], new_version: bool) -> Path:
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
    manifest: dict[str, Any],
    chosen: Candidate,
    info: lora.LoraInfo,
    checks: list[dict[str, Any]],
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
    record = {
        **manifest,
        "collect": {
            "collected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dermkohya_version": __version__,
            "version": version,
            "source": {"file": f"output/{name}/{chosen.path.name}", "checkpoint": chosen.label, "sha256": source_sha256},
            "artifact": {"file": artifact.name, "sha256": sha256, "size_bytes": info.size_bytes,
                         "sshs_model_hash": info.recorded_hash, "tensor_sha256": info.scan.data_sha256,
                         "hash_ok": info.hash_ok},  # fmt: skip
            "lora": {k: v for k, v in info.to_dict().items() if k not in ("path", "metadata")},
            "modules": sorted(info.modules),
            "candidates": checks,
            "samples": {k: v for k, v in samples.items()},
            "checklist": checklist,
        },
    }
    if not (missing_only and paths["manifest"].exists()):
        _write_text(paths["manifest"], json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if not (missing_only and paths["card"].exists()):
        _write_text(paths["card"], model_card(name, version, artifact.name, sha256, manifest, chosen, info, samples, checklist))


# ---- the sample grid -------------------------------------------------------------------------------


def sample_grid(sample_dir: Path, run: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """kohya's latest sample images in one PNG: diagnosis rows × skin-type columns when every prompt names
    both, else one labelled row per prompt order. Returns the image and what each cell shows."""
    pattern = re.compile(_SAMPLE_RE.format(run=re.escape(run)))
    latest: dict[tuple[int, int], dict[int, tuple[str, Path]]] = {}
    for path in sample_dir.glob("*.png") if sample_dir.is_dir() else []:
        match = pattern.match(path.name)
        if not match:
            continue
        when = (0, int(match["epoch"])) if match["epoch"] else (1, int(match["step"]))
        slot = latest.setdefault(when, {})
        index = int(match["index"])
        if index not in slot or slot[index][0] < match["ts"]:
            slot[index] = (match["ts"], path)
    empty: dict[str, Any] = {"cells": [], "rows": [], "columns": [], "layout": None, "at": None, "image": None}
    if not latest:
        return empty
    # epoch-tagged samples end a run (kohya samples after the last epoch); else the highest step
    when = max(latest, key=lambda w: (w[0] == 0, w[1]))
    images = {i: p for i, (_, p) in sorted(latest[when].items())}
    prompts = _prompt_texts(manifest)
    diagnoses = sorted((_get(manifest, "dataset.counts") or {}).keys(), key=len, reverse=True)
    cells = []
    for index, path in images.items():
        prompt = prompts[index] if index < len(prompts) else ""
        cells.append({
            "index": index,
            "file": path.name,
            "prompt": prompt or NOT_RECORDED,
            "diagnosis": _diagnosis_in(prompt, diagnoses),
            "fst": fst_from_caption(prompt) if prompt else None,
        })  # fmt: skip
    at = f"epoch {when[1]}" if when[0] == 0 else f"step {when[1]}"
    if all(c["diagnosis"] and c["fst"] for c in cells):
        rows = list(dict.fromkeys(c["diagnosis"] for c in cells))
        order = [*FST_TYPES, *FST_GROUPS, UNKNOWN]
        columns = sorted({c["fst"] for c in cells}, key=lambda f: order.index(f) if f in order else len(order))
        layout = "diagnosis × skin type"
        for c in cells:
            c["row"], c["column"] = rows.index(c["diagnosis"]), columns.index(c["fst"])
    else:
        width = min(len(cells), 6)
        rows = [f"{i * width}–{min((i + 1) * width, len(cells)) - 1}" for i in range((len(cells) + width - 1) // width)]
        columns = [str(i) for i in range(width)]
        layout = "prompt order"
        for n, c in enumerate(cells):
            c["row"], c["column"] = divmod(n, width)
    image = _draw_grid(images, cells, rows, columns, layout)
    return {"cells": cells, "rows": rows, "columns": columns, "layout": layout, "at": at, "image": image}


def _diagnosis_in(prompt: str, diagnoses: list[str]) -> str | None:
    lowered = prompt.lower()
    for diagnosis in diagnoses:
        if diagnosis.lower() in lowered or diagnosis.lower().replace("_", " ") in lowered:
            return diagnosis
    return None


def _draw_grid(images: dict[int, Path], cells: list[dict[str, Any]], rows: list[str], columns: list[str], layout: str) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    opened = {i: Image.open(p).convert("RGB") for i, p in images.items()}
    largest = max(max(im.size) for im in opened.values())
    cell = max(128, min(256, largest))
    font = ImageFont.load_default()
    label_w = 150 if layout == "diagnosis × skin type" else 60
    header_h, gap = 22, 4
    cell += gap
    grid = Image.new("RGB", (label_w + cell * len(columns), header_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, column in enumerate(columns):
        text = f"FST {column}" if layout == "diagnosis × skin type" else f"+{column}"
        draw.text((label_w + c * cell + 4, 4), text, fill="black", font=font)
    for r, row in enumerate(rows):
        draw.text((4, header_h + r * cell + cell // 2 - 6), row[:22], fill="black", font=font)
    for c in cells:
        thumb = opened[c["index"]].copy()
        thumb.thumbnail((cell - gap, cell - gap), Image.Resampling.LANCZOS)
        if max(thumb.size) < cell - gap:
            scale = (cell - gap) / max(thumb.size)
            thumb = thumb.resize((round(thumb.width * scale), round(thumb.height * scale)), Image.Resampling.NEAREST)
        grid.paste(thumb, (label_w + c["column"] * cell, header_h + c["row"] * cell))
    return grid


# ---- the LORA-FINE checklist (seed 003), ticked only from recorded facts -------------------------------


def evaluation_reports(root: Path, shas: set[str]) -> list[str]:
    """reports/*.json (written by `dermkohya evaluate`) whose generated images used a LoRA with one of `shas`."""
    found = []
    for path in sorted((root / "reports").glob("*.json")):
        try:
            loras = json.loads(path.read_text(encoding="utf-8")).get("loras") or []
        except (OSError, ValueError, AttributeError):
            continue
        if any(isinstance(entry, dict) and entry.get("sha256") in shas for entry in loras):
            found.append(path.relative_to(root).as_posix())
    return found


def lora_fine_checklist(
    root: Path, name: str, manifest: dict[str, Any], info: lora.LoraInfo, samples: dict[str, Any], shas: set[str]
) -> list[dict[str, Any]]:
    """One entry per letter: ticked with the evidence, or unticked with the reason and what to do.
    `shas` are the file sha256s this adapter goes by (the artifact and kohya's original)."""
    dataset = manifest.get("dataset") or {}
    base = manifest.get("base_model") or {}
    train = manifest.get("train") or {}
    items = []

    def item(letter: str, title: str, ticked: bool, evidence: str) -> None:
        items.append({"letter": letter, "item": title, "ticked": ticked, "evidence": evidence})

    counts = dataset.get("counts")
    if dataset.get("content_hash") and counts:
        total = sum(sum(v.values()) for v in counts.values() if isinstance(v, dict))
        effective = dataset.get("effective_samples")
        per_epoch = f" ({effective} effective samples per epoch, images × repeats)" if effective is not None else ""
        item("L", "Label & clean dataset", True,
             f"dataset checked before training: {total} labelled images{per_epoch} over {len(counts)} diagnoses, "
             f"content hash {str(dataset['content_hash'])[:16]}…, resolution {train.get('resolution', NOT_RECORDED)}")  # fmt: skip
    else:
        item("L", "Label & clean dataset", False, "dataset content hash or diagnosis × skin-type counts not recorded in the manifest")

    family = manifest.get("family")
    if base.get("sha256") and base.get("verified"):
        item("O", "Obtain base model checksum and confirm architecture", True,
             f"sha256 {base['sha256'][:16]}… verified against the run file before training; family {family}")  # fmt: skip
    elif base.get("sha256"):
        item("O", "Obtain base model checksum and confirm architecture", False,
             f"sha256 {base['sha256'][:16]}… recorded but not checked against an expected value: "
             "set [model] sha256 in the run file")  # fmt: skip
    else:
        item("O", "Obtain base model checksum and confirm architecture", False, "base-model sha256 not recorded")

    dim = _get(manifest, "network.dim")
    if dim is not None and info.rank == dim:
        item("R", "Rank selection", True, f"rank {info.rank}, alpha {info.alpha:g}: chosen in the run file, verified in the file")
    else:
        item("R", "Rank selection", False, f"network dim {dim if dim is not None else NOT_RECORDED} in the manifest vs rank {info.ranks} in the file")

    counts_by_part = ", ".join(f"{n} {part}" for part, n in sorted(info.module_counts().items()))
    item("A", "Adapter insertion points documented", bool(info.modules),
         f"{len(info.modules)} modules ({counts_by_part}); every module name in manifest.json, blocks in the card")  # fmt: skip

    lr = train.get("learning_rate")
    batch = train.get("batch_size", train.get("train_batch_size"))
    epochs = train.get("epochs") or train.get("max_train_epochs")
    length = f"{epochs} epochs" if epochs else (f"{train['max_steps']} max steps" if train.get("max_steps") else None)
    steps = info.metadata.get("ss_steps")
    missing = [k for k, v in {"learning rate": lr, "batch size": batch, "epochs/steps": length}.items() if v is None]
    if missing:
        item("F", "Fine-tune hyperparameters saved", False, f"not recorded in the manifest: {', '.join(missing)}")
    else:
        item("F", "Fine-tune hyperparameters saved", True,
             f"lr {lr}, batch {batch}, {length} ({steps or NOT_RECORDED} steps by kohya); "
             "all in manifest.json and the card")  # fmt: skip

    prompts = _prompt_texts(manifest)
    if prompts and samples["cells"]:
        item("I", "Inference test plan", True,
             f"{len(prompts)} sample prompts recorded; {len(samples['cells'])} kohya samples at {samples['at']} in the grid")  # fmt: skip
    elif prompts:
        item("I", "Inference test plan", False,
             f"{len(prompts)} sample prompts recorded but no kohya sample images in output/{name}/sample/: "
             "set [sample] every_n_epochs in the run file")  # fmt: skip
    else:
        item("I", "Inference test plan", False, "no sample prompts recorded: add [sample] to the run file")

    reports = evaluation_reports(root, shas)
    if reports:
        item("N", "Numeric validation", True,
             f"evaluation report(s) of images made with this adapter: {', '.join(reports)}; weights finite (checked)")  # fmt: skip
    else:
        item("N", "Numeric validation", False,
             "weights are finite (checked), but no report in reports/ evaluates images made with this adapter: "
             "run `dermkohya generate` with it, then `dermkohya evaluate`")  # fmt: skip

    when = manifest.get("finished") or info.metadata.get("ss_training_finished_at")
    if when and prompts:
        item("E", "Export adapters with metadata", True,
             f"dermkohya.* keys (prompts, training date {when}, dataset, base model, command) added beside kohya's ss_*")  # fmt: skip
    else:
        item("E", "Export adapters with metadata", False,
             "dermkohya.* keys written, but " + ("no training date" if not when else "no sample prompts") + " was recorded")
    return items


# ---- the model card --------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    return file_environment(trim_blocks=True, yaml=lambda v: json.dumps(v, ensure_ascii=False))


def _skin_table(counts: Any) -> dict[str, Any] | None:
    if not isinstance(counts, dict) or not counts or not all(isinstance(v, dict) for v in counts.values()):
        return None
    order = [*FST_TYPES, *FST_GROUPS, UNKNOWN]
    present = {f for v in counts.values() for f in v}
    columns = [f for f in order if f in present] + sorted(present - set(order))
    rows = [[d, *[int(v.get(f, 0)) for f in columns], sum(int(x) for x in v.values())] for d, v in sorted(counts.items())]
    totals = [sum(r[i + 1] for r in rows) for i in range(len(columns) + 1)]
    missing = [f for f in FST_TYPES if f not in present] if not present & set(FST_GROUPS) else []
    return {"columns": columns, "rows": rows, "totals": totals, "missing": missing}


def _trigger_words(info: lora.LoraInfo, manifest: dict[str, Any]) -> list[str]:
    """Concept names of kohya's `N_concept` folders, as kohya recorded them (`ss_dataset_dirs`)."""
    words = _get(manifest, "dataset.trigger_words")
    if isinstance(words, list) and words:
        return [str(w) for w in words]
    try:
        dirs = json.loads(info.metadata.get("ss_dataset_dirs", "{}"))
    except ValueError:
        dirs = {}
    concepts = [folder.split("_", 1)[1] for folder in dirs if re.match(r"^\d+_.", folder)]
    return list(dict.fromkeys(concepts))


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, (dict, list)):
        return _json(value)
    return str(value)


def model_card(
    name: str,
    version: int,
    weight_name: str,
    sha256: str,
    manifest: dict[str, Any],
    chosen: Candidate,
    info: lora.LoraInfo,
    samples: dict[str, Any],
    checklist: list[dict[str, Any]],
) -> str:
    """Hugging Face model-card markdown (YAML front matter + sections), from dermkohya/templates/model_card.md.j2."""
    family = manifest.get("family") or info.family or "sd15"
    base = manifest.get("base_model") or {}
    dataset = manifest.get("dataset") or {}
    base_name = Path(str(base["path"])).name if base.get("path") else NOT_RECORDED
    table = _skin_table(dataset.get("counts"))
    triggers = _trigger_words(info, manifest)
    limitations = []
    if base.get("smoke"):
        limitations.append("The base model is dermkohya's RANDOM-WEIGHT smoke model: this adapter proves the "
                           "pipeline runs, it has learned nothing usable.")  # fmt: skip
    if table and table["missing"]:
        limitations.append(f"No training images of Fitzpatrick type(s) {', '.join(table['missing'])}: "
                           "outputs for those skin types are not grounded in data.")  # fmt: skip
    if table:
        per_type = dict(zip(table["columns"], table["totals"][:-1]))
        low = [f"{f} ({n})" for f, n in per_type.items() if f != UNKNOWN and n < 0.5 * max(per_type.values())]
        if low:
            limitations.append(f"Skin types under half as frequent as the most frequent one: {', '.join(low)}.")
    cmd = manifest.get("command")
    context = {
        "name": name,
        "version": version,
        "weight_name": weight_name,
        "sha256": sha256,
        "family": family,
        "family_label": _FAMILY_LABELS.get(family, family),
        "pipeline": _PIPELINES.get(family, "DiffusionPipeline"),
        "license": manifest.get("license") or _LICENSES.get(family, "other"),
        "base_model": base.get("hub_id") or base_name,
        "base_name": base_name,
        "base": {"sha256": _fmt(base.get("sha256")), "verified": bool(base.get("verified")), "smoke": bool(base.get("smoke"))},
        "tags": ["stable-diffusion", "lora", "text-to-image", "kohya-ss", "dermkohya", "dermatology",
                 "synthetic-data", "research-only", "sdxl" if family == "sdxl" else "sd-1.5"],  # fmt: skip
        "trigger_words": triggers,
        "description": _get(manifest, "spec.description") or "",
        "checkpoint": chosen.label,
        "lora": {
            "rank": _fmt(info.rank if info.rank is not None else info.ranks),
            "alpha": _fmt(info.alpha if info.alpha is not None else info.alphas),
            "modules": len(info.modules),
            "module_counts": info.module_counts(),
            "blocks": info.block_counts(),
            "targets": info.target_counts(),
            "dtypes": sorted({t.dtype for t in info.file.tensors.values()}),
            "size_mb": f"{info.size_bytes / 2**20:.1f}",
            "sshs": _fmt(info.recorded_hash),
            "hash_ok": info.hash_ok,
            "network_module": _fmt(_get(manifest, "network.module") or info.metadata.get("ss_network_module")),
        },
        "dataset": {
            # images and images × repeats apart (issue #11.6): a manifest from before recorded neither
            # "images" nor "effective_samples", and its "counts" may hold either, so it says not recorded
            "images": _fmt(dataset.get("images")),
            "effective_samples": _fmt(dataset.get("effective_samples")),
            "effective_table": _skin_table(dataset.get("effective_counts")),
            "content_hash": _fmt(dataset.get("content_hash")),
            "caption_template": _fmt(dataset.get("caption_template")),
            "train_data_dir": _fmt(dataset.get("train_data_dir")),
            "table": table,
            "kohya_images": _fmt(info.metadata.get("ss_num_train_images")),
        },
        "hyperparameters": [(k, _fmt(v)) for k, v in sorted((manifest.get("network") or {}).items())]
        + [(k, _fmt(v)) for k, v in sorted((manifest.get("train") or {}).items())],
        "kohya": [(k, info.metadata[k]) for k in _KOHYA_KEYS if k in info.metadata],
        "samples": samples,
        "provenance": [
            ("run file", f"{_fmt(manifest.get('run_file'))} (sha256 {_fmt(manifest.get('run_file_sha256'))})"),
            ("dermkohya version", _fmt(manifest.get("dermkohya_version"))),
            ("sd-scripts commit", _fmt(_get(manifest, "sd_scripts.commit"))),
            ("sd-scripts pinned commit", _fmt(_get(manifest, "sd_scripts.pinned_commit"))),
            ("training started", _fmt(manifest.get("started"))),
            ("training finished", _fmt(manifest.get("finished"))),
            ("exit code", _fmt(manifest.get("exit_code"))),
            ("resumed from", _fmt(manifest.get("resumed_from")) if manifest.get("resumed_from") else "not resumed"),
            ("collected from", f"output/{name}/{chosen.path.name} ({chosen.label})"),
        ],
        "command": shlex.join(str(a) for a in cmd) if isinstance(cmd, list) and cmd else NOT_RECORDED,
        "checklist": checklist,
        "limitations": limitations,
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
        "trigger_example": (triggers[0] + ", " if triggers else "") + (_prompt_texts(manifest) or ["clinical dermatology photograph"])[0],
    }
    return _environment().get_template("model_card.md.j2").render(**context)


# ---- inspect ---------------------------------------------------------------------------------------


def inspect(path: Path) -> dict[str, Any]:
    """A readable summary of any kohya/diffusers LoRA: grouped metadata, rank, alpha, modules, hash check;
    for a textual-inversion file (ti.py), its token, vectors and dermkohya.* keys (`kind` says which)."""
    from dermkohya import ti

    embedding = ti.describe_embedding(Path(path))
    if embedding is not None:
        return embedding
    info = lora.describe(Path(path))
    summary = info.to_dict()
    summary["size_mb"] = round(info.size_bytes / 2**20, 2)
    summary["kohya_problems"] = lora.kohya_problems(info) if info.format == "kohya" else []
    return summary
