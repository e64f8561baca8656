"""Public dermatology metadata layouts → one kind of record (image, diagnosis, skin type, source, licence).

Users bring the CSV and the image folder they downloaded; nothing here touches the network. Each layout is
one module of this package (fitzpatrick17k, ddi, isic, pad_ufes_20, scin, ham10000, generic), found and
imported here without a list, that keeps its own quirks in one small reading function and registers itself
in `FORMATS` with its display name, licence and `label` choices (base.py). Every problem in a file is collected and reported at once, naming
the line and the column, so a user fixes the CSV in one pass.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

from dermkohya.importers.base import (
    ANY, FORMATS, GROUPED, IMAGE_EXTENSIONS, SINGLE, Format, ImageFinder, ImportResult, Record, Rows, SourceOptions,
    Table, read_table, register,
)
from dermkohya.names import slug

__all__ = [
    "ANY", "DISPLAY_NAMES", "FORMATS", "GROUPED", "IMAGE_EXTENSIONS", "IMPORTERS", "LABEL_CHOICES", "LICENCES", "SINGLE",
    "Format", "ImageFinder", "ImportResult", "Record", "Rows", "SourceOptions", "Table", "load_records", "read_table",
    "register", "slug",
]

# Every module of this package but base.py is a format that registers itself on import: a new layout is
# one new file, found here without another edit.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

# Views of the registry under their old names, for callers that index by format.
IMPORTERS = {name: f.read for name, f in FORMATS.items()}
LICENCES = {name: f.licence for name, f in FORMATS.items()}
DISPLAY_NAMES = {name: f.display_name for name, f in FORMATS.items()}
LABEL_CHOICES = {name: f.labels for name, f in FORMATS.items() if f.labels}


def load_records(options: SourceOptions) -> ImportResult:
    """Every record of the metadata file, or every problem with it (the caller raises them together)."""
    table = read_table(options.metadata)
    result = ImportResult()
    result.problems.extend(table.ragged)
    if not table.rows:
        result.problems.append(f"{table.path.name}: no rows below the header")
        return result
    FORMATS[options.format].read(table, Rows(table, options, result))
    result.problems.extend(_duplicates(table, result.records))
    return result


def _duplicates(table: Table, records: list[Record]) -> Iterator[str]:
    """Two rows naming one image would train it twice and could land it on both sides of the split."""
    first: dict[Path, int] = {}
    for record in records:
        key = record.image.resolve()
        if key in first:
            yield (f"{table.path.name} line {record.line}: image `{record.image.name}` is already listed on line "
                   f"{first[key]}; remove the duplicate row")
        else:
            first[key] = record.line
