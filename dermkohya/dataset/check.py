"""The checker: one read-only pass over every subset kohya will train on, and the dataset's identity.

Layout problems come from `layout` / `kohya_config`, fine-tuning metadata problems from `finetune`,
image problems from `images` (in a process pool while captions are checked here), and everything ends
in one CheckReport.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dermkohya.dataset import finetune
from dermkohya.dataset.images import Job, inspecting
from dermkohya.dataset.kohya_config import layout_from_config
from dermkohya.dataset.layout import Layout, Subset, images_below, layout_from_dir, list_subset
from dermkohya.dataset.problems import Problem, display, problem
from dermkohya.dataset.report import CheckReport
from dermkohya.dataset.sidecar import read_metadata
from dermkohya.dataset.tokens import CLIP_CHUNK_TOKENS, ClipTokenCounter, clip_token_counter
from dermkohya.errors import DermkohyaError
from dermkohya.files import sha256_file
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN, fst_from_caption

_TOKEN_BINS: tuple[tuple[int, int], ...] = (
    (0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 75), (76, 150), (151, 10**9),
)


def read_layout(root: Path, caption_extension: str, resolution: tuple[int, int]) -> Layout:
    """The subsets of a train_data_dir or of a kohya dataset TOML."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".toml":
        return layout_from_config(root, caption_extension, resolution)
    if not root.is_dir():
        raise DermkohyaError(f"{root}: no such dataset folder or dataset TOML; check the path")
    return layout_from_dir(root, caption_extension, resolution)


def _subset_images(subset: Subset) -> list[Path]:
    if subset.kind == "fine-tuning":
        return finetune.read_entries(subset).images
    return list_subset(subset).images


def find_subsets(root: Path, *, caption_extension: str = ".txt") -> list[Subset]:
    """The subsets kohya will train on, with their images; raises if there are none.

    `root` is a train_data_dir or a kohya dataset TOML. kohya itself exits 0 with "No data found"
    when nothing parses, so this is an error here.
    """
    layout = read_layout(Path(root), caption_extension, (512, 512))
    for subset in layout.subsets:
        subset.images = _subset_images(subset)
    if not layout.subsets:
        raise DermkohyaError(
            f"{root}: no folder kohya will train on (subfolders must be named <repeats>_<concept>, e.g. 10_derm); "
            f"run `dermkohya check {root}` for details")
    return layout.subsets


def metadata_counts(root: Path) -> dict[str, dict[str, int]]:
    """Images per diagnosis × skin type from the root's metadata.csv ({} without one): for manifests and
    the sample-prompt grid. Rows naming no image of a subset are left out (`scan` reports them)."""
    images = [image for subset in find_subsets(Path(root)) for image in subset.images]
    counts: dict[str, dict[str, int]] = {}
    for record in read_metadata(Path(root), images, []).values():
        if "diagnosis" in record:
            cell = counts.setdefault(record["diagnosis"], {})
            fst = record.get("fitzpatrick", UNKNOWN)
            cell[fst] = cell.get(fst, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------
# Content hash: what later stages record as the dataset's identity


def _dataset_digest(entries: Iterable[tuple[str, str]]) -> str:
    """sha256 over `relative path NUL sha256(bytes) LF` lines in sorted path order."""
    digest = hashlib.sha256()
    for relpath, file_hash in sorted(entries):
        digest.update(f"{relpath}\0{file_hash}\n".encode())
    return digest.hexdigest()


def _relname(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _hashed_files(subset: Subset) -> Iterator[Path]:
    """What kohya reads of a subset: images and caption files, or the metadata file and its images."""
    if subset.kind == "fine-tuning":
        assert subset.metadata_file is not None
        yield subset.metadata_file
        yield from subset.images
        return
    files = list_subset(subset)
    yield from files.images
    yield from files.captions.values()
    yield from files.other_captions.values()


def content_hash(root: Path, *, caption_extension: str = ".txt") -> str:
    """The dataset's identity: sha256 over the sorted `<folder>/<file>` names and the sha256 of the
    bytes of every image and caption file kohya reads (a fine-tuning subset's metadata file included).
    Renaming a folder (its repeats) or editing one caption changes it; moving the dataset does not.
    Reads bytes only, never decodes."""
    subsets = find_subsets(root, caption_extension=caption_extension)
    return _dataset_digest((_relname(path), sha256_file(path)) for subset in subsets for path in _hashed_files(subset))


# ---------------------------------------------------------------------------------------------------
# Captions


def parse_resolution(text: str) -> tuple[int, int]:
    """'512' or '512,768' / '512x768' (width, height), as kohya's --resolution takes it."""
    parts = re.split(r"[,x×]", str(text).strip())
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise DermkohyaError(f"--resolution {text!r}: give one size (512) or width,height (512,768)")
    return (values[0], values[-1])


def _check_caption(path: Path, data: bytes, counter: ClipTokenCounter, problems: list[Problem],
                   wildcard: bool = False) -> tuple[str | None, int | None]:
    """The caption kohya will use (its first line; with enable_wildcard, any one of its lines) and its
    token count (the longest line's), reporting what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(problem("caption-not-utf8", path, f"byte {exc.start} is not UTF-8 "
                                f"(0x{data[exc.start]:02x}); kohya stops with UnicodeDecodeError"))
        return None, None
    if text.startswith("\ufeff"):
        problems.append(problem("caption-bom", path, "starts with a UTF-8 byte-order mark"))
    lines = re.split(r"\r\n|\r|\n", text)  # what kohya's text-mode readlines() splits on
    if wildcard:  # kohya keeps every non-empty line and picks one per step
        lines = [line.strip() for line in lines if line.strip()] or [""]
    first = lines[0].strip()
    if not first:
        problems.append(problem("empty-caption", path, "is empty" if not text.strip() else
                                "has an empty first line: kohya reads only the first line"))
        return None, None
    if wildcard:
        return first, _count_tokens(path, max(lines, key=counter.count), counter, problems)
    if sum(1 for line in lines if line.strip()) > 1:
        problems.append(problem("caption-multiline", path, f"has {sum(1 for line in lines if line.strip())} "
                                "lines; kohya uses the first"))
    return first, _count_tokens(path, first, counter, problems)


def _count_tokens(path: Path, text: str, counter: ClipTokenCounter, problems: list[Problem], where: str = "") -> int:
    tokens = counter.count(text)
    if tokens > CLIP_CHUNK_TOKENS:
        approx = "" if counter.exact else " (approximate count)"
        problems.append(problem("caption-too-long", path, f"{where}has {tokens} CLIP tokens{approx}: "
                                f"tokens after {CLIP_CHUNK_TOKENS} are cut unless --max_token_length is 150 or 225"))
    return tokens


def _bin_label(low: int, high: int) -> str:
    return f"{low}–{high}" if high < 10**9 else f"{low}+"


# ---------------------------------------------------------------------------------------------------
# The scan


class _Scan:
    """What the walk over the subsets collects before images are inspected."""

    def __init__(self, layout: Layout, decode: bool, resolution: tuple[int, int]) -> None:
        self.layout, self.decode, self.resolution = layout, decode, resolution
        self.problems = layout.problems
        self.jobs: list[Job] = []
        self.hash_entries: list[tuple[str, str]] = []
        self.captions: dict[Path, Path] = {}  # image -> its caption file (DreamBooth)
        self.caption_bytes: dict[Path, bytes] = {}
        self.caption_texts: dict[Path, tuple[Path, str]] = {}  # image -> (metadata file, caption) (fine-tuning)
        self.image_subsets: list[tuple[Path, Subset]] = []  # in job order; a folder may serve two TOML subsets

    def add_image(self, image: Path, subset: Subset) -> None:
        self.image_subsets.append((image, subset))
        self.jobs.append((str(image), self.decode, subset.resolution or self.resolution))

    def dreambooth(self, subset: Subset) -> None:
        problems = self.problems
        files = list_subset(subset)
        subset.images = files.images
        if not files.images:
            problems.append(problem("empty-subset", subset.path, "holds no image kohya loads"
                                    + (f" ({len(files.ignored_images)} in formats it skips)" if files.ignored_images else "")))
        for nested in files.nested:
            count = images_below(nested, limit=10**9)
            problems.append(problem(
                "nested-folder", nested, f"holds {count} image(s) kohya will not see (it does not recurse)" if count
                else "is a folder kohya ignores", severity="error" if count else "warning",
                fix=None if count else "remove the folder"))
        problems.extend(problem("ignored-image", p, f"kohya does not load '{p.suffix}' files") for p in files.ignored_images)
        problems.extend(problem("stray-file", p, "is not training data") for p in files.strays)
        used_stems = set()
        for image in files.images:
            stem = os.path.splitext(image)[0]
            used_stems.add(stem)
            self.add_image(image, subset)
            if stem in files.captions:
                self.captions[image] = files.captions[stem]
                if stem in files.other_captions:
                    other = files.other_captions[stem]
                    problems.append(problem("ignored-caption", other, f"is ignored: the run reads {subset.caption_extension} "
                                            f"captions and {files.captions[stem].name} exists"))
            elif stem in files.other_captions:
                other = files.other_captions[stem]
                problems.append(problem(
                    "wrong-caption-extension", image,
                    f"has no {subset.caption_extension} caption but {other.name} exists: the run reads "
                    f"{subset.caption_extension} (kohya's own default is .caption)",
                    fix=f"rename {other.name} to {Path(stem).name}{subset.caption_extension}"))
            elif not (subset.is_reg and subset.concept):  # a reg image trains on its class tokens, as kohya intends
                token = f"the class token '{subset.concept}'" if subset.concept else "an empty caption"
                problems.append(problem("missing-caption", image, f"has no {Path(stem).name}{subset.caption_extension}: "
                                        f"kohya would train it on {token}",
                                        fix=None if subset.concept or not subset.is_reg else
                                        "write a caption file beside it, or set class_tokens for the reg subset"))
        for stem, caption in list(files.captions.items()) + list(files.other_captions.items()):
            if stem not in used_stems:
                problems.append(problem("orphan-caption", caption, "has no image beside it"))
        for path in (*files.captions.values(), *files.other_captions.values()):
            self.caption_bytes[path] = path.read_bytes()
            self.hash_entries.append((_relname(path), hashlib.sha256(self.caption_bytes[path]).hexdigest()))

    def fine_tuning(self, subset: Subset) -> None:
        assert subset.metadata_file is not None
        entries = finetune.read_entries(subset)
        subset.images = entries.images
        self.problems.extend(entries.problems)
        if entries.data is not None:
            self.hash_entries.append((_relname(subset.metadata_file), hashlib.sha256(entries.data).hexdigest()))
        for image in entries.images:
            self.add_image(image, subset)
            self.caption_texts[image] = (subset.metadata_file, entries.captions[image])


def scan(root: Path, *, caption_extension: str = ".txt", resolution: tuple[int, int] = (512, 512),
         decode: bool = False, workers: int | None = None) -> CheckReport:
    """Every problem of a kohya dataset (a train_data_dir or a dataset TOML) in one pass. Read-only."""
    started = time.perf_counter()
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    layout = read_layout(Path(root), caption_extension, resolution)
    walk = _Scan(layout, decode, resolution)
    problems = walk.problems
    problems.extend(problem("stray-file", p, "is not training data") for p in layout.strays)
    counter = clip_token_counter()
    for subset in layout.subsets:
        if subset.kind == "fine-tuning":
            walk.fine_tuning(subset)
        else:
            walk.dreambooth(subset)
    if not layout.subsets and not any(p.code in ("not-found", "bad-config") for p in problems):
        problems.insert(0, problem("no-subsets", layout.root, "kohya would log 'No data found' and exit 0 "
                                   "without training"))

    with inspecting(walk.jobs, workers) as inspected:
        summary = _summarise(walk, counter)
        by_hash: dict[str, Path] = {}
        for facts, (path, subset) in zip(inspected(), walk.image_subsets):
            for code, message, severity in facts["problems"]:
                problems.append(problem(code, path, message, severity=severity))
            if facts["sha256"] is not None:
                walk.hash_entries.append((_relname(path), facts["sha256"]))
                first = by_hash.setdefault(facts["sha256"], path)
                if first != path:
                    problems.append(problem("duplicate-image", path, f"has the same bytes as {display(first, layout.root)}"))
    problems = sorted(dict.fromkeys(problems), key=lambda p: (p.severity != "error", p.code, str(p.path)))
    return CheckReport(
        root=layout.root, caption_extension=caption_extension, resolution=resolution, decode=decode,
        subsets=layout.subsets, problems=problems, tokenizer=counter.name, **summary,
        content_hash=_dataset_digest(walk.hash_entries), seconds=time.perf_counter() - started)


def _summarise(walk: _Scan, counter: ClipTokenCounter) -> dict[str, Any]:
    """Check every caption kohya will read and count tokens, skin types and diagnoses (effective = × repeats)."""
    problems = walk.problems
    metadata = read_metadata(walk.layout.root, (image for image, _ in walk.image_subsets), problems)
    histogram = {_bin_label(lo, hi): 0 for lo, hi in _TOKEN_BINS}
    fst_counts: Counter[str] = Counter()
    fst_effective: Counter[str] = Counter()
    diag_counts: Counter[str] = Counter()
    diag_effective: Counter[str] = Counter()
    for image, subset in walk.image_subsets:
        caption_text, tokens = None, None
        if subset.kind == "fine-tuning" and image in walk.caption_texts:
            metadata_file, caption_text = walk.caption_texts[image]
            if caption_text.strip():  # an empty one is reported by finetune
                lines = caption_text.split("\n") if subset.enable_wildcard else [caption_text]
                tokens = max(counter.count(line) for line in lines)
                if tokens > CLIP_CHUNK_TOKENS:
                    _count_tokens(image, max(lines, key=counter.count), counter, problems,
                                  where=f"its caption in {metadata_file.name} ")
        elif image in walk.captions:
            caption = walk.captions[image]
            caption_text, tokens = _check_caption(caption, walk.caption_bytes[caption], counter, problems,
                                                  wildcard=subset.enable_wildcard)
        if tokens is not None:
            lo, hi = next(b for b in _TOKEN_BINS if b[0] <= tokens <= b[1])
            histogram[_bin_label(lo, hi)] += 1
        record = metadata.get(image, {})
        fst = record.get("fitzpatrick") or (fst_from_caption(caption_text) if caption_text else None)
        if fst:
            fst_counts[fst] += 1
            fst_effective[fst] += subset.repeats
        if "diagnosis" in record:
            diag_counts[record["diagnosis"]] += 1
            diag_effective[record["diagnosis"]] += subset.repeats

    fst_order = [*FST_TYPES, *FST_GROUPS, UNKNOWN]
    if fst_counts:  # every type is listed once any is known, so a missing one shows as 0
        for fst in FST_TYPES:
            fst_counts.setdefault(fst, 0)
    return {
        "token_histogram": histogram,
        "fst_counts": {k: {"images": fst_counts[k], "effective": fst_effective[k]}
                       for k in sorted(fst_counts, key=lambda k: fst_order.index(k) if k in fst_order else 99)},
        "diagnosis_counts": {k: {"images": diag_counts[k], "effective": diag_effective[k]} for k in sorted(diag_counts)},
    }
