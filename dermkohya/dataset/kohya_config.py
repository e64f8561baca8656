"""A kohya `--dataset_config` TOML read the way sd-scripts reads it (library/config_util.py).

Options "ascend": a subset's value, else its dataset's, else [general]'s. A dataset is DreamBooth-style
when none of its subsets has `metadata_file`, fine-tuning when all have it, and kohya rejects a mix;
ControlNet subsets (`conditioning_data_dir`) are named as unchecked. Relative paths are taken from the
working directory as kohya does, falling back to the TOML's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from dermkohya.dataset.layout import Layout, Subset
from dermkohya.dataset.problems import problem
from dermkohya.errors import DermkohyaError


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


def _resolve(value: str, config: Path, *, folder: bool) -> Path:
    """kohya opens relative paths from the working directory; a path that only exists beside the TOML
    is taken from there (a config written next to its data)."""
    path = Path(value)
    exists = Path.is_dir if folder else Path.is_file
    if not path.is_absolute() and not exists(path) and exists(config.parent / path):
        return config.parent / path
    return path


def layout_from_config(config: Path, caption_extension: str, resolution: tuple[int, int]) -> Layout:
    """Every subset of every dataset in the TOML, DreamBooth-style and fine-tuning alike."""
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DermkohyaError(f"{config}: not a valid TOML file ({exc}); fix the syntax") from exc
    layout = Layout(root=config.parent, subsets=[], problems=[])
    general = data.get("general", {})
    for i, dataset in enumerate(data.get("datasets", [])):
        try:
            ds_resolution = _resolution_value(_ascend("resolution", dataset, general)) or resolution
        except ValueError as exc:
            layout.problems.append(problem("bad-config", config, f"[[datasets]] #{i + 1}: {exc}"))
            ds_resolution = resolution
        subsets = dataset.get("subsets", [])
        fine_tuning = ["metadata_file" in s for s in subsets]
        if any(fine_tuning) and not all(fine_tuning):
            layout.problems.append(problem(
                "bad-config", config, f"[[datasets]] #{i + 1} mixes DreamBooth subsets (image_dir only) and "
                "fine-tuning subsets (metadata_file): kohya rejects the config",
                fix="put the fine-tuning subsets in a [[datasets]] of their own"))
        for j, subset in enumerate(subsets):
            where = f"[[datasets]] #{i + 1}, [[datasets.subsets]] #{j + 1}"
            levels = (subset, dataset, general)
            if "conditioning_data_dir" in subset:
                layout.problems.append(problem(
                    "unsupported-subset", config, f"{where} is a ControlNet subset (conditioning_data_dir): "
                    "its images and conditioning images are not checked, counted or hashed"))
                continue
            repeats = _ascend("num_repeats", *levels)
            repeats = 1 if repeats is None else repeats
            if not isinstance(repeats, int) or repeats < 1:
                layout.problems.append(problem("folder-zero-repeats", config,
                                               f"{where} has num_repeats = {repeats!r}: kohya skips it"))
                continue
            if "metadata_file" in subset:
                found = _fine_tuning_subset(subset, levels, config, where, layout)
            else:
                found = _dreambooth_subset(subset, levels, config, where, layout, caption_extension)
            if found is not None:
                found.repeats, found.resolution = repeats, ds_resolution
                layout.subsets.append(found)
    return layout


def _dreambooth_subset(subset: dict[str, Any], levels: tuple[dict[str, Any], ...], config: Path, where: str,
                       layout: Layout, caption_extension: str) -> Subset | None:
    image_dir = subset.get("image_dir")
    if not isinstance(image_dir, str):
        layout.problems.append(problem("bad-config", config, f"{where} has no image_dir",
                                       fix="add image_dir = \"<folder of images>\""))
        return None
    path = _resolve(image_dir, config, folder=True)
    extension = _ascend("caption_extension", *levels)
    if extension is None:
        layout.problems.append(problem(
            "caption-extension-unset", config,
            f"{where}: kohya falls back to --caption_extension; checking with {caption_extension}"))
        extension = caption_extension
    if not path.is_dir():
        layout.problems.append(problem("not-found", path, f"{where}: image_dir does not exist",
                                       fix=f"fix image_dir in {config.name}"))
        return None
    return Subset(path, 1, str(_ascend("class_tokens", *levels) or ""), caption_extension=str(extension),
                  is_reg=bool(subset.get("is_reg", False)), enable_wildcard=bool(_ascend("enable_wildcard", *levels)))


def _fine_tuning_subset(subset: dict[str, Any], levels: tuple[dict[str, Any], ...], config: Path, where: str,
                        layout: Layout) -> Subset | None:
    metadata_file, image_dir = subset.get("metadata_file"), subset.get("image_dir")
    if not isinstance(metadata_file, str) or not (image_dir is None or isinstance(image_dir, str)):
        layout.problems.append(problem("bad-config", config, f"{where}: metadata_file and image_dir must be strings"))
        return None
    if "is_reg" in subset:
        layout.problems.append(problem(
            "bad-config", config, f"{where}: is_reg is not allowed in a fine-tuning subset (kohya rejects the key)",
            fix="remove is_reg, or make the subset DreamBooth-style (image_dir and caption files, no metadata_file)"))
    metadata = _resolve(metadata_file, config, folder=False)
    folder = _resolve(image_dir, config, folder=True) if image_dir is not None else None
    if not metadata.is_file():
        layout.problems.append(problem("not-found", metadata, f"{where}: metadata_file does not exist "
                                       "(kohya stops with 'no metadata')", fix=f"fix metadata_file in {config.name}"))
        return None
    separator = _ascend("caption_separator", *levels)
    return Subset(folder or metadata.parent, 1, "", kind="fine-tuning", metadata_file=metadata, image_dir=folder,
                  caption_separator="," if separator is None else str(separator),
                  enable_wildcard=bool(_ascend("enable_wildcard", *levels)))
