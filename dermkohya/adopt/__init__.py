"""`dermkohya adopt`: a kohya user's existing configuration → runs/<name>.toml.

Sources, one reader each (the registry below): a kohya_ss GUI config (JSON, or TOML with the GUI's
keys), an sd-scripts `--config_file` TOML (+ its `--dataset_config`), or an `accelerate launch …
train_network.py --flags` command line (given inline or in a file). Every reader produces kohya's
own options (`source.Source`); `runfile` maps those onto the run file. The run file is written once:
adopt never replaces an existing one.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermkohya.adopt import gui, sd_scripts
from dermkohya.adopt.runfile import PATH_KEYS, Adopted, build
from dermkohya.adopt.source import Note, Source
from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic

__all__ = ["PATH_KEYS", "Adopted", "Note", "Source", "adopt", "read_source", "SOURCES"]


def _gui_json(path: Path, text: str, options: dict[str, Any]) -> Source:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DermkohyaError(f"{path}: not valid JSON: {exc} (is it a kohya_ss GUI config?)") from None
    if not isinstance(data, dict):
        raise DermkohyaError(f"{path}: a kohya_ss GUI config is a JSON object of settings")
    return gui.read(data, str(path))


def _toml(path: Path, text: str, options: dict[str, Any]) -> Source:
    data = sd_scripts.read_toml(path)
    if "datasets" in data or "general" in data and "subsets" in str(data):
        raise DermkohyaError(f"{path}: this is a dataset config (--dataset_config): adopt the training config that uses it, "
                             "with --dataset-config pointing here")
    if gui.MARKERS & data.keys():
        return gui.read(data, str(path))
    return sd_scripts.read_config(path, options.get("family"), options.get("dataset_config"))


def _command(path: Path, text: str, options: dict[str, Any]) -> Source:
    return sd_scripts.read_command(text, str(path), path.parent, options.get("dataset_config"))


# file suffix → reader; anything else is read as a command line (a shell script or a copied history line)
SOURCES: dict[str, Callable[[Path, str, dict[str, Any]], Source]] = {".json": _gui_json, ".toml": _toml}


def read_source(path: Path | None, command: str | None = None, **options: Any) -> Source:
    """The Source behind a file (by its suffix) or an inline command line."""
    if command is not None:
        return sd_scripts.read_command(command, "the command line (--command)", Path.cwd(), options.get("dataset_config"))
    if path is None:
        raise DermkohyaError("adopt needs a SOURCE file or --command \"accelerate launch ... train_network.py ...\"")
    if not path.is_file():
        raise DermkohyaError(f"{path}: not found: give a kohya_ss GUI config (.json/.toml), an sd-scripts config (.toml) "
                             "or a file holding the training command")
    text = path.read_text(encoding="utf-8")
    return SOURCES.get(path.suffix.lower(), _command)(path, text, options)


def _in_root(path: str | None, cwd: Path, root: Path) -> str | None:
    """A path typed relative to `cwd` as a run file holds it: relative to the project root when inside it."""
    if path is None or path.startswith("random:"):
        return path
    absolute = (cwd / Path(path).expanduser()).resolve()
    return absolute.relative_to(root.resolve()).as_posix() if absolute.is_relative_to(root.resolve()) else absolute.as_posix()


def adopt(source_path: Path | None, name: str, *, project_root: Path, command: str | None = None, base: str | None = None,
          train_data_dir: str | None = None, dataset_config: Path | None = None, family: str | None = None,
          cwd: Path | None = None) -> tuple[Path, Adopted]:
    """Write runs/<name>.toml from a kohya configuration; returns its path and the account of every key.

    `base` and `train_data_dir` are relative to `cwd` (the project root by default), as typed on a command line.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DermkohyaError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it names runs/<name>.toml and the LoRA)")
    target = project_root / "runs" / f"{name}.toml"
    if target.exists():
        raise DermkohyaError(f"{target} already exists: adopt never replaces a run file; choose another --name or move it away")
    source = read_source(source_path, command, family=family, dataset_config=dataset_config)
    if family and family != source.family and source.kind != "sd-scripts config":
        raise DermkohyaError(f"{source.path}: --family {family} contradicts the source, which trains {source.family}: drop --family")
    typed_in = cwd or project_root
    adopted = build(source, name=name, base=_in_root(base, typed_in, project_root),
                    train_data_dir=_in_root(train_data_dir, typed_in, project_root), root=project_root)
    tomllib.loads(adopted.text)  # a bug if this fails: the writer quotes through TOML's own writer
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, adopted.text)
    return target, adopted
