"""TOML file → validated pydantic model, reporting every problem at once (run files and plans).

Unknown keys name the nearest valid key; every message names the `[section] key`, its line where it
has one, and what to change. The models themselves live with their stage (spec.py, generate/plan.py).
"""

from __future__ import annotations

import difflib
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dermkohya.errors import DermkohyaError, ProblemsError

Model = TypeVar("Model", bound=BaseModel)


def load_toml_model(path: Path, model: type[Model], *, what: str, example: str) -> Model:
    """Read and validate `path`; `what` names the file kind ("run file"), `example` the one to copy."""
    if not path.is_file():
        raise DermkohyaError(f"{path}: {what} not found (copy {example} and edit it)")
    data = path.read_bytes()
    try:  # a byte-order mark (Windows editors) is not part of the TOML
        text = data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DermkohyaError(
            f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at line {line}): save it as UTF-8"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DermkohyaError(f"{path}: not valid TOML: {exc} (fix the syntax at that line)") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ProblemsError(str(path), [describe(err, text, model, what) for err in exc.errors()]) from None


def model_at(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The schema class that holds the key at `loc` (list indices skipped), for 'did you mean'."""
    model = root
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        inner = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if inner is None:
            return None
        model = inner
    return model


def describe(err: Any, text: str, root: type[BaseModel], what: str) -> str:
    """One line per problem: where (`[section] key`, line N), what, and the fix."""
    loc = [str(p) for p in err["loc"]]
    key = loc[-1] if loc else ""
    section = " ".join(p if not p.isdigit() else f"#{int(p) + 1}" for p in loc[:-1])
    where = f"[{section}] {key}" if section else key or "(top level)"
    # `key = …`, or a dotted `section.key = …` (a sweep's `network.dim = [8, 16]`)
    line = next((i for i, row in enumerate(text.splitlines(), 1)
                 if re.match(rf"\s*(?:[\w-]+\.)*{re.escape(key)}\s*=", row)), None)
    at = f" (line {line})" if line and key and not key.isdigit() else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model = model_at(root, loc[:-1])
        valid = list(model.model_fields) if model else []
        near = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean `{near[0]}`?" if near else f"valid keys: {', '.join(valid)}"
        return f"unknown key `{where}`{at}: {hint}"
    if err["type"] == "missing":
        return f"missing key `{where}`: add it to the {what}"
    if err["type"] == "value_error":
        return f"`{where}`{at}: {msg}" if key else msg
    return f"`{where}`{at}: {msg} (got {err.get('input')!r})"
