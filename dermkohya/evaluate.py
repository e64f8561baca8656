"""How good a synthetic set is, overall and per skin type, diagnosis and cell: `reports/<plan>.json` + `.md`.

Real held-out images (the prepared split: `datasets/<ds>/prepared/heldout/metadata.csv`) are compared with
a generated set (`synthetic/<plan>/index.csv`) by every metric of `dermkohya.metrics` (one file each: FID,
KID, LPIPS, CLIP score, CLIP diversity, rejection rate, memorisation). This module reads the two sets,
groups their images into the report's rows, checks every enabled metric's weight files before anything
runs, and lets each metric fill its columns; `evaluation_report` writes the result.
"""

from __future__ import annotations

import csv
import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya import __version__, skin
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.evaluation_report import REPORT_TEMPLATE, EvaluationReport, render_markdown
from dermkohya.metrics import registry
from dermkohya.metrics.base import Evaluation, Group, LabelledImage, Metric, Options, diagnosis_key
from dermkohya.metrics.networks import Weights, missing_weights
from dermkohya.paths import cache_root

__all__ = [
    "METRICS", "REPORT_TEMPLATE", "EvaluationReport", "Group", "LabelledImage", "Options", "Weights", "check_weights",
    "default_train", "default_weights_dir", "evaluate", "groups", "read_real", "read_synthetic", "read_train",
    "render_markdown",
]  # fmt: skip

METRICS = registry.skip_names()  # what `--skip` accepts: fid, lpips, clip, memorisation


def default_weights_dir() -> Path:
    """Where evaluation weights are looked for unless given: $DERMKOHYA_WEIGHTS or <cache>/weights."""
    import os

    env = os.environ.get("DERMKOHYA_WEIGHTS")
    return Path(env).expanduser() if env else cache_root() / "weights"


# --- reading the two sets ----------------------------------------------------------------------------------


def _metadata_csv(path: Path, what: str) -> Path:
    csv_path = path / "metadata.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise DermkohyaError(
            f"{path}: no {what} metadata (expected a folder with metadata.csv or a CSV with image, diagnosis, "
            "fitzpatrick columns — `dermkohya prepare` writes datasets/<name>/prepared/heldout/metadata.csv)"
        )
    return csv_path


def read_real(path: Path, what: str = "held-out") -> list[LabelledImage]:
    """Images of a metadata CSV (image paths relative to the CSV's folder); every bad row reported at once."""
    csv_path = _metadata_csv(path, what)
    with csv_path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("image", "diagnosis", "fitzpatrick") if c not in (reader.fieldnames or [])]
        if missing:
            raise DermkohyaError(f"{csv_path}: missing column(s) {', '.join(missing)}; it needs image, diagnosis, fitzpatrick")
        rows = list(reader)
    images, problems = [], []
    for line, row in enumerate(rows, start=2):
        file = csv_path.parent / row["image"]
        fst = skin.parse_fst(row["fitzpatrick"])
        if not file.is_file():
            problems.append(f"line {line}: image {row['image']} not found under {csv_path.parent}")
        if fst is None:
            problems.append(f"line {line}: fitzpatrick {row['fitzpatrick']!r} is not a skin type (I–VI, 1–6, 12/34/56)")
        if file.is_file() and fst is not None:
            images.append(LabelledImage(file, row["diagnosis"], fst, row.get("caption") or ""))
    if problems:
        raise ProblemsError(str(csv_path), problems)
    if not images:
        raise DermkohyaError(f"{csv_path}: no images listed")
    return images


def read_synthetic(folder: Path) -> list[LabelledImage]:
    index = folder / "index.csv"
    if not index.is_file():
        raise DermkohyaError(f"{folder}: no index.csv; point --synthetic at a folder `dermkohya generate` wrote (synthetic/<plan>)")
    with index.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [row["path"] for row in rows if not (folder / row["path"]).is_file()]
    if missing:
        raise DermkohyaError(f"{index}: {len(missing)} listed image(s) missing (first: {missing[0]}); rerun `dermkohya generate`")
    if not rows:
        raise DermkohyaError(f"{index}: lists no images; run `dermkohya generate` first")
    return [LabelledImage(folder / r["path"], r["diagnosis"], r["fst"], r["prompt"], int(r.get("rejected_attempts") or 0)) for r in rows]


def read_train(path: Path) -> list[Path]:
    """Training images for the memorisation check: a metadata CSV (or folder holding one), or any folder
    of images (searched recursively, as kohya's N_concept folders are)."""
    if path.is_file() or (path / "metadata.csv").is_file():
        return [image.path for image in read_real(path, "training")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
        if files:
            return files
    raise DermkohyaError(f"{path}: no training images found (give the prepared train/ folder, a kohya train_data_dir or a metadata CSV)")


def default_train(real: Path) -> Path | None:
    """The prepared layout keeps training images beside the held-out ones: prepared/{train,heldout}/."""
    folder = real if real.is_dir() else real.parent
    sibling = folder.parent / "train"
    return sibling if folder.name == "heldout" and (sibling / "metadata.csv").is_file() else None


# --- rows -------------------------------------------------------------------------------------------------


def groups(real: list[LabelledImage], synthetic: list[LabelledImage]) -> list[Group]:
    """Rows in report order; diagnoses matched case- and punctuation-insensitively, named as generated."""
    names = {diagnosis_key(s.diagnosis): s.diagnosis for s in synthetic}
    fsts = [f for f in (*skin.FST_TYPES, *skin.FST_GROUPS) if any(s.fst == f for s in synthetic)]
    rows = [Group("overall", None, None, [i for i, r in enumerate(real) if diagnosis_key(r.diagnosis) in names], list(range(len(synthetic))))]

    def pick(images: list[LabelledImage], diagnosis: str | None, fst: str | None) -> list[int]:
        return [
            i for i, im in enumerate(images)
            if (diagnosis is None or diagnosis_key(im.diagnosis) == diagnosis_key(diagnosis)) and (fst is None or im.fst == fst)
        ]  # fmt: skip

    for fst in fsts:
        rows.append(Group("skin type", None, fst, [i for i in pick(real, None, fst) if diagnosis_key(real[i].diagnosis) in names], pick(synthetic, None, fst)))
    for diagnosis in names.values():
        rows.append(Group("diagnosis", diagnosis, None, pick(real, diagnosis, None), pick(synthetic, diagnosis, None)))
    for diagnosis in names.values():
        for fst in fsts:
            if cell := pick(synthetic, diagnosis, fst):
                rows.append(Group("cell", diagnosis, fst, pick(real, diagnosis, fst), cell))
    return rows



def _row(ev: Evaluation, group: Group, metrics: list[Metric]) -> dict[str, Any]:
    row: dict[str, Any] = {"group": group.kind, "label": group.label, "diagnosis": group.diagnosis, "fst": group.fst}
    row |= {"n_real": len(group.real), "n_synthetic": len(group.synthetic), **dict.fromkeys(registry.row_keys())}
    for metric in metrics:
        row |= {key: _plain(value) for key, value in metric.row(ev, group).items()}
    return row


def _plain(value: Any) -> Any:
    """numpy scalars (np.float32, np.int64) as Python numbers: the record is JSON, and a metric that returns
    one must not fail the report after everything was computed."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- the run -----------------------------------------------------------------------------------------------


def enabled_metrics(options: Options) -> list[Metric]:
    """The registered metrics whose `--skip` name is enabled (and those that cannot be skipped)."""
    if unknown := set(options.enabled) - set(registry.skip_names()):
        raise DermkohyaError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(registry.skip_names())}")
    return [m for m in registry.all_metrics() if m.skip is None or m.skip in options.enabled]


def check_weights(weights: Weights, enabled: tuple[str, ...] | list[str]) -> None:
    """Every missing weight file of the enabled metrics in one report, with where each one goes and the
    `--skip` that leaves those metrics out."""
    missing: list[tuple[str, str]] = []  # (skip name, problem)
    for metric in enabled_metrics(Options(enabled=tuple(enabled))):
        for network in metric.networks:
            missing += [(str(metric.skip), problem) for problem in missing_weights(weights.files(network))]
    if missing:
        problems = list(dict.fromkeys(problem for _, problem in missing))
        skips = ",".join(dict.fromkeys(skip for skip, _ in missing))
        raise ProblemsError("evaluate: weight files", [*problems, f"or leave those metrics out with --skip {skips}"])


def evaluate(
    real: Path,
    synthetic: Path,
    *,
    weights: Weights,
    train: Path | None = None,
    out_dir: Path = Path("reports"),
    options: Options | None = None,
    device: str | None = None,
) -> EvaluationReport:
    """Compute every enabled metric per row and write `<out_dir>/<plan>.json`, `.md` and the plots in
    `<out_dir>/<plan>/`. Inputs and weight files are all checked before any network is loaded."""
    from dermkohya.evaluation_report import write_plots

    options = options or Options()
    metrics = enabled_metrics(options)
    check_weights(weights, options.enabled)
    real_images, syn_images = read_real(real), read_synthetic(synthetic)
    train = train or default_train(real)
    train_paths = read_train(train) if train and any(m.needs_train for m in metrics) else []
    ev = Evaluation(real_images, syn_images, train_paths, weights=weights, options=options, device=device or _device())
    notes = [note for metric in metrics for note in metric.notes(ev)]
    real_keys = {diagnosis_key(r.diagnosis) for r in real_images}
    if unmatched := sorted({s.diagnosis for s in syn_images if diagnosis_key(s.diagnosis) not in real_keys}):
        notes.append(f"no real images of {', '.join(unmatched)}: those rows have synthetic-only metrics")

    for metric in metrics:
        metric.prepare(ev)
    rows = [_row(ev, group, metrics) for group in groups(real_images, syn_images)]

    out_dir.mkdir(parents=True, exist_ok=True)
    memo = ev.sections.get("memorisation")
    plots = write_plots(out_dir / synthetic.name, rows, syn_images, memo)
    for metric in metrics:
        plots |= metric.files(ev, out_dir / synthetic.name)
    base_model, loras = _generated_with(synthetic)
    report = EvaluationReport(
        plan=synthetic.name,
        synthetic=str(synthetic),
        real=str(real),
        train=str(train) if train_paths else None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dermkohya_version=__version__,
        base_model=base_model,
        loras=loras,
        metrics=list(options.enabled),
        weights=ev.used,
        options={**dataclasses.asdict(options), "enabled": list(options.enabled)},  # as JSON reads it back
        device=ev.device,
        rows=rows,
        memorisation=memo,
        skin_tone=ev.sections.get("skin_tone"),
        plots={k: str(v.relative_to(out_dir)) for k, v in plots.items()},
        notes=notes,
    )
    report.write_files(out_dir)
    return report


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _generated_with(synthetic: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The base model and LoRAs recorded in `synthetic/<plan>/plan.json`, read through its typed record
    (none when it is missing or not a record this dermkohya reads: the report then says so)."""
    from dermkohya.generate.job import PlanRecord
    from dermkohya.records import RecordError

    try:
        record = PlanRecord.read(synthetic / "plan.json")
    except RecordError:
        return None, []
    return record.plan.model.base, [lora.model_dump() for lora in record.loras]
