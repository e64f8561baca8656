"""What every source reader hands the run-file writer: kohya's own option names with kohya's values.

Each reader (GUI config, sd-scripts config, command line) turns its format into one `Source`: the
options exactly as sd-scripts' parser would hold them (`--config_file` and the command line merged, the
command line winning), accelerate's options apart, and a note for every key it converted or dropped.
The run-file writer then needs to know only kohya's names, never a format's quirks.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from dermkohya.errors import DermkohyaError

NoteKind = Literal["converted", "dropped", "needs you", "dermkohya"]

# sd-scripts' options that take several values (nargs="*"), and the type of each value.
LIST_OPTIONS: dict[str, type] = {
    "network_args": str, "optimizer_args": str, "lr_scheduler_args": str, "base_weights": str,
    "text_encoder_lr": float, "base_weights_multiplier": float,
}
# Options whose values are strings even where they look like numbers.
STRING_OPTIONS = frozenset({"resolution", "face_crop_aug_range", "training_comment", "output_name", "caption_prefix",
                            "caption_suffix", "log_prefix", "wandb_run_name", "huggingface_path_in_repo"})
TRAINING_SCRIPTS: dict[str, str] = {"train_network.py": "sd15", "sdxl_train_network.py": "sdxl"}


@dataclass(frozen=True)
class Note:
    """One line of the adopted run file's account: a key, what happened to it, and why."""

    key: str
    kind: NoteKind
    text: str

    def __str__(self) -> str:
        return f"{self.key}: {self.kind} — {self.text}"


@dataclass
class Source:
    """A kohya training configuration, whatever format it came in."""

    path: str  # for messages: the file, or "the command line"
    kind: str  # the format's name, for the run file's header
    family: str = "sd15"
    args: dict[str, Any] = field(default_factory=dict)  # sd-scripts option → value, as kohya's parser holds it
    launch: dict[str, Any] = field(default_factory=dict)  # accelerate option → value
    dataset: dict[str, Any] | None = None  # the --dataset_config TOML, parsed
    dataset_path: str | None = None
    notes: list[Note] = field(default_factory=list)

    def note(self, key: str, kind: NoteKind, text: str) -> None:
        self.notes.append(Note(key, kind, text))


def scalar(text: str) -> Any:
    """A command-line word as kohya's parser would type it: int, float, or the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_words(text: str, where: str) -> list[str]:
    """A shell command line (backslash-newline continuations allowed) → argv words."""
    try:
        return shlex.split(text.replace("\\\n", " ").replace("\\\r\n", " "), comments=True)
    except ValueError as exc:
        raise DermkohyaError(f"{where}: cannot split the command line ({exc}): check its quotes") from None


def parse_flags(words: list[str], where: str) -> dict[str, Any]:
    """`--key value`, `--key=value`, `--flag`, `--list a b c` → {key: value}, typed as kohya's parser would.

    A bare flag is True; an option in LIST_OPTIONS keeps a list; the last occurrence of a key wins,
    as in argparse.
    """
    values: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise DermkohyaError(f"{where}: `{word}` is not an option (`--name value`): remove it or quote it with its option")
        key, eq, inline = word[2:].partition("=")
        key = key.replace("-", "_")
        given = [inline] if eq else []
        i += 1
        while not eq and i < len(words) and not (words[i].startswith("--") and len(words[i]) > 2):
            given.append(words[i])
            i += 1
        values[key] = typed(key, given)
    return values


def typed(key: str, given: list[str]) -> Any:
    """The value kohya's parser gives `key` for these words."""
    if key in LIST_OPTIONS:
        item = LIST_OPTIONS[key]
        return [item(g) for g in given]
    if not given:
        return True
    text = " ".join(given)
    if key in STRING_OPTIONS:
        return text
    if key in {"lr_warmup_steps", "lr_decay_steps"}:  # kohya's int_or_float: "5%" and 0.05 are fractions of the steps
        return float(text[:-1]) / 100 if text.endswith("%") else scalar(text)
    return scalar(text)
