"""What every importer shares: the record each layout becomes, a CSV reader that keeps line numbers, the
image finder, the row walker that collects problems, and the registry of formats.

A format is one module in this package that registers a reading function with its display name, its
licence line and its `label` choices (`@register(...)`); `prepare`'s recipe, its messages and
`prepared.json` read all of that from `FORMATS`, so a new layout is one file plus its test.
"""

from __future__ import annotations

import csv
import difflib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dermkohya.errors import DermkohyaError
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN, parse_fst

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Which skin-type codes a layout may contain: a value outside them is a malformed row, not a new type.
SINGLE = frozenset(FST_TYPES) | {UNKNOWN}
GROUPED = frozenset(FST_GROUPS) | {UNKNOWN}
ANY = SINGLE | GROUPED

@dataclass(frozen=True)
class Record:
    """One image as every later stage sees it, whatever layout it came from."""

    image: Path
    diagnosis: str
    fst: str
    source: str
    licence: str
    group: str  # images of one patient/lesion/case: they stay on the same side of the held-out split
    line: int  # the CSV line it came from, for messages


@dataclass
class ImportResult:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceOptions:
    """The recipe's [source] table, as the importers need it (paths already resolved)."""

    format: str
    metadata: Path
    images: Path
    labels: Path | None = None
    label: str | None = None
    licence: str | None = None
    columns: dict[str, str | None] = field(default_factory=dict)
    missing_images: str = "error"


# --- reading a CSV with line numbers --------------------------------------------------------------


@dataclass
class Table:
    path: Path
    header: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (line number, column → stripped value)
    ragged: list[str] = field(default_factory=list)  # rows whose field count differs from the header's

    def where(self, line: int, column: str) -> str:
        return f"{self.path.name} line {line}, column `{column}`"

    def missing(self, columns: list[str]) -> list[str]:
        """One problem per required column the file lacks, with the nearest column it has."""
        problems = []
        for column in columns:
            if column in self.header:
                continue
            near = difflib.get_close_matches(column, self.header, n=1, cutoff=0.6)
            hint = f" (did you mean `{near[0]}`?)" if near else f"; the file has: {', '.join(self.header)}"
            problems.append(f"{self.path.name}: missing column `{column}`{hint}")
        return problems


def read_table(path: Path) -> Table:
    """Reads a CSV keeping each row's line number (a quoted field may span lines)."""
    if not path.is_file():
        raise DermkohyaError(f"{path}: metadata file not found; fix the path in the recipe's [source] table")
    table = Table(path, [], [])
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        start = 1
        try:
            table.header = [h.strip() for h in next(reader, [])]
            if not table.header:
                raise DermkohyaError(f"{path}: the file is empty; it needs a header row and one row per image")
            start = reader.line_num + 1
            for values in reader:
                if any(v.strip() for v in values):
                    if len(values) != len(table.header):
                        table.ragged.append(f"{path.name} line {start}: {len(values)} fields, "
                                            f"the header has {len(table.header)}")
                    padded = values + [""] * (len(table.header) - len(values))
                    table.rows.append((start, {h: v.strip() for h, v in zip(table.header, padded)}))
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DermkohyaError(f"{path} line {start}: not a readable UTF-8 CSV ({exc})") from None
    return table


# --- finding image files ---------------------------------------------------------------------------


class ImageFinder:
    """Resolves the image a row names: as given, with a usual extension, or by file name anywhere below
    the image folder (PAD-UFES-20 and HAM10000 ship their images split over part folders)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, name: str, extensions: tuple[str, ...] = ()) -> Path | str:
        """The file, or a sentence saying why not."""
        candidates = [name] + [name + ext for ext in extensions if not name.lower().endswith(ext)]
        for candidate in candidates:
            path = self.root / candidate
            if path.is_file():
                return path
        index = self._index()
        for candidate in candidates:
            hits = index.get(Path(candidate).name.lower(), [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                shown = ", ".join(str(h.relative_to(self.root)) for h in hits[:3])
                return f"`{name}` matches several files below {self.root} ({shown}); give the path relative to it"
        tried = f" (also tried {', '.join(extensions)})" if extensions else ""
        return f"image `{name}` not found in {self.root}{tried}"

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            if self.root.is_dir():
                for path in sorted(self.root.rglob("*")):
                    if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                        self._by_name.setdefault(path.name.lower(), []).append(path)
        return self._by_name


@dataclass(frozen=True)
class Format:
    """One source layout: how it reads, what it is called, its licence, which columns `label` may name
    (the first is the default)."""

    name: str
    read: Callable[[Table, "Rows"], None]
    display_name: str
    licence: str
    labels: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {}


def register(name: str, *, display_name: str, licence: str,
             labels: tuple[str, ...] = ()) -> Callable[[Callable[[Table, "Rows"], None]], Callable[[Table, "Rows"], None]]:
    """Adds a layout's reading function to FORMATS under `name` (the recipe's `source.format`)."""

    def add(read: Callable[[Table, Rows], None]) -> Callable[[Table, Rows], None]:
        if name in FORMATS:
            raise ValueError(f"importer {name!r} is registered twice")
        FORMATS[name] = Format(name, read, display_name, licence, labels)
        return read

    return add


class Rows:
    """Walks a table's rows and collects problems, so each layout function stays a few lines."""

    def __init__(self, table: Table, options: SourceOptions, result: ImportResult) -> None:
        self.table, self.options, self.result = table, options, result
        self.finder = ImageFinder(options.images)
        self.licence = options.licence or FORMATS[options.format].licence

    def fst(self, line: int, row: dict[str, str], column: str | None, allowed: frozenset[str], expected: str) -> str | None:
        if column is None:
            return UNKNOWN
        raw = row.get(column, "")
        value = UNKNOWN if raw.strip().lower() in {"unk", "none_identified", "not_stated"} else parse_fst(raw)
        if value is None or value not in allowed:
            self.result.problems.append(f"{self.table.where(line, column)}: `{raw}` is not a skin-type code; expected {expected}")
            return None
        return value

    def image(self, line: int, column: str, name: str, extensions: tuple[str, ...] = ()) -> Path | None:
        if not name:
            self.result.problems.append(f"{self.table.where(line, column)}: empty; it must name the image file")
            return None
        found = Path(name) if Path(name).is_absolute() else self.finder.find(name, extensions)
        if isinstance(found, Path) and found.is_file():
            return found
        message = found if isinstance(found, str) else f"image `{name}` not found"
        if self.options.missing_images == "skip":
            self.result.skipped["image file missing"] += 1
        else:
            self.result.problems.append(f"{self.table.where(line, column)}: {message} "
                                        "(or set `source.missing_images = \"skip\"` to leave such rows out)")
        return None

    def add(self, line: int, image: Path | None, diagnosis: str, fst: str | None, group: str, licence: str | None = None) -> None:
        if image is None or fst is None or not diagnosis:
            return
        self.result.records.append(Record(image, diagnosis, fst, FORMATS[self.options.format].display_name,
                                          licence or self.licence, group, line))

    def diagnosis(self, line: int, row: dict[str, str], column: str) -> str:
        value = row.get(column, "")
        if not value:
            self.result.problems.append(f"{self.table.where(line, column)}: empty; every row needs a diagnosis")
        return value


def missing(table: Table, rows: Rows, columns: list[str]) -> bool:
    """Records the columns the table lacks; True when any is missing (the layout then reads no rows)."""
    problems = table.missing(columns)
    rows.result.problems.extend(problems)
    return bool(problems)
