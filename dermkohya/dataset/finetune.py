"""A fine-tuning subset's metadata file read the way kohya's FineTuningDataset reads it (library/train_util.py).

The file is JSON `{image key: {"caption": ..., "tags": ...}}` (or JSON Lines with "image_path"). kohya
opens `os.path.join(image_dir, key)` for a relative key and the key itself for an absolute one, exactly
as written: no extension is added, so a key without one (merge_captions_to_metadata.py's default) names
no file. The caption it trains on is the caption, then `caption_separator`, then the tags (with
`enable_wildcard`, the tags follow each caption line). Images in image_dir that no key names are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermkohya.dataset.layout import KOHYA_IMAGE_SUFFIXES, Subset
from dermkohya.dataset.problems import Problem, problem


@dataclass
class MetadataEntries:
    """What one fine-tuning subset trains on, and what is wrong with its metadata file."""

    images: list[Path] = field(default_factory=list)  # the images kohya will load, in key order
    captions: dict[Path, str] = field(default_factory=dict)  # image -> the caption kohya builds
    problems: list[Problem] = field(default_factory=list)
    data: bytes | None = None  # the metadata file's bytes, for the content hash


def _load(path: Path, data: bytes) -> dict[str, Any]:
    """kohya's reading: JSON Lines for a .jsonl name, JSON otherwise (ValueError for what it cannot read)."""
    text = data.decode("utf-8")
    if path.name.endswith(".jsonl"):
        entries: dict[str, Any] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
                    raise ValueError(f"line {number} has no \"image_path\"")
                entries[row["image_path"]] = {k: v for k, v in row.items() if k in ("caption", "tags")}
        return entries
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError("the top level is not an object of image keys")
    return loaded


def kohya_caption(entry: dict[str, Any], separator: str, wildcard: bool) -> str:
    """The caption kohya trains an entry on (FineTuningDataset: caption, separator, tags)."""
    caption = entry.get("caption") or ""
    tags = entry.get("tags")
    if wildcard:
        if tags is not None:
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
        return caption
    if tags:
        caption = caption + separator + tags if caption else tags
    return caption


def read_entries(subset: Subset) -> MetadataEntries:
    """The images and captions a fine-tuning subset gives kohya, with every defect of its metadata file."""
    assert subset.metadata_file is not None
    found = MetadataEntries()
    metadata = subset.metadata_file
    try:
        found.data = metadata.read_bytes()
        entries = _load(metadata, found.data)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        found.problems.append(problem("bad-metadata-file", metadata, f"kohya cannot read it: {exc}"))
        return found
    if not entries:
        found.problems.append(problem("empty-subset", metadata, "lists no images: kohya ignores the subset",
                                      fix="list the subset's images in the metadata file, or remove the subset"))
        return found
    image_dir = subset.image_dir
    missing_dir = image_dir is not None and not image_dir.is_dir()
    if missing_dir:
        found.problems.append(problem("not-found", image_dir, f"image_dir of {metadata.name} does not exist",  # type: ignore[arg-type]
                                      fix="fix image_dir in the dataset TOML"))
    for key in sorted(entries):
        entry = entries[key]
        bad = _bad_entry(entry)
        if bad:
            found.problems.append(problem("bad-metadata-file", metadata, f"key '{key}': {bad}"))
            continue
        if os.path.isabs(key):
            image = Path(key)
        elif image_dir is None:
            found.problems.append(problem(
                "bad-metadata-file", metadata, f"key '{key}' is relative and the subset has no image_dir: "
                "kohya stops", fix="set image_dir in the dataset TOML, or use absolute keys"))
            continue
        elif missing_dir:
            continue
        else:
            image = image_dir / key
        if not image.is_file():
            found.problems.append(problem("metadata-key-no-image", metadata, _missing_message(key, image)))
            continue
        found.images.append(image)
        caption = kohya_caption(entry, subset.caption_separator, subset.enable_wildcard)
        found.captions[image] = caption
        if not caption.strip():
            found.problems.append(problem(
                "empty-caption", metadata, f"key '{key}' has no caption and no tags: kohya trains it on an empty caption",
                fix="write a \"caption\" (or \"tags\") for the key in the metadata file"))
    if image_dir is not None and not missing_dir:
        listed = set(found.images)
        for name in sorted(os.listdir(image_dir)):
            path = image_dir / name
            if os.path.splitext(name)[1] in KOHYA_IMAGE_SUFFIXES and path not in listed and path.is_file():
                found.problems.append(problem("image-not-in-metadata", path, f"is not a key of {metadata.name}: "
                                              "kohya does not train it"))
    return found


def _bad_entry(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object with \"caption\" / \"tags\""
    for name in ("caption", "tags"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            return f"\"{name}\" is {type(entry[name]).__name__}, not text"
    return None


def _missing_message(key: str, image: Path) -> str:
    message = f"key '{key}': kohya opens {image}, which does not exist"
    if not os.path.splitext(key)[1]:
        near = [image.with_name(image.name + s).name for s in sorted(KOHYA_IMAGE_SUFFIXES)
                if image.with_name(image.name + s).is_file()]
        if near:
            message += f" (kohya adds no extension: the key should be '{key}{os.path.splitext(near[0])[1]}')"
    return message
