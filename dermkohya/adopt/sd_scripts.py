"""sd-scripts' own inputs → a Source: a `--config_file` TOML (+ its `--dataset_config`), or a command line.

Both are read as kohya reads them (`train_util.read_config_from_file`): the config's sections are
flattened into one namespace, and an option on the command line wins over the config's value. A
relative path is looked up beside the file that names it, then in the working folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from dermkohya.adopt.source import TRAINING_SCRIPTS, Source, parse_flags, split_words
from dermkohya.errors import DermkohyaError

# accelerate's options that take no value (everything else takes one).
ACCELERATE_FLAGS = frozenset({"multi_gpu", "cpu", "use_deepspeed", "use_fsdp", "dynamo_use_fullgraph", "dynamo_use_dynamic",
                              "debug", "quiet", "same_network"})


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DermkohyaError(f"{path}: not found: give the path of the file (relative to where you run adopt)") from None
    except tomllib.TOMLDecodeError as exc:
        raise DermkohyaError(f"{path}: not valid TOML: {exc} (fix the syntax at that line)") from None


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """Sections merged into one namespace, as kohya's read_config_from_file does."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def find(name: str, *folders: Path) -> Path:
    """A path as a file names it: absolute, or relative to one of `folders` (first that has it)."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    for folder in folders:
        if (folder / path).exists():
            return folder / path
    return folders[0] / path if folders else path


def read_config(path: Path, family: str | None, dataset_config: Path | None = None) -> Source:
    """An sd-scripts --config_file (and the dataset config it or the caller names)."""
    source = Source(path=str(path), kind="sd-scripts config", family=family or "sd15",
                    args=flatten(read_toml(path)))
    if family is None:
        source.note("family", "needs you", "an sd-scripts config does not name its script: sd15 (train_network.py) assumed; "
                    "pass --family sdxl for sdxl_train_network.py")
    _attach_dataset(source, dataset_config, path.parent)
    return source


def read_command(text: str, where: str, folder: Path, dataset_config: Path | None = None) -> Source:
    """`accelerate launch [opts] …/train_network.py --opts` (or `python …/train_network.py …`) → a Source."""
    words = split_words(text, where)
    at = next((i for i, w in enumerate(words) if Path(w).name in TRAINING_SCRIPTS), None)
    if at is None:
        scripts = [w for w in words if w.endswith(".py")]
        named = f" (it runs {scripts[0]})" if scripts else ""
        raise DermkohyaError(f"{where}: no {' or '.join(TRAINING_SCRIPTS)} in the command{named}: "
                             "dermkohya adopts LoRA training for SD 1.5 and SDXL")
    source = Source(path=where, kind="command line", family=TRAINING_SCRIPTS[Path(words[at]).name])
    source.launch = _accelerate_options(words[:at], where)
    given = parse_flags(words[at + 1:], f"{where} ({Path(words[at]).name}'s options)")
    if "config_file" in given:
        name = str(given["config_file"])
        config_path = find(name if name.endswith(".toml") else name + ".toml", folder, Path.cwd())
        source.args.update(flatten(read_toml(config_path)))
        source.note("config_file", "converted", f"{config_path}: its values read, the command line's win (as in kohya)")
    source.args.update(given)
    source.args.pop("config_file", None)
    _attach_dataset(source, dataset_config, folder)
    return source


def _accelerate_options(words: list[str], where: str) -> dict[str, Any]:
    """The launcher's own options (after `accelerate launch` or `-m accelerate.commands.launch`)."""
    options: dict[str, Any] = {}
    start = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
    i = start
    while i < len(words):
        key, eq, value = words[i].removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if eq:
            options[key] = value
        elif key in ACCELERATE_FLAGS or i + 1 >= len(words) or words[i + 1].startswith("--"):
            options[key] = True
        else:
            options[key] = words[i + 1]
            i += 1
        i += 1
    return options


def _attach_dataset(source: Source, explicit: Path | None, folder: Path) -> None:
    named = explicit or source.args.get("dataset_config")
    if not named:
        return
    path = explicit if explicit is not None else find(str(named), folder, Path.cwd())
    if explicit is None and not path.is_file():
        source.note("dataset_config", "needs you", f"{path} not found: its settings were not adopted; pass --dataset-config")
        return
    source.dataset = read_toml(path)
    source.dataset_path = str(path)
