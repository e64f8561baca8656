"""Which folders kohya will read, and which it will silently skip: subsets and what each folder holds.

A `train_data_dir` is read here the way kohya reads it (`<repeats>_<concept>` folders, images directly
inside, no recursion); a `--dataset_config` TOML is read in `kohya_config` into the same Subset records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dermkohya.dataset.problems import Problem, problem

# kohya globs exactly these suffixes and their upper-case forms (library/train_util.py IMAGE_EXTENSIONS).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KOHYA_IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS))
_OTHER_IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".gif", ".heic", ".heif", ".avif", ".jfif", ".jp2"})
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
_STRAY_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx", ".ipynb_checkpoints"})
_KOHYA_OWN_SUFFIXES = frozenset({".npz"})  # latents kohya itself caches beside the images

# kohya's two kinds of subset: images with caption files beside them, or images listed in a metadata file.
SubsetKind = Literal["dreambooth", "fine-tuning"]


@dataclass
class Subset:
    """One kohya subset: images trained `repeats` times per epoch.

    A DreamBooth subset is a folder whose images have caption files beside them (or fall back to the
    class tokens, `concept`); a fine-tuning subset lists its images and captions in `metadata_file`,
    with keys relative to `image_dir` (then `path` is image_dir, else the metadata file's folder).
    """

    path: Path
    repeats: int
    concept: str
    images: list[Path] = field(default_factory=list)
    caption_extension: str = ".txt"
    is_reg: bool = False
    resolution: tuple[int, int] | None = None
    kind: SubsetKind = "dreambooth"
    metadata_file: Path | None = None
    image_dir: Path | None = None  # fine-tuning: where relative keys start (None: kohya needs absolute keys)
    caption_separator: str = ","
    enable_wildcard: bool = False

    @property
    def effective_samples(self) -> int:
        return len(self.images) * self.repeats


@dataclass
class Layout:
    """The subsets kohya will train on, and what was found wrong on the way to them."""

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


def is_stray(name: str) -> bool:
    return name.lower() in _STRAY_NAMES or name.startswith("._")


def image_suffix(name: str) -> bool:
    """An image by its name, whether or not kohya loads that format."""
    suffix = os.path.splitext(name)[1]
    return suffix in KOHYA_IMAGE_SUFFIXES or suffix.lower() in IMAGE_EXTENSIONS or suffix.lower() in _OTHER_IMAGE_SUFFIXES


def images_below(folder: Path, limit: int = 1) -> int:
    """How many images a folder holds at any depth (counting stops at `limit`)."""
    found = 0
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_stray(d)]
        found += sum(1 for f in files if image_suffix(f))
        if found >= limit:
            break
    return found


def layout_from_dir(root: Path, caption_extension: str, resolution: tuple[int, int]) -> Layout:
    """The subsets of a train_data_dir: its `<repeats>_<concept>` folders."""
    layout = Layout(root=root, subsets=[], problems=[])
    for entry in sorted(root.iterdir()):
        name = entry.name
        if is_stray(name) or (entry.is_dir() and name.startswith(".")):
            layout.strays.append(entry)
            continue
        if entry.is_dir():
            parsed = parse_subset_folder(name)
            if parsed is None:
                has_images = images_below(entry) > 0
                layout.problems.append(problem(
                    "folder-no-repeats", entry,
                    f"'{name}' has no number before the first '_': kohya skips it"
                    + (" and every image in it" if has_images else ""),
                    severity="error" if has_images else "warning"))
                continue
            repeats, concept = parsed
            if repeats < 1:
                layout.problems.append(problem(
                    "folder-zero-repeats", entry, f"'{name}' has {repeats} repeats: kohya skips it"))
                continue
            if not concept:
                layout.problems.append(problem(
                    "folder-no-concept", entry, f"'{name}' has no concept after the repeats: the class token is empty"))
            layout.subsets.append(Subset(entry, repeats, concept, caption_extension=caption_extension,
                                         resolution=resolution))
        elif image_suffix(name):
            layout.problems.append(problem(
                "images-in-root", entry, "image in the dataset root: kohya reads only <repeats>_<concept> subfolders"))
    return layout


@dataclass
class SubsetFiles:
    """What one DreamBooth subset folder holds, sorted the way kohya would see it."""

    images: list[Path] = field(default_factory=list)
    captions: dict[str, Path] = field(default_factory=dict)  # image path without suffix -> caption
    other_captions: dict[str, Path] = field(default_factory=dict)  # the caption extension the run does not use
    nested: list[Path] = field(default_factory=list)
    ignored_images: list[Path] = field(default_factory=list)
    strays: list[Path] = field(default_factory=list)


def list_subset(subset: Subset) -> SubsetFiles:
    files = SubsetFiles()
    with os.scandir(subset.path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            name = entry.name
            stem, suffix = os.path.splitext(name)
            if is_stray(name):
                files.strays.append(path)
            elif entry.is_dir():
                files.nested.append(path)
            elif suffix in KOHYA_IMAGE_SUFFIXES:
                files.images.append(path)
            elif suffix == subset.caption_extension:
                files.captions[os.path.join(subset.path, stem)] = path
            elif suffix in CAPTION_EXTENSIONS:
                files.other_captions[os.path.join(subset.path, stem)] = path
            elif image_suffix(name):
                files.ignored_images.append(path)
            elif suffix.lower() not in _KOHYA_OWN_SUFFIXES:
                files.strays.append(path)
    return files
