"""Writing: a scratch folder, images in parallel, captions, metadata, kohya's dataset config, then one
swap into place and prepared.json. Everything is checked before anything is written; a failure leaves no
partial output behind, the source images are only ever read, and the output is rebuilt bit for bit from
the same inputs."""

from __future__ import annotations

import csv
import errno
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dermkohya import __version__, dataset
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.importers import FORMATS
from dermkohya.prepare.images import ImageJob, run_jobs
from dermkohya.prepare.images import workers as default_workers
from dermkohya.prepare.plan import Item, Plan, counts, make_plan, rel
from dermkohya.prepare.record import (
    PREPARED_JSON, Prepared, PreparedBalance, PreparedSource, PreparedSplit, PreparedSubset,
)
from dermkohya.records import RecordError

PREPARED_DIR = "prepared"
_MARKER = ".dermkohya-prepared"  # proves a `prepared/` folder is ours to replace


def prepare(recipe_path: Path, *, force: bool = False, dry_run: bool = False, workers: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> Prepared:
    """Prepares datasets/<name>/ from its dataset.toml and returns its record (prepared.json).

    Idempotent: when the inputs (recipe, metadata, image sizes and mtimes) and the prepared files are
    unchanged it returns the existing record (`force` rebuilds anyway, to the same bytes). It replaces
    only a `prepared/` folder it made itself. `dry_run` returns the plan (counts, repeats, split)
    without writing anything."""
    recipe_path = Path(recipe_path)
    plan = make_plan(recipe_path)
    root = plan.recipe_dir
    out = root / PREPARED_DIR
    if dry_run:
        return _record(plan, content_hash=None, heldout_hash=None, images=None)
    _refuse_foreign(out)
    if not force:
        current = _up_to_date(plan)
        if current is not None:
            return current
    scratch = root / f".{PREPARED_DIR}.tmp"
    _remove_ours(scratch)
    try:
        scratch.mkdir()
        (scratch / _MARKER).write_text("made by `dermkohya prepare`; it replaces this folder on the next run\n")
        images = _write(plan, scratch, workers or default_workers(), progress)
    except BaseException as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # also when a worker process hit it
            raise DermkohyaError(f"{root}: no space left on device while prepare wrote {scratch.name}/ there (removed "
                                 f"again): free space on that disk, or move the dataset folder to a larger one, and run "
                                 "prepare again") from None
        raise
    old = root / f".{PREPARED_DIR}.old"
    _remove_ours(old)
    if out.exists():
        out.rename(old)
    scratch.rename(out)
    _remove_ours(old)
    record = _record(plan, content_hash=dataset.content_hash(out / "train"),
                     heldout_hash=_heldout_hash(out / "heldout"), images=images)
    record.write(root / PREPARED_JSON)
    return record


def _refuse_foreign(out: Path) -> None:
    if out.exists() and not (out / _MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DermkohyaError(f"{out} exists and was not made by `dermkohya prepare`: it is left alone. Move it "
                             "away (or delete it if it is yours to delete) and run prepare again")


def _remove_ours(path: Path) -> None:
    if path.is_dir():
        _refuse_foreign(path)
        shutil.rmtree(path)


def _up_to_date(plan: Plan) -> Prepared | None:
    record_path = plan.recipe_dir / PREPARED_JSON
    out = plan.recipe_dir / PREPARED_DIR
    if not (record_path.is_file() and (out / _MARKER).is_file()):
        return None
    try:
        record = Prepared.read(record_path)
    except RecordError:  # another version or a damaged file: rebuilt
        return None
    if record.inputs_fingerprint != plan.fingerprint:
        return None
    try:
        same = (record.content_hash == dataset.content_hash(out / "train")
                and record.heldout_hash == _heldout_hash(out / "heldout"))
    except DermkohyaError:
        return None
    return record if same else None


def _heldout_hash(folder: Path) -> str | None:
    has_subsets = folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
    return dataset.content_hash(folder) if has_subsets else None


def _write(plan: Plan, scratch: Path, workers: int, progress: Callable[[int, int], None] | None) -> dict[str, int]:
    recipe = plan.recipe
    jobs = []
    for item in plan.items:
        folder = scratch / item.split / item.folder
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append(ImageJob(str(item.record.image), str(folder / item.name), recipe.size, recipe.images.resize,
                             recipe.images.jpeg_quality))
    results = run_jobs(jobs, workers, progress)
    failed = [f"{item.record.image} ({plan.recipe.source.metadata} line {item.record.line}): {why}; "
              "replace the file or remove its row" for item, (action, why) in zip(plan.items, results) if action == "failed"]
    if failed:
        raise ProblemsError(str(plan.recipe_path), failed)
    for item in plan.items:
        (scratch / item.split / item.folder / item.name).with_suffix(".txt").write_text(item.caption + "\n", encoding="utf-8")
    for split in ("train", "heldout"):
        (scratch / split).mkdir(exist_ok=True)
        _write_metadata(scratch / split / "metadata.csv", [i for i in plan.items if i.split == split], plan.recipe_dir)
    _write_kohya_toml(plan, scratch / "kohya_dataset.toml", plan.recipe_dir / PREPARED_DIR / "train")
    return dict(sorted(Counter(action for action, _ in results).items()))


def _write_metadata(path: Path, items: list[Item], recipe_dir: Path) -> None:
    """The generic layout (image, diagnosis, fitzpatrick) plus provenance: the checker reads it, and the
    held-out set can be prepared again from it."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "diagnosis", "fitzpatrick", "caption", "source", "licence", "source_image", "source_line"])
        for item in sorted(items, key=lambda i: (i.folder, i.name)):
            writer.writerow([f"{item.folder}/{item.name}", item.diagnosis, item.record.fst, item.caption,
                             item.record.source, item.record.licence, rel(item.record.image, recipe_dir), item.record.line])


def _write_kohya_toml(plan: Plan, path: Path, train_dir: Path) -> None:
    """kohya --dataset_config form with every repeat stated, through the run's renderer (render.py), so
    both follow one rule. image_dir is absolute because kohya reads it from its own working directory;
    the file is regenerated, never committed."""
    from dermkohya import render  # the renderer pulls in the run machinery; prepare's workers need none of it
    from dermkohya.spec import DatasetSection

    recipe = plan.recipe
    subsets = [render.Subset(image_dir=(train_dir.resolve() / folder).as_posix(), repeats=repeats,
                             concept=folder.split("_", 1)[1])
               for folder, repeats in _subset_repeats(plan).items()]
    settings = DatasetSection(train_data_dir=train_dir.as_posix(), enable_bucket=recipe.images.resize != "crop")
    text = render.dataset_config(settings, what=f"the prepared dataset {plan.recipe_dir.name}",
                                 source=plan.recipe_path.name, resolution=recipe.size, batch_size=1,
                                 validation_split=0.0, subsets=subsets)
    path.write_text(text, encoding="utf-8")


def _subset_repeats(plan: Plan) -> dict[str, int]:
    folders = sorted({i.folder for i in plan.items if i.split == "train"})
    return {f: int(f.split("_", 1)[0]) for f in folders}


def _record(plan: Plan, *, content_hash: str | None, heldout_hash: str | None, images: dict[str, int] | None) -> Prepared:
    recipe = plan.recipe
    train = [i for i in plan.items if i.split == "train"]
    heldout = [i for i in plan.items if i.split == "heldout"]
    counts_before = counts((i.diagnosis, i.record.fst) for i in train)
    counts_after = {d: {f: n * plan.balance.repeats[(d, f)] for f, n in row.items()} for d, row in counts_before.items()}
    subsets = []
    for folder, repeats in _subset_repeats(plan).items():
        members = [i for i in train if i.folder == folder]
        subsets.append(PreparedSubset(folder=folder, image_dir=f"{PREPARED_DIR}/train/{folder}", num_repeats=repeats,
                                      diagnosis=members[0].diagnosis, fst=members[0].record.fst, images=len(members)))
    balance = recipe.balance
    return Prepared(
        made_by=f"dermkohya {__version__} prepare",
        recipe=plan.recipe_path.name,
        source=PreparedSource(format=recipe.source.format, name=FORMATS[recipe.source.format].display_name, **plan.inputs,
                              records=sum(sum(row.values()) for row in plan.counts_source.values()),
                              licences=dict(sorted(Counter(i.record.licence for i in plan.items).items())),
                              skipped=dict(sorted(plan.skipped.items()))),
        train_data_dir=f"{PREPARED_DIR}/train",
        heldout_dir=f"{PREPARED_DIR}/heldout",
        kohya_dataset_config=f"{PREPARED_DIR}/kohya_dataset.toml",
        content_hash=content_hash,
        heldout_hash=heldout_hash,
        inputs_fingerprint=plan.fingerprint,
        caption_template=recipe.caption.template,
        caption_extra=recipe.caption.extra,
        caption_extension=".txt",
        resolution=recipe.size,
        resize=recipe.images.resize,
        image_format=recipe.images.format,
        split=PreparedSplit(heldout_fraction=recipe.split.heldout, seed=recipe.split.seed,
                            stratified_by=["diagnosis", "fitzpatrick"], grouped_by="patient/lesion/case where recorded",
                            train_images=len(train), heldout_images=len(heldout),
                            counts_heldout=counts((i.diagnosis, i.record.fst) for i in heldout)),
        counts_source=plan.counts_source,
        counts_before=counts_before,
        counts_after=counts_after,
        balance=PreparedBalance(policy=balance.policy, shares=balance.shares, max_repeats=balance.max_repeats,
                                tolerance=balance.tolerance, unknown_fst=balance.unknown_fst,
                                target=_round(plan.balance.target), achieved=_round(plan.balance.achieved),
                                within_tolerance=plan.balance.within_tolerance, unreachable=plan.balance.unreachable),
        repeats=_subset_repeats(plan),
        subsets=subsets,
        notes=plan.notes,
        images=images,
    )


def _round(shares: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in shares.items()}
