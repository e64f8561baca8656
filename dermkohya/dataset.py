"""Scan a kohya dataset and report every problem before a GPU hour is spent.

kohya is forgiving in the ways that cost a training run: a folder without an `N_` prefix is skipped
with a log line (and no data at all still exits 0), an image without a caption silently trains on the
folder's class token, EXIF orientation is ignored, a 16-bit greyscale PNG is clipped to white. This
module reads a `train_data_dir` (or a kohya `--dataset_config` TOML) the way kohya will, never writes
to it, and reports all of that in one pass.

Image headers are read by default (PIL opens lazily, which is fast enough for tens of thousands of
files); `decode=True` decodes every image fully in a process pool.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import importlib.util
import io
import os
import re
import time
import tomllib
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from dermkohya.files import sha256_file
from dermkohya.errors import DermkohyaError
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN, fst_from_caption, parse_fst

# kohya globs exactly these suffixes and their upper-case forms (library/train_util.py IMAGE_EXTENSIONS).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KOHYA_IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS))
_OTHER_IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".gif", ".heic", ".heif", ".avif", ".jfif", ".jp2"})
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
_STRAY_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx", ".ipynb_checkpoints"})
_KOHYA_OWN_SUFFIXES = frozenset({".npz"})  # latents kohya itself caches beside the images
_EXPECTED_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
METADATA_FILE = "metadata.csv"

CLIP_CHUNK_TOKENS = 75  # CLIP's 77 positions minus the start and end tokens
# Pillow refuses images above twice this many pixels (DecompressionBombError) and warns above it.
BOMB_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
_TOKEN_BINS: tuple[tuple[int, int], ...] = (
    (0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 75), (76, 150), (151, 10**9),
)

Severity = Literal["error", "warning"]

# code -> (default severity, title, fix). A problem may override the fix where the run decides it.
_CODES: dict[str, tuple[Severity, str, str]] = {
    "not-found": ("error", "path does not exist", "point check at the train_data_dir or dataset TOML"),
    "bad-config": ("error", "dataset TOML kohya will reject", "fix the key named in the message"),
    "no-subsets": ("error", "no folder kohya will train on", "put images in <repeats>_<concept> folders, e.g. 10_derm"),
    "folder-no-repeats": ("error", "folder name kohya will not parse", "rename it <repeats>_<concept>, e.g. 10_derm"),
    "folder-zero-repeats": ("error", "folder with repeats < 1 (kohya skips it)", "use a repeat count of 1 or more"),
    "folder-no-concept": ("warning", "folder without a concept name", "name it <repeats>_<concept>: the concept is the class token"),
    "images-in-root": ("error", "images directly in the dataset root (kohya ignores them)", "move them into a <repeats>_<concept> folder"),
    "empty-subset": ("error", "subset folder without images", "add images or remove the folder"),
    "nested-folder": ("error", "images in a nested folder (kohya does not recurse)", "move the images up into the concept folder, or make the folder its own <repeats>_<concept> subset"),
    "ignored-image": ("error", "image file kohya will not load", "convert it to .png/.jpg/.jpeg/.webp/.bmp (lower or upper case)"),
    "missing-caption": ("error", "image without a caption (kohya trains it on the class token)", "write a caption file beside it"),
    "wrong-caption-extension": ("error", "caption with the wrong extension", "rename the caption to the extension the run uses"),
    "orphan-caption": ("warning", "caption without an image", "remove it or restore its image"),
    "ignored-caption": ("warning", "second caption kohya ignores", "delete the caption with the extension the run does not use"),
    "empty-caption": ("error", "empty caption (kohya fails or trains on nothing)", "write the caption text on the first line"),
    "caption-not-utf8": ("error", "caption is not UTF-8 (kohya stops with UnicodeDecodeError)", "re-save the caption as UTF-8"),
    "caption-bom": ("warning", "caption starts with a byte-order mark", "re-save as UTF-8 without BOM: kohya keeps the mark in the first token"),
    "caption-multiline": ("warning", "caption with several lines (kohya reads the first)", "join the caption onto one line (or enable_wildcard on purpose)"),
    "caption-too-long": ("warning", "caption longer than one CLIP chunk", "shorten it to 75 tokens, or train with --max_token_length 150/225"),
    "unreadable-image": ("error", "image that does not open or decode", "re-export the image or remove it"),
    "format-mismatch": ("warning", "file content does not match its extension", "rename the file to the extension of its real format"),
    "bit-depth": ("warning", "16-bit image (kohya loads 8 bits per channel)", "convert to 8-bit RGB"),
    "cmyk": ("warning", "CMYK image (converted to RGB without a colour profile: skin tones shift)", "convert to sRGB with a colour-managed tool"),
    "alpha-channel": ("warning", "image with transparency (kohya drops alpha: hidden pixels show)", "flatten onto a background and save as RGB"),
    "exif-rotation": ("warning", "EXIF orientation kohya ignores (trained rotated/mirrored)", "rotate the pixels and drop the orientation tag (dermkohya prepare does)"),
    "too-small": ("warning", "image smaller than the training resolution (kohya upscales it)", "use a larger original or train at a lower resolution"),
    "huge-image": ("warning", "image above Pillow's pixel limit (warns, slow to load)", "downscale it before training"),
    "decompression-bomb": ("error", "image Pillow refuses to open (decompression-bomb size)", "downscale it before training"),
    "duplicate-image": ("warning", "image with the same bytes as another", "keep one copy (or raise the repeats on purpose)"),
    "stray-file": ("warning", "stray file or folder", "delete it: it is not training data"),
    "caption-extension-unset": ("warning", "dataset TOML without caption_extension", "set caption_extension = \".txt\": kohya's default is .caption"),
    "metadata-missing-image": ("warning", "metadata.csv row naming an image the dataset lacks", "fix the image column (paths relative to the dataset root)"),
    "metadata-bad-value": ("warning", "metadata.csv value not understood", "use I–VI or 1–6 for fitzpatrick"),
    "unsupported-subset": ("warning", "dataset TOML subset dermkohya does not check", "check fine-tuning (metadata_file) subsets by hand"),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file, with the fix; the report groups them by code."""

    severity: Severity
    code: str
    path: Path
    message: str
    fix: str

    def to_dict(self, root: Path) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "path": _display(self.path, root),
                "message": self.message, "fix": self.fix}


def _problem(code: str, path: Path, message: str, *, fix: str | None = None,
             severity: Severity | None = None) -> Problem:
    default_severity, _, default_fix = _CODES[code]
    return Problem(severity or default_severity, code, path, message, fix or default_fix)


@dataclass
class Subset:
    """One kohya subset: a folder of images trained `repeats` times per epoch under a class token."""

    path: Path
    repeats: int
    concept: str
    images: list[Path] = field(default_factory=list)
    caption_extension: str = ".txt"
    is_reg: bool = False
    resolution: tuple[int, int] | None = None

    @property
    def effective_samples(self) -> int:
        return len(self.images) * self.repeats


# ---------------------------------------------------------------------------------------------------
# Layout: which folders kohya will read, and which it will silently skip


@dataclass
class _Layout:
    root: Path  # where relative names in the report start
    subsets: list[Subset]
    problems: list[Problem]
    strays: list[Path] = field(default_factory=list)


def parse_subset_folder(name: str) -> tuple[int, str] | None:
    """kohya's reading of a `<repeats>_<concept>` folder name, or None where kohya skips the folder."""
    head, _, concept = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, concept


def _is_stray(name: str) -> bool:
    return name.lower() in _STRAY_NAMES or name.startswith("._")


def _images_below(folder: Path, limit: int = 1) -> int:
    """How many images a folder holds at any depth (counting stops at `limit`)."""
    found = 0
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _is_stray(d)]
        found += sum(1 for f in files if _image_suffix(f))
        if found >= limit:
            break
    return found


def _image_suffix(name: str) -> bool:
    suffix = os.path.splitext(name)[1]
    return suffix in KOHYA_IMAGE_SUFFIXES or suffix.lower() in IMAGE_EXTENSIONS or suffix.lower() in _OTHER_IMAGE_SUFFIXES


def _layout_from_dir(root: Path, caption_extension: str, resolution: tuple[int, int]) -> _Layout:
    layout = _Layout(root=root, subsets=[], problems=[])
    for entry in sorted(root.iterdir()):
        name = entry.name
        if _is_stray(name) or (entry.is_dir() and name.startswith(".")):
            layout.strays.append(entry)
            continue
        if entry.is_dir():
            parsed = parse_subset_folder(name)
            if parsed is None:
                has_images = _images_below(entry) > 0
                layout.problems.append(_problem(
                    "folder-no-repeats", entry,
                    f"'{name}' has no number before the first '_': kohya skips it"
                    + (" and every image in it" if has_images else ""),
                    severity="error" if has_images else "warning"))
                continue
            repeats, concept = parsed
            if repeats < 1:
                layout.problems.append(_problem(
                    "folder-zero-repeats", entry, f"'{name}' has {repeats} repeats: kohya skips it"))
                continue
            if not concept:
                layout.problems.append(_problem(
                    "folder-no-concept", entry, f"'{name}' has no concept after the repeats: the class token is empty"))
            layout.subsets.append(Subset(entry, repeats, concept, caption_extension=caption_extension,
                                         resolution=resolution))
        elif _image_suffix(name):
            layout.problems.append(_problem(
                "images-in-root", entry, "image in the dataset root: kohya reads only <repeats>_<concept> subfolders"))
    return layout


def _ascend(key: str, *levels: dict[str, Any]) -> Any:
    """A kohya 'ascendable' option: the subset's value, else its dataset's, else [general]'s."""
    for level in levels:
        if key in level:
            return level[key]
    return None


def _resolution_value(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"resolution {value!r} is neither an integer nor [width, height]")


def _layout_from_config(config: Path, caption_extension: str, resolution: tuple[int, int]) -> _Layout:
    """Subsets of a kohya `--dataset_config` TOML; relative image_dir are taken from the working
    directory as kohya does, falling back to the TOML's folder."""
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DermkohyaError(f"{config}: not a valid TOML file ({exc}); fix the syntax") from exc
    layout = _Layout(root=config.parent, subsets=[], problems=[])
    general = data.get("general", {})
    for i, dataset in enumerate(data.get("datasets", [])):
        try:
            ds_resolution = _resolution_value(_ascend("resolution", dataset, general)) or resolution
        except ValueError as exc:
            layout.problems.append(_problem("bad-config", config, f"[[datasets]] #{i + 1}: {exc}"))
            ds_resolution = resolution
        for j, subset in enumerate(dataset.get("subsets", [])):
            where = f"[[datasets]] #{i + 1}, [[datasets.subsets]] #{j + 1}"
            if "metadata_file" in subset:
                layout.problems.append(_problem("unsupported-subset", config, f"{where} is a fine-tuning subset"))
                continue
            image_dir = subset.get("image_dir")
            if not isinstance(image_dir, str):
                layout.problems.append(_problem("bad-config", config, f"{where} has no image_dir",
                                                fix="add image_dir = \"<folder of images>\""))
                continue
            path = Path(image_dir)
            if not path.is_absolute() and not path.is_dir() and (config.parent / path).is_dir():
                path = config.parent / path
            repeats = _ascend("num_repeats", subset, dataset, general)
            repeats = 1 if repeats is None else repeats
            if not isinstance(repeats, int) or repeats < 1:
                layout.problems.append(_problem("folder-zero-repeats", config,
                                                f"{where} has num_repeats = {repeats!r}: kohya skips it"))
                continue
            extension = _ascend("caption_extension", subset, dataset, general)
            if extension is None:
                layout.problems.append(_problem(
                    "caption-extension-unset", config,
                    f"{where}: kohya falls back to --caption_extension; checking with {caption_extension}"))
                extension = caption_extension
            if not path.is_dir():
                layout.problems.append(_problem("not-found", path, f"{where}: image_dir does not exist",
                                                fix=f"fix image_dir in {config.name}"))
                continue
            layout.subsets.append(Subset(
                path, repeats, str(_ascend("class_tokens", subset, dataset, general) or ""),
                caption_extension=str(extension), is_reg=bool(subset.get("is_reg", False)),
                resolution=ds_resolution))
    return layout


def _read_layout(root: Path, caption_extension: str, resolution: tuple[int, int]) -> _Layout:
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".toml":
        return _layout_from_config(root, caption_extension, resolution)
    if not root.is_dir():
        raise DermkohyaError(f"{root}: no such dataset folder or dataset TOML; check the path")
    return _layout_from_dir(root, caption_extension, resolution)


@dataclass
class _SubsetFiles:
    """What one subset folder holds, sorted the way kohya would see it."""

    images: list[Path] = field(default_factory=list)
    captions: dict[str, Path] = field(default_factory=dict)  # image path without suffix -> caption
    other_captions: dict[str, Path] = field(default_factory=dict)  # the caption extension the run does not use
    nested: list[Path] = field(default_factory=list)
    ignored_images: list[Path] = field(default_factory=list)
    strays: list[Path] = field(default_factory=list)


def _list_subset(subset: Subset) -> _SubsetFiles:
    files = _SubsetFiles()
    with os.scandir(subset.path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            name = entry.name
            stem, suffix = os.path.splitext(name)
            if _is_stray(name):
                files.strays.append(path)
            elif entry.is_dir():
                files.nested.append(path)
            elif suffix in KOHYA_IMAGE_SUFFIXES:
                files.images.append(path)
            elif suffix == subset.caption_extension:
                files.captions[os.path.join(subset.path, stem)] = path
            elif suffix in CAPTION_EXTENSIONS:
                files.other_captions[os.path.join(subset.path, stem)] = path
            elif _image_suffix(name):
                files.ignored_images.append(path)
            elif suffix.lower() not in _KOHYA_OWN_SUFFIXES:
                files.strays.append(path)
    return files


def find_subsets(root: Path, *, caption_extension: str = ".txt") -> list[Subset]:
    """The subsets kohya will train on, with their images; raises if there are none.

    `root` is a train_data_dir or a kohya dataset TOML. kohya itself exits 0 with "No data found"
    when nothing parses, so this is an error here.
    """
    layout = _read_layout(Path(root), caption_extension, (512, 512))
    for subset in layout.subsets:
        subset.images = _list_subset(subset).images
    if not layout.subsets:
        raise DermkohyaError(
            f"{root}: no folder kohya will train on (subfolders must be named <repeats>_<concept>, e.g. 10_derm); "
            f"run `dermkohya check {root}` for details")
    return layout.subsets


# ---------------------------------------------------------------------------------------------------
# Content hash: what later stages record as the dataset's identity


_file_sha256 = sha256_file


def _dataset_digest(entries: Iterable[tuple[str, str]]) -> str:
    """sha256 over `relative path NUL sha256(bytes) LF` lines in sorted path order."""
    digest = hashlib.sha256()
    for relpath, file_hash in sorted(entries):
        digest.update(f"{relpath}\0{file_hash}\n".encode())
    return digest.hexdigest()


def _hashed_files(subset: Subset, files: _SubsetFiles) -> Iterator[Path]:
    yield from files.images
    yield from files.captions.values()
    yield from files.other_captions.values()


def _relname(subset: Subset, path: Path) -> str:
    return f"{subset.path.name}/{path.name}"


def content_hash(root: Path, *, caption_extension: str = ".txt") -> str:
    """The dataset's identity: sha256 over the sorted `<subset folder>/<file>` names and the sha256 of
    the bytes of every image and caption in the subset folders. Renaming a folder (its repeats) or
    editing one caption changes it; moving the dataset does not. Reads bytes only, never decodes."""
    subsets = find_subsets(root, caption_extension=caption_extension)
    entries = []
    for subset in subsets:
        for path in _hashed_files(subset, _list_subset(subset)):
            entries.append((_relname(subset, path), _file_sha256(path)))
    return _dataset_digest(entries)


# ---------------------------------------------------------------------------------------------------
# Captions: CLIP token counts


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character map used before BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


# CLIP's pre-tokenizer with \p{L} / \p{N} spelt for the standard library's `re`.
_CLIP_PIECES = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def _clip_merges_file() -> Path | None:
    """The CLIP BPE merges that open_clip_torch (or OpenAI's clip package) ship, found without importing them."""
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                return candidate
    return None


class ClipTokenCounter:
    """Counts the tokens CLIP's tokenizer makes of a caption (without start/end tokens).

    With the BPE merges of an installed open_clip_torch it is exact; without them it approximates:
    one token per pre-tokenizer piece plus one for every further 6 characters of a long piece (rare words
    split into several BPE tokens). On English and dermatology text it lands within -10 %/+20 % of the
    exact count (median +4 %): it over-counts slightly rather than missing a cut.
    """

    def __init__(self, merges_file: Path | None = None) -> None:
        self._ranks: dict[tuple[str, str], int] | None = None
        self._cache: dict[str, int] = {}
        if merges_file is not None:
            lines = gzip.open(merges_file, "rt", encoding="utf-8").read().split("\n")
            merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
            self._ranks = {pair: i for i, pair in enumerate(merges) if len(pair) == 2}
            self._byte_chars = _bytes_to_unicode()
        self.exact = self._ranks is not None
        self.name = "CLIP BPE (open_clip vocabulary)" if self.exact else "approximate (open_clip_torch not installed)"

    def count(self, text: str) -> int:
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        return sum(self._piece_tokens(piece) for piece in _CLIP_PIECES.findall(text))

    def _piece_tokens(self, piece: str) -> int:
        cached = self._cache.get(piece)
        if cached is None:
            cached = self._bpe_length(piece) if self._ranks is not None else 1 + max(0, len(piece) - 1) // 6
            self._cache[piece] = cached
        return cached

    def _bpe_length(self, piece: str) -> int:
        assert self._ranks is not None
        word = [self._byte_chars[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self._ranks.get(pair, 1 << 30))
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return len(word)


@lru_cache(maxsize=1)
def clip_token_counter() -> ClipTokenCounter:
    """The best counter this environment offers (loading the merges takes ~0.1 s, so it is kept)."""
    return ClipTokenCounter(_clip_merges_file())


# ---------------------------------------------------------------------------------------------------
# Images: header facts (always) and a full decode (on request or when the file looks truncated)


def _looks_truncated(data: bytes, image_format: str | None) -> bool:
    tail = data.rstrip(b"\0\r\n ")
    if image_format == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if image_format == "PNG":
        return b"IEND" not in tail[-16:]
    return False


def _orientation(exif_block: object) -> int:
    """The EXIF orientation tag from the block read with the header (Image.getexif() would decode a PNG)."""
    if not isinstance(exif_block, bytes):
        return 1
    exif = Image.Exif()
    try:
        exif.load(exif_block)
        return int(exif.get(0x0112, 1) or 1)
    except Exception:  # a malformed EXIF block is not worth stopping the scan for
        return 1


def _inspect_image(path: str, decode: bool, resolution: tuple[int, int]) -> dict[str, Any]:
    """Facts and problems of one image, as plain data so a worker process can return it."""
    facts: dict[str, Any] = {"path": path, "sha256": None, "problems": []}
    problems: list[tuple[str, str, str | None]] = facts["problems"]  # (code, message, severity override)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        problems.append(("unreadable-image", f"cannot be read: {exc.strerror or exc}", None))
        return facts
    facts["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        problems.append(("unreadable-image", "is empty (0 bytes)", None))
        return facts
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # sizes are judged below, not refused
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        problems.append(("unreadable-image", f"is not an image Pillow can open ({exc})", None))
        return facts
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with image:
        width, height = image.size
        fmt, mode = image.format, image.mode
        facts.update(width=width, height=height, format=fmt, mode=mode)
        suffix = os.path.splitext(path)[1].lower()
        expected = _EXPECTED_FORMAT.get(suffix)
        if expected and fmt != expected:
            problems.append(("format-mismatch", f"is a {fmt} file named {suffix}", None))
        pixels = width * height
        if pixels > 2 * BOMB_PIXELS:
            problems.append(("decompression-bomb", f"is {width}×{height} ({pixels:,} pixels): Pillow refuses "
                             f"more than {2 * BOMB_PIXELS:,}", None))
            return facts
        if pixels > BOMB_PIXELS:
            problems.append(("huge-image", f"is {width}×{height} ({pixels:,} pixels)", None))
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            problems.append(("bit-depth", f"is {mode} greyscale: converting it to RGB clips every value above 255 "
                             "(the image trains as near-white)", "error"))
        elif fmt == "PNG" and len(data) > 24 and data[24] == 16:
            problems.append(("bit-depth", f"is a 16-bit-per-channel {mode} PNG", None))
        if mode == "CMYK":
            problems.append(("cmyk", "is CMYK", None))
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            problems.append(("alpha-channel", f"has transparency (mode {mode})", None))
        orientation = _orientation(image.info.get("exif"))
        if orientation not in (None, 1):
            turn = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed", 6: "rotated 90°",
                    7: "transversed", 8: "rotated 270°"}.get(orientation, f"orientation {orientation}")
            problems.append(("exif-rotation", f"has EXIF orientation {orientation} ({turn}): kohya trains the "
                             "stored pixels", None))
        if pixels < resolution[0] * resolution[1]:
            problems.append(("too-small", f"is {width}×{height}, below the training resolution "
                             f"{resolution[0]}×{resolution[1]}", None))
        if decode or _looks_truncated(data, fmt):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image.load()
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken data
                problems.append(("unreadable-image", f"does not decode ({exc})", None))
    return facts


def _inspect_chunk(jobs: list[tuple[str, bool, tuple[int, int]]]) -> list[dict[str, Any]]:
    return [_inspect_image(*job) for job in jobs]


@contextmanager
def _inspecting(jobs: list[tuple[str, bool, tuple[int, int]]], workers: int | None) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Start inspecting images in a process pool and yield a function that waits for the results, so
    the caller checks captions meanwhile. Small jobs stay in this process (a pool costs ~0.1 s)."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < 200:
        yield lambda: _inspect_chunk(jobs)
        return
    size = max(16, min(256, len(jobs) // (workers * 8)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = pool.map(_inspect_chunk, chunks)
        yield lambda: [facts for chunk in pending for facts in chunk]


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class CheckReport:
    """Every problem of one dataset plus the summary a practitioner wants before training."""

    root: Path
    caption_extension: str
    resolution: tuple[int, int]
    decode: bool
    subsets: list[Subset]
    problems: list[Problem]
    token_histogram: dict[str, int]
    tokenizer: str
    fst_counts: dict[str, dict[str, int]]  # FST -> {"images": n, "effective": n}
    diagnosis_counts: dict[str, dict[str, int]]
    content_hash: str
    seconds: float

    @property
    def images(self) -> int:
        return sum(len(s.images) for s in self.subsets)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def has_errors(self, strict: bool = False) -> bool:
        """True when training should not start: any error, or with `strict` any warning too."""
        return bool(self.errors) or (strict and bool(self.warnings))

    def by_code(self) -> dict[str, list[Problem]]:
        """Problems grouped by code, errors first, then by how many files each touches."""
        groups: dict[str, list[Problem]] = {}
        for problem in self.problems:
            groups.setdefault(problem.code, []).append(problem)
        return dict(sorted(groups.items(), key=lambda kv: (
            0 if any(p.severity == "error" for p in kv[1]) else 1, -len(kv[1]), kv[0])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "caption_extension": self.caption_extension,
            "resolution": list(self.resolution),
            "decode": self.decode,
            "ok": not self.errors,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "counts": {code: len(problems) for code, problems in self.by_code().items()},
            "problems": [p.to_dict(self.root) for p in self.problems],
            "summary": {
                "images": self.images,
                "effective_samples": sum(s.effective_samples for s in self.subsets),
                "subsets": [{"folder": _display(s.path, self.root), "repeats": s.repeats, "concept": s.concept,
                             "is_reg": s.is_reg, "images": len(s.images), "effective_samples": s.effective_samples}
                            for s in self.subsets],
                "caption_tokens": {"tokenizer": self.tokenizer, "histogram": self.token_histogram,
                                   "chunk_limit": CLIP_CHUNK_TOKENS},
                "fitzpatrick": self.fst_counts,
                "diagnosis": self.diagnosis_counts,
                "content_hash": self.content_hash,
            },
            "seconds": round(self.seconds, 3),
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        scan = "full decode" if self.decode else "header scan"
        yield Text.assemble(
            (str(self.root), "bold"), f": {self.images} images in {len(self.subsets)} subset(s); captions "
            f"{self.caption_extension}, resolution {self.resolution[0]}×{self.resolution[1]}, {scan} "
            f"in {self.seconds:.1f} s")
        if self.subsets:
            table = Table(title="subsets", title_justify="left")
            for column in ("folder", "repeats", "concept", "images", "effective samples"):
                table.add_column(column, justify="right" if column in ("repeats", "images", "effective samples") else "left")
            for s in self.subsets:
                table.add_row(Text(_display(s.path, self.root) + (" (reg)" if s.is_reg else "")), str(s.repeats),
                              Text(s.concept), str(len(s.images)), str(s.effective_samples))
            yield table
        for title, counts in (("Fitzpatrick skin type", self.fst_counts), ("diagnosis", self.diagnosis_counts)):
            if counts:
                yield _counts_table(title, counts)
        if any(self.token_histogram.values()):
            how = "CLIP BPE" if self.tokenizer.startswith("CLIP") else "approximate"
            table = Table(title=f"caption tokens ({how}; {CLIP_CHUNK_TOKENS} per chunk)", title_justify="left")
            table.add_column("tokens")
            table.add_column("captions", justify="right")
            table.add_column("")
            top = max(self.token_histogram.values())
            for label, count in self.token_histogram.items():
                if count:
                    table.add_row(label, str(count), "█" * max(1, round(30 * count / top)))
            yield table
        shown = 25
        for code, problems in self.by_code().items():
            severity = "error" if any(p.severity == "error" for p in problems) else "warning"
            colour = "red" if severity == "error" else "yellow"
            yield Text.from_markup(f"\n[bold {colour}]{severity}[/] [bold]{code}[/] ({len(problems)}): {_CODES[code][1]}")
            table = Table(show_header=False, box=None, padding=(0, 1, 0, 2))
            table.add_column("path", style="bold", overflow="fold")
            table.add_column("problem", overflow="fold")
            for p in problems[:shown]:
                table.add_row(Text(_display(p.path, self.root)), Text(p.message))
            if len(problems) > shown:
                table.add_row(f"… and {len(problems) - shown} more", "(--json lists every one)")
            yield table
            fixes = list(dict.fromkeys(p.fix for p in problems))
            yield Text(f"  fix: {fixes[0]}" if len(fixes) == 1 else "  fix: " + "; ".join(fixes[:3]), style="dim")
        yield Text("")
        if self.errors:
            yield Text.from_markup(f"[bold red]✗ {len(self.errors)} error(s)[/], {len(self.warnings)} warning(s)")
        elif self.warnings:
            yield Text.from_markup(f"[bold yellow]! 0 errors, {len(self.warnings)} warning(s)[/] (--strict makes them errors)")
        else:
            yield Text.from_markup("[bold green]✓ no problems[/]")
        yield Text(f"content hash sha256:{self.content_hash}", style="dim")


def _counts_table(title: str, counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title=f"per {title}", title_justify="left")
    table.add_column(title)
    table.add_column("images", justify="right")
    table.add_column("effective samples", justify="right")
    table.add_column("share", justify="right")
    total = sum(c["effective"] for c in counts.values()) or 1
    for key, c in counts.items():
        table.add_row(Text(key), str(c["images"]), str(c["effective"]), f"{100 * c['effective'] / total:.1f} %")
    return table


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


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


# ---------------------------------------------------------------------------------------------------
# The scan


def _read_metadata(root: Path, all_images: Iterable[Path], problems: list[Problem]) -> dict[Path, dict[str, str]]:
    """diagnosis / skin type per image from a sidecar metadata.csv (image paths relative to the root)."""
    sidecar = root / METADATA_FILE
    if not sidecar.is_file():
        return {}
    images = {_display(image, root): image for image in all_images}
    rows: dict[Path, dict[str, str]] = {}
    with open(sidecar, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        image_col = columns.get("image")
        fst_col = next((columns[c] for c in ("fitzpatrick", "fst", "fitzpatrick_skin_type") if c in columns), None)
        diag_col = columns.get("diagnosis")
        if image_col is None or (fst_col is None and diag_col is None):
            return {}
        for line, row in enumerate(reader, start=2):
            name = (row.get(image_col) or "").strip()
            path = images.get(name)
            if path is None:
                problems.append(_problem("metadata-missing-image", sidecar,
                                         f"line {line}: image '{name}' is not in any subset folder"))
                continue
            record: dict[str, str] = {}
            if diag_col and (row.get(diag_col) or "").strip():
                record["diagnosis"] = row[diag_col].strip()
            if fst_col:
                fst = parse_fst(row.get(fst_col) or "")
                if fst is None:
                    problems.append(_problem("metadata-bad-value", sidecar,
                                             f"line {line}: fitzpatrick '{row.get(fst_col)}' is not a skin type"))
                else:
                    record["fitzpatrick"] = fst
            rows[path] = record
    return rows


def metadata_counts(root: Path) -> dict[str, dict[str, int]]:
    """Images per diagnosis × skin type from the root's metadata.csv ({} without one): for manifests and
    the sample-prompt grid. Rows naming no image of a subset are left out (`scan` reports them)."""
    images = [image for subset in find_subsets(Path(root)) for image in subset.images]
    counts: dict[str, dict[str, int]] = {}
    for record in _read_metadata(Path(root), images, []).values():
        if "diagnosis" in record:
            cell = counts.setdefault(record["diagnosis"], {})
            fst = record.get("fitzpatrick", UNKNOWN)
            cell[fst] = cell.get(fst, 0) + 1
    return counts


def _check_caption(path: Path, data: bytes, counter: ClipTokenCounter,
                   problems: list[Problem]) -> tuple[str | None, int | None]:
    """The caption kohya will use (its first line) and its token count, reporting what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(_problem("caption-not-utf8", path, f"byte {exc.start} is not UTF-8 "
                                 f"(0x{data[exc.start]:02x}); kohya stops with UnicodeDecodeError"))
        return None, None
    if text.startswith("\ufeff"):
        problems.append(_problem("caption-bom", path, "starts with a UTF-8 byte-order mark"))
    lines = re.split(r"\r\n|\r|\n", text)  # what kohya's text-mode readlines() splits on
    first = lines[0].strip()
    if not first:
        problems.append(_problem("empty-caption", path, "is empty" if not text.strip() else
                                 "has an empty first line: kohya reads only the first line"))
        return None, None
    if sum(1 for line in lines if line.strip()) > 1:
        problems.append(_problem("caption-multiline", path, f"has {sum(1 for line in lines if line.strip())} "
                                 "lines; kohya uses the first"))
    tokens = counter.count(first)
    if tokens > CLIP_CHUNK_TOKENS:
        approx = "" if counter.exact else " (approximate count)"
        problems.append(_problem("caption-too-long", path, f"has {tokens} CLIP tokens{approx}: "
                                 f"tokens after {CLIP_CHUNK_TOKENS} are cut unless --max_token_length is 150 or 225"))
    return first, tokens


def _bin_label(low: int, high: int) -> str:
    return f"{low}–{high}" if high < 10**9 else f"{low}+"


def scan(root: Path, *, caption_extension: str = ".txt", resolution: tuple[int, int] = (512, 512),
         decode: bool = False, workers: int | None = None) -> CheckReport:
    """Every problem of a kohya dataset (a train_data_dir or a dataset TOML) in one pass. Read-only."""
    started = time.perf_counter()
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    layout = _read_layout(Path(root), caption_extension, resolution)
    problems = layout.problems
    problems.extend(_problem("stray-file", p, "is not training data") for p in layout.strays)
    counter = clip_token_counter()

    jobs: list[tuple[str, bool, tuple[int, int]]] = []
    hash_entries: list[tuple[str, str]] = []
    captions: dict[Path, Path] = {}
    caption_bytes: dict[Path, bytes] = {}
    image_subsets: list[tuple[Path, Subset]] = []  # in job order; a folder may serve two TOML subsets
    for subset in layout.subsets:
        files = _list_subset(subset)
        subset.images = files.images
        if not files.images:
            problems.append(_problem("empty-subset", subset.path, "holds no image kohya loads"
                                     + (f" ({len(files.ignored_images)} in formats it skips)" if files.ignored_images else "")))
        for nested in files.nested:
            count = _images_below(nested, limit=10**9)
            problems.append(_problem(
                "nested-folder", nested, f"holds {count} image(s) kohya will not see (it does not recurse)" if count
                else "is a folder kohya ignores", severity="error" if count else "warning",
                fix=None if count else "remove the folder"))
        problems.extend(_problem("ignored-image", p, f"kohya does not load '{p.suffix}' files") for p in files.ignored_images)
        problems.extend(_problem("stray-file", p, "is not training data") for p in files.strays)
        used_stems = set()
        for image in files.images:
            stem = os.path.splitext(image)[0]
            used_stems.add(stem)
            image_subsets.append((image, subset))
            jobs.append((str(image), decode, subset.resolution or resolution))
            if stem in files.captions:
                captions[image] = files.captions[stem]
                if stem in files.other_captions:
                    other = files.other_captions[stem]
                    problems.append(_problem("ignored-caption", other, f"is ignored: the run reads {subset.caption_extension} "
                                             f"captions and {files.captions[stem].name} exists"))
            elif stem in files.other_captions:
                other = files.other_captions[stem]
                problems.append(_problem(
                    "wrong-caption-extension", image,
                    f"has no {subset.caption_extension} caption but {other.name} exists: the run reads "
                    f"{subset.caption_extension} (kohya's own default is .caption)",
                    fix=f"rename {other.name} to {Path(stem).name}{subset.caption_extension}"))
            else:
                token = f"the class token '{subset.concept}'" if subset.concept else "an empty caption"
                problems.append(_problem("missing-caption", image, f"has no {Path(stem).name}{subset.caption_extension}: "
                                         f"kohya would train it on {token}"))
        for stem, caption in list(files.captions.items()) + list(files.other_captions.items()):
            if stem not in used_stems:
                problems.append(_problem("orphan-caption", caption, "has no image beside it"))
        for path in (*files.captions.values(), *files.other_captions.values()):
            caption_bytes[path] = path.read_bytes()
            hash_entries.append((_relname(subset, path), hashlib.sha256(caption_bytes[path]).hexdigest()))
    if not layout.subsets and not any(p.code in ("not-found", "bad-config") for p in problems):
        problems.insert(0, _problem("no-subsets", layout.root, "kohya would log 'No data found' and exit 0 "
                                    "without training"))

    with _inspecting(jobs, workers) as inspected:
        summary = _summarise(layout, image_subsets, captions, caption_bytes, counter, problems)
        by_hash: dict[str, Path] = {}
        for facts, (path, subset) in zip(inspected(), image_subsets):
            for code, message, severity in facts["problems"]:
                problems.append(_problem(code, path, message, severity=severity))
            if facts["sha256"] is not None:
                hash_entries.append((_relname(subset, path), facts["sha256"]))
                first = by_hash.setdefault(facts["sha256"], path)
                if first != path:
                    problems.append(_problem("duplicate-image", path, f"has the same bytes as {_display(first, layout.root)}"))
    problems = sorted(dict.fromkeys(problems), key=lambda p: (p.severity != "error", p.code, str(p.path)))
    return CheckReport(
        root=layout.root, caption_extension=caption_extension, resolution=resolution, decode=decode,
        subsets=layout.subsets, problems=problems, tokenizer=counter.name, **summary,
        content_hash=_dataset_digest(hash_entries), seconds=time.perf_counter() - started)


def _summarise(layout: _Layout, image_subsets: list[tuple[Path, Subset]], captions: dict[Path, Path],
               caption_bytes: dict[Path, bytes], counter: ClipTokenCounter, problems: list[Problem]) -> dict[str, Any]:
    """Check every caption kohya will read and count tokens, skin types and diagnoses (effective = × repeats)."""
    metadata = _read_metadata(layout.root, (image for image, _ in image_subsets), problems)
    histogram = {_bin_label(lo, hi): 0 for lo, hi in _TOKEN_BINS}
    fst_counts: Counter[str] = Counter()
    fst_effective: Counter[str] = Counter()
    diag_counts: Counter[str] = Counter()
    diag_effective: Counter[str] = Counter()
    for image, subset in image_subsets:
        caption_text = None
        if image in captions:
            caption = captions[image]
            caption_text, tokens = _check_caption(caption, caption_bytes[caption], counter, problems)
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
