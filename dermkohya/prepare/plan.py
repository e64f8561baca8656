"""The plan: everything decided before a byte is written (recipe → records → filter → split → repeats →
folder names and captions), and the fingerprint of what the output depends on."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL

from dermkohya import __version__
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.importers import Record, SourceOptions, load_records
from dermkohya.names import slug
from dermkohya.prepare.balance import BalancePlan, plan_balance
from dermkohya.prepare.recipe import Recipe, load_recipe, render_caption
from dermkohya.prepare.split import split_heldout
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN
from dermkohya.templating import text_template


@dataclass
class Item:
    """One output image: its record (diagnosis already renamed), side of the split, folder, name, caption."""

    record: Record
    split: str  # "train" | "heldout"
    folder: str = ""
    name: str = ""
    caption: str = ""

    @property
    def diagnosis(self) -> str:
        return self.record.diagnosis


@dataclass
class Plan:
    recipe_path: Path
    recipe: Recipe
    items: list[Item]
    balance: BalancePlan
    counts_source: dict[str, dict[str, int]]
    skipped: Counter[str]
    notes: list[str]
    fingerprint: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe_dir(self) -> Path:
        return self.recipe_path.parent


def make_plan(recipe_path: Path) -> Plan:
    """Recipe → records → filter → split → repeats → names and captions. Raises every problem at once."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    root = recipe_path.parent
    source = recipe.source
    metadata = root / source.metadata
    options = SourceOptions(
        format=source.format, metadata=metadata, images=root / source.images if source.images else metadata.parent,
        labels=root / source.labels if source.labels else None, label=source.label, licence=source.licence,
        columns=source.columns.model_dump() if source.columns else {}, missing_images=source.missing_images)
    result = load_records(options)
    problems = list(result.problems)
    skipped = Counter(result.skipped)
    records = result.records
    names = {r.diagnosis for r in records}
    diagnoses = recipe.diagnoses
    for key, listed in (("rename", list(diagnoses.rename)), ("include", diagnoses.include), ("exclude", diagnoses.exclude)):
        for name in listed if not problems else []:  # with bad rows, the names seen are incomplete
            if name not in names:
                near = difflib.get_close_matches(name, sorted(names), n=1)
                hint = f" (nearest: {near[0]!r})" if near else ""
                problems.append(f"`diagnoses.{key}`: {name!r} is not a diagnosis in {metadata.name}{hint}")
    if problems:
        raise ProblemsError(str(metadata), problems)

    counts_source = counts((diagnoses.rename.get(r.diagnosis, r.diagnosis), r.fst) for r in records)
    kept: list[Record] = []
    for r in records:
        if (diagnoses.include and r.diagnosis not in diagnoses.include) or r.diagnosis in diagnoses.exclude:
            skipped["diagnosis filtered out by the recipe"] += 1
        elif r.fst == UNKNOWN and recipe.balance.unknown_fst == "drop":
            skipped["unknown skin type (balance.unknown_fst = \"drop\")"] += 1
        else:
            kept.append(r)
    if not kept:
        raise DermkohyaError(f"{recipe_path}: no image is left after the diagnosis filter; check [diagnoses]")
    kept.sort(key=lambda r: (r.line, str(r.image)))
    renamed = [Record(r.image, diagnoses.rename.get(r.diagnosis, r.diagnosis), r.fst, r.source, r.licence,
                      r.group, r.line) for r in kept]
    _check_folder_names(renamed, recipe_path)

    heldout = split_heldout(renamed, recipe.split.heldout, recipe.split.seed)
    items = [Item(r, "heldout" if i in heldout else "train") for i, r in enumerate(renamed)]
    train_counts = Counter((it.diagnosis, it.record.fst) for it in items if it.split == "train")
    balance = plan_balance(dict(train_counts), recipe.balance.policy, shares=recipe.balance.shares,
                           max_repeats=recipe.balance.max_repeats, tolerance=recipe.balance.tolerance)
    template = text_template(recipe.caption.template)
    for item in items:
        concept = f"{folder_name(item.diagnosis)}_fst-{folder_name(item.record.fst)}"
        repeats = balance.repeats[(item.diagnosis, item.record.fst)] if item.split == "train" else 1
        item.folder = f"{repeats}_{concept}"
        item.caption = render_caption(template, item.diagnosis, item.record.fst, item.record.source, recipe.caption.extra)
    _name_files(items, recipe.images.format, root)
    plan = Plan(recipe_path, recipe, items, balance, counts_source, skipped, result.notes + balance.notes)
    plan.fingerprint, plan.inputs = _fingerprint(plan, options)
    return plan


def counts(cells: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    order = [*FST_TYPES, *FST_GROUPS, UNKNOWN]
    counts: dict[str, dict[str, int]] = {}
    for diagnosis, fst in sorted(cells, key=lambda c: (c[0], order.index(c[1]))):
        counts.setdefault(diagnosis, {}).setdefault(fst, 0)
        counts[diagnosis][fst] += 1
    return counts


def _check_folder_names(records: list[Record], recipe_path: Path) -> None:
    by_slug: dict[str, set[str]] = {}
    for r in records:
        by_slug.setdefault(folder_name(r.diagnosis), set()).add(r.diagnosis)
    clashes = [sorted(names) for names in by_slug.values() if len(names) > 1]
    if clashes:
        raise ProblemsError(str(recipe_path), [f"diagnoses {' and '.join(map(repr, names))} would share the folder name "
                                               f"`{folder_name(names[0])}`; rename one in [diagnoses.rename]" for names in clashes])


def _name_files(items: list[Item], fmt: str, recipe_dir: Path) -> None:
    """`<source stem>.<ext>`; where two sources share a stem in one folder, a short hash of their
    source path tells them apart."""
    stems: Counter[tuple[str, str, str]] = Counter()
    for item in items:
        item.name = re.sub(r"[^A-Za-z0-9._-]+", "-", item.record.image.stem).strip(".-") or "image"
        stems[(item.split, item.folder, item.name.lower())] += 1
    for item in items:
        if stems[(item.split, item.folder, item.name.lower())] > 1:
            item.name += "-" + hashlib.sha1(rel(item.record.image, recipe_dir).encode()).hexdigest()[:8]
        suffix = item.record.image.suffix.lower()
        png = fmt == "png" or (fmt == "auto" and suffix in (".png", ".bmp", ".webp"))
        item.name += ".png" if png else ".jpg"


def _fingerprint(plan: Plan, options: SourceOptions) -> tuple[str, dict[str, Any]]:
    """What the output depends on, cheaply: the recipe and metadata bytes, each image's size and mtime,
    and the versions that encode the images. Equal fingerprints and hashes mean nothing to redo."""
    digest = hashlib.sha256()
    files = {"recipe": plan.recipe_path, "metadata": options.metadata, "labels": options.labels}
    inputs: dict[str, Any] = {}
    for key, path in files.items():
        if path is not None:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            inputs[key] = {"path": rel(path, plan.recipe_dir), "sha256": sha}
            digest.update(f"{key}\0{sha}\n".encode())
    digest.update(f"dermkohya {__version__}\0pillow {PIL.__version__}\n".encode())
    for item in plan.items:
        stat = item.record.image.stat()
        digest.update(f"{rel(item.record.image, plan.recipe_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest(), inputs


def rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def folder_name(text: str) -> str:
    """A diagnosis or skin type in a kohya folder name ("unnamed" where nothing folder-safe is left)."""
    return slug(text) or "unnamed"
