"""The model card, the sample grid and the LORA-FINE checklist of a collected LoRA (collect.py files them).

Everything here is read from the launch manifest (manifests.LaunchManifest) and the LoRA file itself; an
item of the checklist is ticked only from a recorded fact, and the card says "not recorded" where a fact
is missing rather than guess it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jinja2

from dermkohya import lora
from dermkohya.manifests import LaunchManifest
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN, fst_from_caption
from dermkohya.templating import file_environment

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


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def prompt_texts(manifest: LaunchManifest) -> list[str]:
    """The sample prompts without kohya's ` --n`/` --w` options."""
    return [t.split(" --")[0].strip() for t in manifest.sample_prompts]


# ---- the sample grid -------------------------------------------------------------------------------


def sample_grid(sample_dir: Path, run: str, manifest: LaunchManifest) -> dict[str, Any]:
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
    prompts = prompt_texts(manifest)
    diagnoses = sorted(manifest.dataset.counts, key=len, reverse=True)
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


def _item(letter: str, title: str, ticked: bool, evidence: str) -> dict[str, Any]:
    return {"letter": letter, "item": title, "ticked": ticked, "evidence": evidence}


def _recorded_items(manifest: LaunchManifest, info: lora.LoraInfo) -> list[dict[str, Any]]:
    """L, O, R, A, F: what the launch manifest and the file record about data, base, rank and hyperparameters."""
    dataset, base, train = manifest.dataset, manifest.base_model, manifest.train
    items = []
    if dataset.content_hash and dataset.counts:
        total = sum(sum(v.values()) for v in dataset.counts.values())
        items.append(_item("L", "Label & clean dataset", True,
                           f"dataset checked before training: {total} labelled images ({dataset.effective_samples} "
                           f"effective samples per epoch, images × repeats) over {len(dataset.counts)} diagnoses, "
                           f"content hash {dataset.content_hash[:16]}…, resolution {train.get('resolution', NOT_RECORDED)}"))  # fmt: skip
    else:
        items.append(_item("L", "Label & clean dataset", False, "the dataset has no labelled images or no content hash"))

    title = "Obtain base model checksum and confirm architecture"
    if base.sha256 and base.verified:
        items.append(_item("O", title, True, f"sha256 {base.sha256[:16]}… verified against the run file before "
                                             f"training; family {manifest.family}"))  # fmt: skip
    elif base.sha256:
        items.append(_item("O", title, False, f"sha256 {base.sha256[:16]}… recorded but not checked against an "
                                              "expected value: set [model] sha256 in the run file"))  # fmt: skip
    else:
        items.append(_item("O", title, False, "base-model sha256 not recorded"))

    dim = manifest.network.dim
    if info.rank == dim:
        items.append(_item("R", "Rank selection", True, f"rank {info.rank}, alpha {info.alpha:g}: chosen in the run file, verified in the file"))
    else:
        items.append(_item("R", "Rank selection", False, f"network dim {dim} in the manifest vs rank {info.ranks} in the file"))

    counts_by_part = ", ".join(f"{n} {part}" for part, n in sorted(info.module_counts().items()))
    items.append(_item("A", "Adapter insertion points documented", bool(info.modules),
                       f"{len(info.modules)} modules ({counts_by_part}); every module name in manifest.json, blocks in the card"))  # fmt: skip

    lr, batch, epochs = train.get("learning_rate"), train.get("batch_size"), train.get("epochs")
    length = f"{epochs} epochs" if epochs else (f"{train['max_steps']} max steps" if train.get("max_steps") else None)
    missing = [k for k, v in {"learning rate": lr, "batch size": batch, "epochs/steps": length}.items() if v is None]
    if missing:
        items.append(_item("F", "Fine-tune hyperparameters saved", False, f"not recorded in the manifest: {', '.join(missing)}"))
    else:
        items.append(_item("F", "Fine-tune hyperparameters saved", True,
                           f"lr {lr}, batch {batch}, {length} ({info.metadata.get('ss_steps') or NOT_RECORDED} steps "
                           "by kohya); all in manifest.json and the card"))  # fmt: skip
    return items


def lora_fine_checklist(
    root: Path, name: str, manifest: LaunchManifest, info: lora.LoraInfo, samples: dict[str, Any], shas: set[str]
) -> list[dict[str, Any]]:
    """One entry per letter: ticked with the evidence, or unticked with the reason and what to do.
    `shas` are the file sha256s this adapter goes by (the artifact and kohya's original)."""
    items = _recorded_items(manifest, info)

    def item(letter: str, title: str, ticked: bool, evidence: str) -> None:
        items.append(_item(letter, title, ticked, evidence))

    prompts = prompt_texts(manifest)
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

    when = manifest.finished or info.metadata.get("ss_training_finished_at")
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


def _trigger_words(info: lora.LoraInfo, manifest: LaunchManifest) -> list[str]:
    """The textual-inversion tokens of a ti_then_lora run (ti.py records them), else the concept names of
    kohya's `N_concept` folders, as kohya recorded them (`ss_dataset_dirs`)."""
    if manifest.dataset.trigger_words:
        return list(manifest.dataset.trigger_words)
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
        return to_json(value)
    return str(value)


def _limitations(manifest: LaunchManifest, table: dict[str, Any] | None) -> list[str]:
    limitations = []
    if manifest.base_model.smoke:
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
    return limitations


def _lora_facts(manifest: LaunchManifest, info: lora.LoraInfo) -> dict[str, Any]:
    return {
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
        "network_module": manifest.network.module,
    }


def _provenance(manifest: LaunchManifest, name: str, source: str) -> list[tuple[str, str]]:
    return [
        ("run file", f"{manifest.run_file} (sha256 {manifest.run_file_sha256})"),
        ("dermkohya version", manifest.dermkohya_version),
        ("sd-scripts commit", _fmt(manifest.sd_scripts.commit)),
        ("sd-scripts pinned commit", manifest.sd_scripts.pinned_commit),
        ("training started", _fmt(manifest.started)),
        ("training finished", _fmt(manifest.finished)),
        ("exit code", _fmt(manifest.exit_code)),
        ("resumed from", manifest.resumed_from or "not resumed"),
        ("collected from", f"output/{name}/{source}"),
    ]


def model_card(
    name: str,
    version: int,
    weight_name: str,
    sha256: str,
    manifest: LaunchManifest,
    checkpoint: tuple[str, str],
    info: lora.LoraInfo,
    samples: dict[str, Any],
    checklist: list[dict[str, Any]],
) -> str:
    """Hugging Face model-card markdown (YAML front matter + sections), from dermkohya/templates/model_card.md.j2.
    `checkpoint` is the (file name, label) collected from output/<run>/."""
    family = manifest.family
    base, dataset = manifest.base_model, manifest.dataset
    base_name = Path(base.path).name
    table = _skin_table(dataset.counts)
    triggers = _trigger_words(info, manifest)
    file_name, label = checkpoint
    context = {
        "name": name,
        "version": version,
        "weight_name": weight_name,
        "sha256": sha256,
        "family": family,
        "family_label": _FAMILY_LABELS.get(family, family),
        "pipeline": _PIPELINES.get(family, "DiffusionPipeline"),
        "license": _LICENSES.get(family, "other"),
        "base_model": base_name,
        "base_name": base_name,
        "base": {"sha256": _fmt(base.sha256), "verified": base.verified, "smoke": base.smoke},
        "tags": ["stable-diffusion", "lora", "text-to-image", "kohya-ss", "dermkohya", "dermatology",
                 "synthetic-data", "research-only", "sdxl" if family == "sdxl" else "sd-1.5"],  # fmt: skip
        "trigger_words": triggers,
        "description": manifest.description,
        "checkpoint": label,
        "lora": _lora_facts(manifest, info),
        "dataset": {
            "images": dataset.images,
            "effective_samples": dataset.effective_samples,
            "effective_table": _skin_table(dataset.effective_counts),
            "content_hash": dataset.content_hash,
            "caption_template": _fmt(dataset.caption_template),
            "train_data_dir": dataset.train_data_dir,
            "table": table,
            "kohya_images": _fmt(info.metadata.get("ss_num_train_images")),
        },
        "hyperparameters": [(k, _fmt(v)) for k, v in sorted(manifest.network.model_dump().items())]
        + [(k, _fmt(v)) for k, v in sorted(manifest.train.items())],
        "kohya": [(k, info.metadata[k]) for k in _KOHYA_KEYS if k in info.metadata],
        "samples": samples,
        "provenance": _provenance(manifest, name, f"{file_name} ({label})"),
        "command": shlex.join(manifest.command) if manifest.command else NOT_RECORDED,
        "checklist": checklist,
        "limitations": _limitations(manifest, table),
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
        "trigger_example": (triggers[0] + ", " if triggers else "") + (prompt_texts(manifest) or ["clinical dermatology photograph"])[0],
    }
    return _environment().get_template("model_card.md.j2").render(**context)
