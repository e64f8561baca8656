"""Typed, versioned records between stages: every JSON file one stage writes and another reads.

A record is a pydantic model with a `format` field ("dermkohya.<kind>/<version>"). It is written only
through `Record.write` (atomic, sorted keys, trailing newline: the bytes are stable and diffable) and
read only through `Record.read`, which names the file and the fix when the file is missing, is not
JSON, is another kind of record, or was written by an older or newer dermkohya. Stages never read each
other's files as dicts.

Subclasses set `KIND` and `VERSION`; fields are declared as usual. Extra keys are refused on read, so a
key nothing writes cannot be read by accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic


class RecordError(DermkohyaError):
    """A record file that cannot be read as the record it should be."""


class Record(BaseModel):
    """Base of every stage-to-stage JSON record."""

    model_config = ConfigDict(extra="forbid")

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    # What re-creates the file (shown when an old or foreign file is found), e.g. "dermkohya render RUN".
    REMEDY: ClassVar[str] = "re-run the command that wrote it"

    format: str = ""

    @classmethod
    def format_id(cls) -> str:
        return f"dermkohya.{cls.KIND}/{cls.VERSION}"

    @model_validator(mode="before")
    @classmethod
    def _stamp(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("format"):
            data = {**data, "format": cls.format_id()}
        return data

    @model_validator(mode="after")
    def _same_format(self) -> Self:
        expected = self.format_id()
        if self.format != expected:
            raise ValueError(f"format is {self.format!r}, expected {expected!r}")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def write(self, path: Path) -> Path:
        path = Path(path)
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> Self:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecordError(f"{path}: not found ({cls.REMEDY})") from None
        except UnicodeDecodeError:
            raise RecordError(f"{path}: not UTF-8 text ({cls.REMEDY})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not valid JSON ({exc}; {cls.REMEDY})") from None
        return cls.from_data(raw, source=path)

    @classmethod
    def from_data(cls, raw: Any, *, source: Path | str = "<data>") -> Self:
        if not isinstance(raw, dict):
            raise RecordError(f"{source}: not a {cls.KIND} record ({cls.REMEDY})")
        found = raw.get("format")
        expected = cls.format_id()
        if found != expected:
            kind = str(found or "").removeprefix("dermkohya.").split("/")[0]
            if kind == cls.KIND:
                raise RecordError(
                    f"{source}: written as {found}, this dermkohya reads {expected} ({cls.REMEDY} "
                    "with this version; the old file is left as it is)"
                )
            what = f"a {kind} record" if kind else "an unversioned or foreign file"
            raise RecordError(f"{source}: {what}, not a {cls.KIND} record ({expected}; {cls.REMEDY})")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise RecordError(f"{source}: not a valid {cls.KIND} record: {problems} ({cls.REMEDY})") from None
