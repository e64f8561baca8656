"""`dermkohya prepare`: a public dataset's metadata CSV and images → kohya folders, captions and repeats.

FairSkin-style training needs every Fitzpatrick skin type seen about equally often, while real datasets
are mostly FST I–III. kohya expresses "seen more often" as a subset's repeats, so a target balance
becomes integer repeats per (diagnosis, skin type) folder, capped to bound memorisation of the few
FST V–VI images, with every target the data cannot reach reported rather than silently missed.

The pipeline is explicit and one-way: recipe → records (importers) → diagnosis filter → held-out split
→ repeats → images and captions in a scratch folder → swapped into place → `prepared.json`. Everything
is checked before anything is written; a failure leaves no partial output behind, the source images
are only ever read, and the output is rebuilt bit for bit from the same inputs.
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import numpy as np
import PIL
import tomli_w
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dermkohya import __version__, dataset
from dermkohya.templating import text_template
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.importers import DISPLAY_NAMES, LABEL_CHOICES, Record, SourceOptions, load_records, slug
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN
from dermkohya.prepare.balance import BalancePlan, plan_balance

PREPARED_FORMAT = 1
PREPARED_JSON = "prepared.json"
PREPARED_DIR = "prepared"
_MARKER = ".dermkohya-prepared"  # proves a `prepared/` folder is ours to replace
DEFAULT_TEMPLATE = (
    "clinical dermatology photograph, {{ diagnosis }}"
    "{% if fst != 'unknown' %}, Fitzpatrick skin type {{ fst }}{% endif %}, {{ extra }}"
)
TEMPLATE_VARIABLES = ("diagnosis", "fst", "source", "extra")

# ---------------------------------------------------------------------------------------------------
# The recipe: datasets/<name>/dataset.toml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnsSection(_Section):
    """Column names of a generic CSV (the demo's layout is the default)."""

    image: str = "image"
    diagnosis: str = "diagnosis"
    fitzpatrick: str | None = "fitzpatrick"
    group: str | None = None


class SourceSection(_Section):
    format: Literal["fitzpatrick17k", "ddi", "isic", "pad_ufes_20", "scin", "ham10000", "generic"]
    metadata: str
    images: str | None = None  # default: the metadata file's folder
    labels: str | None = None  # SCIN's scin_labels.csv
    label: str | None = None  # which column names the diagnosis (fitzpatrick17k, ddi, isic)
    licence: str | None = None
    columns: ColumnsSection | None = None  # generic only
    missing_images: Literal["error", "skip"] = "error"


class DiagnosesSection(_Section):
    """Names as the source writes them (after the importer's readable names, before renames)."""

    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict)


class CaptionSection(_Section):
    template: str = DEFAULT_TEMPLATE
    extra: str = ""


class BalanceSection(_Section):
    policy: Literal["none", "fst", "fst_x_diagnosis", "shares"] = "fst"
    shares: dict[str, float] | None = None
    max_repeats: int = Field(20, ge=1, le=1000)
    tolerance: float = Field(0.05, gt=0, lt=1)
    unknown_fst: Literal["keep", "drop"] = "keep"


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise ValueError("give one size (512) or [width, height]")


class ImagesSection(_Section):
    resolution: Annotated[tuple[int, int], BeforeValidator(_resolution)] = (512, 512)
    resize: Literal["crop", "fit", "none"] = "crop"
    format: Literal["auto", "jpeg", "png"] = "auto"
    jpeg_quality: int = Field(95, ge=50, le=100)


class SplitSection(_Section):
    heldout: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


class Recipe(_Section):
    source: SourceSection
    diagnoses: DiagnosesSection = Field(default_factory=DiagnosesSection)
    caption: CaptionSection = Field(default_factory=CaptionSection)
    balance: BalanceSection = Field(default_factory=BalanceSection)
    images: ImagesSection = Field(default_factory=ImagesSection)
    split: SplitSection = Field(default_factory=SplitSection)

    @property
    def size(self) -> tuple[int, int]:
        return self.images.resolution


def load_recipe(path: Path) -> Recipe:
    """The validated recipe; every problem (unknown keys with the nearest valid one, bad values, a
    template that does not render) is reported at once."""
    if not path.is_file():
        raise DermkohyaError(f"{path}: recipe not found; create datasets/<name>/dataset.toml (see datasets/demo)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DermkohyaError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ProblemsError(str(path), [_describe(err) for err in exc.errors()]) from None
    problems = _semantic_problems(recipe, path.parent)
    if problems:
        raise ProblemsError(str(path), problems)
    return recipe


def _describe(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    where = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(Recipe, loc[:-1])
        near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean `{near[0]}`?" if near else f"valid keys: {', '.join(valid)}"
        return f"unknown key `{where}`: {hint}"
    if err["type"] == "missing":
        return f"`{where}` is required"
    return f"`{where}`: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)  # type: ignore[assignment]
        if model is None:
            return []
    return list(model.model_fields)


def _semantic_problems(recipe: Recipe, recipe_dir: Path) -> list[str]:
    """Checks that span keys or need the file system, in the same one-pass report."""
    problems: list[str] = []
    source = recipe.source
    if source.labels is not None and source.format != "scin":
        problems.append("`source.labels` is only for format = \"scin\" (SCIN's scin_labels.csv)")
    if source.columns is not None and source.format != "generic":
        problems.append(f"`source.columns` is only for format = \"generic\"; {source.format} has fixed columns")
    if source.label is not None:
        choices = LABEL_CHOICES.get(source.format, ())
        if source.label not in choices:
            allowed = f"one of {', '.join(choices)}" if choices else f"not an option for {source.format}"
            problems.append(f"`source.label` = {source.label!r}: {allowed}")
    metadata = recipe_dir / source.metadata
    if not metadata.is_file():
        problems.append(f"`source.metadata`: {metadata} does not exist")
    images = recipe_dir / source.images if source.images else metadata.parent
    if not images.is_dir():
        problems.append(f"`source.images`: {images} is not a folder")
    if source.labels and not (recipe_dir / source.labels).is_file():
        problems.append(f"`source.labels`: {recipe_dir / source.labels} does not exist")

    balance = recipe.balance
    if balance.policy == "shares":
        problems.extend(_share_problems(balance.shares))
    elif balance.shares is not None:
        problems.append(f"`balance.shares` is only used with policy = \"shares\" (policy is {balance.policy!r})")

    width, height = recipe.size
    if min(width, height) < 64 or width % 8 or height % 8:
        problems.append(f"`images.resolution` = {list(recipe.size)}: use multiples of 8, at least 64")

    try:
        render_caption(_template(recipe.caption.template), "melanoma", "IV", "ISIC", recipe.caption.extra)
    except jinja2.TemplateSyntaxError as exc:
        problems.append(f"`caption.template`: {exc.message} (line {exc.lineno} of the template)")
    except jinja2.UndefinedError as exc:
        problems.append(f"`caption.template`: {exc.message}; the variables are {', '.join(TEMPLATE_VARIABLES)}")
    return problems


def _share_problems(shares: dict[str, float] | None) -> list[str]:
    if not shares:
        return ["policy = \"shares\" needs `balance.shares`, e.g. { I = 10, II = 10, III = 15, IV = 15, V = 25, VI = 25 }"]
    keys = set(shares)
    for level in (FST_TYPES, FST_GROUPS):
        if keys <= set(level):
            missing = [k for k in level if k not in keys]
            problems = [f"`balance.shares` lacks {', '.join(missing)}: give every skin type a share"] if missing else []
            return problems + [f"`balance.shares.{k}` = {v}: shares must be positive" for k, v in shares.items() if v <= 0]
    bad = sorted(keys - set(FST_TYPES) - set(FST_GROUPS))
    if bad:
        return [f"`balance.shares.{k}`: not a skin type; use I–VI or the groups I-II, III-IV, V-VI" for k in bad]
    return ["`balance.shares`: give shares for the six types I–VI or for the three groups, not a mix"]


def _template(text: str) -> jinja2.Template:
    return text_template(text)


def render_caption(template: jinja2.Template, diagnosis: str, fst: str, source: str, extra: str) -> str:
    """The caption of one image. Whitespace is collapsed and empty comma-separated parts dropped, so
    an empty `extra` leaves no dangling comma."""
    text = " ".join(template.render(diagnosis=diagnosis, fst=fst, source=source, extra=extra).split())
    return ", ".join(part.strip() for part in text.split(",") if part.strip())


# ---------------------------------------------------------------------------------------------------
# The held-out split: stratified by diagnosis × skin type, whole patients/lesions/cases on one side


def split_heldout(records: list[Record], fraction: float, seed: int) -> set[int]:
    """Indices of the held-out records. The unit is the group (patient, lesion or case; one image where
    the layout records none), so no subject is on both sides: round(fraction × groups) groups are
    shared out over the diagnosis × skin-type strata by largest remainder (ties in seeded random
    order), and every stratum keeps at least one group for training."""
    if fraction <= 0:
        return set()
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.group, []).append(i)
    strata: dict[tuple[str, str], list[list[int]]] = {}
    for members in groups.values():
        first = records[members[0]]
        strata.setdefault((first.diagnosis, first.fst), []).append(members)
    keys = sorted(strata)
    random.Random(seed).shuffle(keys)
    size = {k: len(strata[k]) for k in keys}
    quota = {k: min(math.floor(fraction * size[k]), size[k] - 1) for k in keys}
    spare = round(fraction * len(groups)) - sum(quota.values())
    for k in sorted(keys, key=lambda k: math.floor(fraction * size[k]) - fraction * size[k]):  # stable: ties stay shuffled
        if spare > 0 and quota[k] < size[k] - 1:
            quota[k] += 1
            spare -= 1
    heldout: set[int] = set()
    for k in keys:
        members = sorted(strata[k])
        random.Random(f"{seed}|{k[0]}|{k[1]}").shuffle(members)
        for group in members[: quota[k]]:
            heldout.update(group)
    return heldout


# ---------------------------------------------------------------------------------------------------
# Images: decode, orient, RGB, resize/crop, strip metadata; or a hard link when nothing would change

_HARMLESS_INFO = {
    "JPEG": {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "progressive", "progression", "adobe",
             "adobe_transform"},
    "PNG": {"dpi"},
}
_SRGB = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class ImageJob:
    source: str
    target: str
    size: tuple[int, int]
    resize: str
    quality: int


def prepare_image(job: ImageJob) -> tuple[str, str | None]:
    """('linked' | 'copied' | 'written' | 'upscaled', None) or ('failed', why). Runs in worker processes."""
    target = Path(job.target)
    want = "PNG" if target.suffix == ".png" else "JPEG"
    try:
        with Image.open(job.source) as img:
            orientation = img.getexif().get(0x0112, 1)
            width, height = img.size
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            scale = _scale((width, height), job.size, job.resize)
            untouched = (img.format == want and img.mode == "RGB" and orientation == 1 and scale is None
                         and set(img.info) <= _HARMLESS_INFO.get(want, set()))
            if untouched:
                return _link(Path(job.source), target), None
            if scale is not None and scale < 1 and img.format == "JPEG":
                raw = img.size
                img.draft("RGB", (math.ceil(raw[0] * scale), math.ceil(raw[1] * scale)))
            img.load()
            out = _to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return "failed", f"cannot be read as an image ({exc})"
    if scale is not None:
        out = _resize(out, job.size, job.resize)
    if want == "PNG":
        out.save(target, "PNG", compress_level=4)
    else:
        out.save(target, "JPEG", quality=job.quality, subsampling=0)
    return ("upscaled" if scale is not None and scale > 1 else "written"), None


def _scale(size: tuple[int, int], goal: tuple[int, int], policy: str) -> float | None:
    """The resize factor the policy asks for, or None when the size stays."""
    w, h = size
    if policy == "crop":
        s = max(goal[0] / w, goal[1] / h)
        return None if (w, h) == goal else s
    if policy == "fit":
        s = min(goal[0] / w, goal[1] / h)
        return None if s >= 1 else s
    return None


def _resize(img: Image.Image, goal: tuple[int, int], policy: str) -> Image.Image:
    """Area averaging (Pillow's box filter) to shrink and Lanczos to enlarge, the defaults kohya itself
    resizes with (library/utils.py resize_image)."""
    w, h = img.size
    if policy == "fit":
        s = min(goal[0] / w, goal[1] / h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    s = max(goal[0] / w, goal[1] / h)  # centre crop of the goal's aspect, then scale
    cw, ch = goal[0] / s, goal[1] / s
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize(goal, Image.Resampling.BOX if s <= 1 else Image.Resampling.LANCZOS, box=box)


def _to_rgb(img: Image.Image) -> Image.Image:
    """sRGB pixels without metadata: colour profiles applied (phone photos are often Display P3),
    transparency flattened onto white, 16-bit scaled rather than clipped."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "CMYK"):
        try:
            converted = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB,
                                                  outputMode="RGB")
            if converted is not None:
                img = converted
        except (ImageCms.PyCMSError, OSError):
            pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    out = img if img.mode == "RGB" else img.convert("RGB")
    out.info = {}  # EXIF, XMP, comments, text chunks, the applied profile: nothing of the source's metadata
    return out


def _link(source: Path, target: Path) -> str:
    try:
        os.link(source, target)
        return "linked"
    except OSError:  # another file system, or links not permitted
        shutil.copyfile(source, target)
        return "copied"


def _run_jobs(jobs: list[ImageJob], workers: int, progress: Callable[[int, int], None] | None) -> list[tuple[str, str | None]]:
    if workers <= 1 or len(jobs) < 64:
        results = []
        for i, job in enumerate(jobs):
            results.append(prepare_image(job))
            if progress:
                progress(i + 1, len(jobs))
        return results
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(prepare_image, jobs, chunksize=chunk):
            results.append(result)
            if progress and (len(results) % chunk == 0 or len(results) == len(jobs)):
                progress(len(results), len(jobs))
    return results


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------
# The plan: everything decided before a byte is written


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

    counts_source = _counts((diagnoses.rename.get(r.diagnosis, r.diagnosis), r.fst) for r in records)
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
    template = _template(recipe.caption.template)
    for item in items:
        concept = f"{slug(item.diagnosis)}_fst-{slug(item.record.fst)}"
        repeats = balance.repeats[(item.diagnosis, item.record.fst)] if item.split == "train" else 1
        item.folder = f"{repeats}_{concept}"
        item.caption = render_caption(template, item.diagnosis, item.record.fst, item.record.source, recipe.caption.extra)
    _name_files(items, recipe.images.format, root)
    plan = Plan(recipe_path, recipe, items, balance, counts_source, skipped, result.notes + balance.notes)
    plan.fingerprint, plan.inputs = _fingerprint(plan, options)
    return plan


def _counts(cells: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    order = [*FST_TYPES, *FST_GROUPS, UNKNOWN]
    counts: dict[str, dict[str, int]] = {}
    for diagnosis, fst in sorted(cells, key=lambda c: (c[0], order.index(c[1]))):
        counts.setdefault(diagnosis, {}).setdefault(fst, 0)
        counts[diagnosis][fst] += 1
    return counts


def _check_folder_names(records: list[Record], recipe_path: Path) -> None:
    by_slug: dict[str, set[str]] = {}
    for r in records:
        by_slug.setdefault(slug(r.diagnosis), set()).add(r.diagnosis)
    clashes = [sorted(names) for names in by_slug.values() if len(names) > 1]
    if clashes:
        raise ProblemsError(str(recipe_path), [f"diagnoses {' and '.join(map(repr, names))} would share the folder name "
                                               f"`{slug(names[0])}`; rename one in [diagnoses.rename]" for names in clashes])


def _name_files(items: list[Item], fmt: str, recipe_dir: Path) -> None:
    """`<source stem>.<ext>`; where two sources share a stem in one folder, a short hash of their
    source path tells them apart."""
    stems: Counter[tuple[str, str, str]] = Counter()
    for item in items:
        item.name = re.sub(r"[^A-Za-z0-9._-]+", "-", item.record.image.stem).strip(".-") or "image"
        stems[(item.split, item.folder, item.name.lower())] += 1
    for item in items:
        if stems[(item.split, item.folder, item.name.lower())] > 1:
            item.name += "-" + hashlib.sha1(_rel(item.record.image, recipe_dir).encode()).hexdigest()[:8]
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
            inputs[key] = {"path": _rel(path, plan.recipe_dir), "sha256": sha}
            digest.update(f"{key}\0{sha}\n".encode())
    digest.update(f"dermkohya {__version__}\0pillow {PIL.__version__}\n".encode())
    for item in plan.items:
        stat = item.record.image.stat()
        digest.update(f"{_rel(item.record.image, plan.recipe_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest(), inputs


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


# ---------------------------------------------------------------------------------------------------
# Writing: scratch folder, images in parallel, captions, metadata, kohya TOML, swap, prepared.json


def prepare(recipe_path: Path, *, force: bool = False, dry_run: bool = False, workers: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Prepares datasets/<name>/ from its dataset.toml and returns prepared.json's content.

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
        images = _write(plan, scratch, workers or _workers(), progress)
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
    _write_json(root / PREPARED_JSON, record)
    return record


def _refuse_foreign(out: Path) -> None:
    if out.exists() and not (out / _MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DermkohyaError(f"{out} exists and was not made by `dermkohya prepare`: it is left alone. Move it "
                             "away (or delete it if it is yours to delete) and run prepare again")


def _remove_ours(path: Path) -> None:
    if path.is_dir():
        _refuse_foreign(path)
        shutil.rmtree(path)


def _up_to_date(plan: Plan) -> dict[str, Any] | None:
    record_path = plan.recipe_dir / PREPARED_JSON
    out = plan.recipe_dir / PREPARED_DIR
    if not (record_path.is_file() and (out / _MARKER).is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if record.get("inputs_fingerprint") != plan.fingerprint:
        return None
    try:
        same = (record.get("content_hash") == dataset.content_hash(out / "train")
                and record.get("heldout_hash") == _heldout_hash(out / "heldout"))
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
    results = _run_jobs(jobs, workers, progress)
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
                             item.record.source, item.record.licence, _rel(item.record.image, recipe_dir), item.record.line])


def _write_kohya_toml(plan: Plan, path: Path, train_dir: Path) -> None:
    """kohya --dataset_config form with every repeat stated. image_dir is absolute because kohya reads it
    from its own working directory; the file is regenerated, never committed."""
    recipe = plan.recipe
    dataset: dict[str, Any] = {"resolution": list(recipe.size), "enable_bucket": recipe.images.resize != "crop"}
    if dataset["enable_bucket"]:
        dataset.update(min_bucket_reso=256, max_bucket_reso=max(1024, *recipe.size), bucket_reso_steps=64,
                       bucket_no_upscale=True)
    dataset["subsets"] = [{"image_dir": str(train_dir.resolve() / folder), "num_repeats": repeats}
                          for folder, repeats in _subset_repeats(plan).items()]
    header = (f"# kohya --dataset_config written by `dermkohya prepare {plan.recipe_path.name}`; "
              "do not edit (it is rewritten), edit the recipe.\n")
    path.write_text(header + tomli_w.dumps({"general": {"caption_extension": ".txt"}, "datasets": [dataset]}),
                    encoding="utf-8")


def _subset_repeats(plan: Plan) -> dict[str, int]:
    folders = sorted({i.folder for i in plan.items if i.split == "train"})
    return {f: int(f.split("_", 1)[0]) for f in folders}


def _record(plan: Plan, *, content_hash: str | None, heldout_hash: str | None, images: dict[str, int] | None) -> dict[str, Any]:
    recipe = plan.recipe
    train = [i for i in plan.items if i.split == "train"]
    heldout = [i for i in plan.items if i.split == "heldout"]
    counts_before = _counts((i.diagnosis, i.record.fst) for i in train)
    counts_after = {d: {f: n * plan.balance.repeats[(d, f)] for f, n in row.items()} for d, row in counts_before.items()}
    subsets = []
    for folder, repeats in _subset_repeats(plan).items():
        members = [i for i in train if i.folder == folder]
        subsets.append({"folder": folder, "image_dir": f"{PREPARED_DIR}/train/{folder}", "num_repeats": repeats,
                        "diagnosis": members[0].diagnosis, "fst": members[0].record.fst, "images": len(members)})
    record: dict[str, Any] = {
        "format": PREPARED_FORMAT,
        "made_by": f"dermkohya {__version__} prepare",
        "recipe": plan.recipe_path.name,
        "source": {"format": recipe.source.format, "name": DISPLAY_NAMES[recipe.source.format], **plan.inputs,
                   "records": sum(sum(row.values()) for row in plan.counts_source.values()),
                   "licences": dict(sorted(Counter(i.record.licence for i in plan.items).items())),
                   "skipped": dict(sorted(plan.skipped.items()))},
        "train_data_dir": f"{PREPARED_DIR}/train",
        "heldout_dir": f"{PREPARED_DIR}/heldout",
        "kohya_dataset_config": f"{PREPARED_DIR}/kohya_dataset.toml",
        "content_hash": content_hash,
        "heldout_hash": heldout_hash,
        "inputs_fingerprint": plan.fingerprint,
        "caption_template": recipe.caption.template,
        "caption_extra": recipe.caption.extra,
        "caption_extension": ".txt",
        "resolution": list(recipe.size),
        "resize": recipe.images.resize,
        "image_format": recipe.images.format,
        "split": {"heldout_fraction": recipe.split.heldout, "seed": recipe.split.seed,
                  "stratified_by": ["diagnosis", "fitzpatrick"], "grouped_by": "patient/lesion/case where recorded",
                  "train_images": len(train), "heldout_images": len(heldout),
                  "counts_heldout": _counts((i.diagnosis, i.record.fst) for i in heldout)},
        "counts_source": plan.counts_source,
        "counts_before": counts_before,
        "counts_after": counts_after,
        "balance": {"policy": recipe.balance.policy, "shares": recipe.balance.shares,
                    "max_repeats": recipe.balance.max_repeats, "tolerance": recipe.balance.tolerance,
                    "unknown_fst": recipe.balance.unknown_fst,
                    "target": _round(plan.balance.target), "achieved": _round(plan.balance.achieved),
                    "within_tolerance": plan.balance.within_tolerance, "unreachable": plan.balance.unreachable},
        "repeats": _subset_repeats(plan),
        "subsets": subsets,
        "notes": plan.notes,
    }
    if images is not None:
        record["images"] = images
    return record


def _round(shares: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in shares.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(scratch, path)


def load_prepared(recipe_dir: Path) -> dict[str, Any]:
    """prepared.json of datasets/<name>/ (the folder, or its dataset.toml), for the stages after prepare.
    Paths in it are relative to that folder."""
    recipe_dir = Path(recipe_dir)
    if recipe_dir.is_file():
        recipe_dir = recipe_dir.parent
    path = recipe_dir / PREPARED_JSON
    if not path.is_file():
        raise DermkohyaError(f"{path} not found: run `dermkohya prepare {recipe_dir / 'dataset.toml'}` first")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DermkohyaError(f"{path}: not readable JSON ({exc}); run `dermkohya prepare --force` to rewrite it") from None
    if record.get("format") != PREPARED_FORMAT:
        raise DermkohyaError(f"{path}: written by another dermkohya version (format {record.get('format')!r}); "
                             "run `dermkohya prepare --force` to rewrite it")
    if not (recipe_dir / record["train_data_dir"]).is_dir():
        raise DermkohyaError(f"{recipe_dir / record['train_data_dir']} is missing: run `dermkohya prepare` again")
    return record


def summary_lines(record: dict[str, Any], recipe_dir: Path) -> list[str]:
    """What `dermkohya prepare` prints: per skin type, images and effective samples against the target."""
    split, balance = record["split"], record["balance"]
    lines = [f"{recipe_dir / record['train_data_dir']}: {split['train_images']} training images in "
             f"{len(record['subsets'])} subsets; {split['heldout_images']} held out in {recipe_dir / record['heldout_dir']}"]
    images: Counter[str] = Counter()
    effective: Counter[str] = Counter()
    for diagnosis, row in record["counts_before"].items():
        for fst, n in row.items():
            images[fst] += n
            effective[fst] += record["counts_after"][diagnosis][fst]
    total = sum(effective.values()) or 1
    target = balance["target"] if balance["policy"] in ("fst", "shares") else {}
    lines.append(f"{'skin type':<10} {'images':>7} {'effective':>10} {'share':>7} {'target':>7}")
    for fst in [f for f in (*FST_TYPES, *FST_GROUPS, UNKNOWN) if f in images]:
        goal = f"{100 * target[fst]:.1f} %" if fst in target else "–"
        lines.append(f"{fst:<10} {images[fst]:>7} {effective[fst]:>10} {100 * effective[fst] / total:>5.1f} % {goal:>7}")
    if balance["policy"] == "none":
        lines.append("balance: none (every subset at 1 repeat)")
    elif balance["within_tolerance"]:
        lines.append(f"[green]balance {balance['policy']}: every share within ±{balance['tolerance']:.0%} of its target[/]")
    else:
        lines.append(f"[yellow]balance {balance['policy']}: {len(balance['unreachable'])} target(s) not reached (below)[/]")
    if record.get("images") is None:
        lines.append("dry run: nothing written")
    else:
        lines.append("images: " + ", ".join(f"{n} {action}" for action, n in record["images"].items()))
        lines.append(f"content hash sha256:{record['content_hash']}")
    return lines
