"""Public dermatology metadata layouts → one kind of record (image, diagnosis, skin type, source, licence).

Users bring the CSV and the image folder they downloaded; nothing here touches the network. Each layout
keeps its own quirks (DDI's grouped skin tones, PAD-UFES-20's misspelt `fitspatrick`, SCIN's two files and
up to three images per case) in one small function, and every problem in a file is collected and reported
at once, naming the line and the column, so a user fixes the CSV in one pass.
"""

from __future__ import annotations

import ast
import csv
import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dermkohya.errors import DermkohyaError
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN, parse_fst

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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


# --- the layouts -------------------------------------------------------------------------------------

HAM10000_NAMES = {
    "akiec": "actinic keratosis or intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
PAD_UFES_NAMES = {
    "ACK": "actinic keratosis",
    "BCC": "basal cell carcinoma",
    "MEL": "melanoma",
    "NEV": "nevus",
    "SCC": "squamous cell carcinoma",
    "SEK": "seborrheic keratosis",
}
LICENCES = {
    "fitzpatrick17k": "Fitzpatrick17k (Groh et al. 2021): annotations CC BY-NC-SA 3.0; images under the terms of "
    "their source atlases (DermaAmin, Atlas Dermatologico)",
    "ddi": "DDI (Daneshjou et al. 2022): Stanford AIMI research use agreement, non-commercial",
    "isic": "ISIC Archive: the licence stated for each image",
    "pad_ufes_20": "PAD-UFES-20 (Pacheco et al. 2020): CC BY 4.0",
    "scin": "SCIN (Google Research, 2024): the dataset's own data use terms",
    "ham10000": "HAM10000 (Tschandl et al. 2018): CC BY-NC 4.0",
    "generic": "not stated: set `source.licence` in the recipe",
}
DISPLAY_NAMES = {
    "fitzpatrick17k": "Fitzpatrick17k", "ddi": "DDI", "isic": "ISIC", "pad_ufes_20": "PAD-UFES-20",
    "scin": "SCIN", "ham10000": "HAM10000", "generic": "generic CSV",
}
# Which skin-type codes each layout may contain: a value outside them is a malformed row, not a new type.
_SINGLE = frozenset(FST_TYPES) | {UNKNOWN}
_GROUPED = frozenset(FST_GROUPS) | {UNKNOWN}
_ANY = _SINGLE | _GROUPED

# `label` choices per layout (which column names the diagnosis); the first is the default.
LABEL_CHOICES: dict[str, tuple[str, ...]] = {
    "fitzpatrick17k": ("label", "nine_partition_label", "three_partition_label"),
    "ddi": ("disease", "malignant"),
    "isic": ("diagnosis_3", "diagnosis_1", "diagnosis_2", "diagnosis_4", "diagnosis_5"),
}


class _Rows:
    """Walks a table's rows and collects problems, so each layout function stays a few lines."""

    def __init__(self, table: Table, options: SourceOptions, result: ImportResult) -> None:
        self.table, self.options, self.result = table, options, result
        self.finder = ImageFinder(options.images)
        self.licence = options.licence or LICENCES[options.format]

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
        self.result.records.append(Record(image, diagnosis, fst, DISPLAY_NAMES[self.options.format],
                                          licence or self.licence, group, line))

    def diagnosis(self, line: int, row: dict[str, str], column: str) -> str:
        value = row.get(column, "")
        if not value:
            self.result.problems.append(f"{self.table.where(line, column)}: empty; every row needs a diagnosis")
        return value


def _fitzpatrick17k(table: Table, rows: _Rows) -> None:
    label = rows.options.label or "label"
    if _missing(table, rows, ["md5hash", "fitzpatrick_scale", label]):
        return
    for line, row in table.rows:
        image = rows.image(line, "md5hash", row["md5hash"], (".jpg", ".jpeg", ".png"))
        fst = rows.fst(line, row, "fitzpatrick_scale", _SINGLE, "1–6, or -1 for unknown")
        rows.add(line, image, rows.diagnosis(line, row, label), fst, row["md5hash"])


def _ddi(table: Table, rows: _Rows) -> None:
    label = rows.options.label or "disease"
    if _missing(table, rows, ["DDI_file", "skin_tone", label]):
        return
    for line, row in table.rows:
        image = rows.image(line, "DDI_file", row["DDI_file"])
        fst = rows.fst(line, row, "skin_tone", _GROUPED, "12, 34 or 56 (DDI records grouped skin tones)")
        if label == "malignant":
            flag = row["malignant"].strip().lower()
            if flag not in {"true", "false", "1", "0"}:
                rows.result.problems.append(f"{table.where(line, 'malignant')}: `{row['malignant']}` is not True or False")
                continue
            diagnosis = "malignant" if flag in {"true", "1"} else "benign"
        else:
            diagnosis = rows.diagnosis(line, row, label).replace("-", " ")
        rows.add(line, image, diagnosis, fst, row.get("DDI_ID") or row["DDI_file"])


def _isic(table: Table, rows: _Rows) -> None:
    label = rows.options.label or "diagnosis_3"
    if _missing(table, rows, ["isic_id", "diagnosis_1"]):
        return
    fst_column = "fitzpatrick_skin_type" if "fitzpatrick_skin_type" in table.header else None
    if fst_column is None:
        rows.result.notes.append(f"{table.path.name} has no `fitzpatrick_skin_type` column: every skin type is unknown")
    # The chosen level, else the deepest level above it that is filled (many images only have diagnosis_1).
    level = int(label.rsplit("_", 1)[1])
    levels = [f"diagnosis_{i}" for i in range(level, 0, -1) if f"diagnosis_{i}" in table.header]
    for line, row in table.rows:
        image = rows.image(line, "isic_id", row["isic_id"], (".jpg", ".jpeg", ".png"))
        fst = rows.fst(line, row, fst_column, _SINGLE, "I–VI, or empty for unknown")
        diagnosis = next((row[c] for c in levels if row.get(c)), "")
        if not diagnosis:
            rows.result.problems.append(f"{table.where(line, 'diagnosis_1')}: empty; every row needs a diagnosis")
        licence = row.get("copyright_license")
        if licence:
            licence = f"ISIC Archive: {licence}" + (f", {row['attribution']}" if row.get("attribution") else "")
        rows.add(line, image, diagnosis, fst, row.get("lesion_id") or row["isic_id"], licence)


def _pad_ufes_20(table: Table, rows: _Rows) -> None:
    if _missing(table, rows, ["img_id", "diagnostic", "fitspatrick"]):
        return
    for line, row in table.rows:
        image = rows.image(line, "img_id", row["img_id"])
        fst = rows.fst(line, row, "fitspatrick", _SINGLE, "1–6, or empty for unknown")
        code = row["diagnostic"]
        if code not in PAD_UFES_NAMES:
            rows.result.problems.append(f"{table.where(line, 'diagnostic')}: `{code}` is not one of "
                                        f"{', '.join(PAD_UFES_NAMES)}")
            continue
        rows.add(line, image, PAD_UFES_NAMES[code], fst, row.get("lesion_id") or row["img_id"])


def _ham10000(table: Table, rows: _Rows) -> None:
    if _missing(table, rows, ["image_id", "dx"]):
        return
    rows.result.notes.append("HAM10000 records no skin type: every image is of unknown skin type")
    for line, row in table.rows:
        image = rows.image(line, "image_id", row["image_id"], (".jpg", ".jpeg", ".png"))
        code = row["dx"]
        if code not in HAM10000_NAMES:
            rows.result.problems.append(f"{table.where(line, 'dx')}: `{code}` is not one of {', '.join(HAM10000_NAMES)}")
            continue
        rows.add(line, image, HAM10000_NAMES[code], UNKNOWN, row.get("lesion_id") or row["image_id"])


def _scin(table: Table, rows: _Rows) -> None:
    if _missing(table, rows, ["case_id", "image_1_path", "fitzpatrick_skin_type"]):
        return
    labels = _scin_labels(table, rows)
    if labels is None:
        return
    image_columns = [c for c in ("image_1_path", "image_2_path", "image_3_path") if c in table.header]
    for line, row in table.rows:
        fst = rows.fst(line, row, "fitzpatrick_skin_type", _SINGLE, "FST1–FST6, or empty/NONE_IDENTIFIED for unknown")
        diagnosis = labels.get(row["case_id"], "")
        if not diagnosis:
            rows.result.skipped["SCIN case without a dermatologist label"] += sum(1 for c in image_columns if row[c])
            continue
        for column in image_columns:
            if row[column]:
                rows.add(line, rows.image(line, column, row[column]), diagnosis, fst, row["case_id"])


def _scin_labels(table: Table, rows: _Rows) -> dict[str, str] | None:
    """case_id → the condition dermatologists weighted highest (ties: first listed), from the labels file
    SCIN ships separately, or from the cases file when the two were merged."""
    source = read_table(rows.options.labels) if rows.options.labels else table
    label_columns = ["weighted_skin_condition_label", "dermatologist_skin_condition_on_label_name"]
    present = [c for c in label_columns if c in source.header]
    if "case_id" not in source.header or not present:
        hint = "" if rows.options.labels else " (set `source.labels` to SCIN's scin_labels.csv)"
        rows.result.problems.append(f"{source.path.name}: needs `case_id` and `weighted_skin_condition_label` or "
                                    f"`dermatologist_skin_condition_on_label_name`{hint}")
        return None
    labels: dict[str, str] = {}
    for line, row in source.rows:
        for column in present:
            text = row[column]
            if not text:
                continue
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                rows.result.problems.append(f"{source.where(line, column)}: `{text[:60]}` is not a Python-style list/dict")
                break
            if isinstance(value, dict) and value:
                labels[row["case_id"]] = max(value.items(), key=lambda kv: float(kv[1]))[0]
                break
            if isinstance(value, list) and value:
                labels[row["case_id"]] = str(value[0])
                break
    return labels


def _generic(table: Table, rows: _Rows) -> None:
    columns = {"image": "image", "diagnosis": "diagnosis", "fitzpatrick": "fitzpatrick", "group": None}
    columns.update(rows.options.columns)
    image_col, diagnosis_col = columns["image"] or "image", columns["diagnosis"] or "diagnosis"
    fst_col, group_col = columns["fitzpatrick"], columns["group"]
    if _missing(table, rows, [c for c in (image_col, diagnosis_col, fst_col, group_col) if c]):
        return
    for line, row in table.rows:
        image = rows.image(line, image_col, row[image_col])
        fst = rows.fst(line, row, fst_col, _ANY, "I–VI (or 1–6), a group I-II/III-IV/V-VI (or 12/34/56), or empty for unknown")
        group = row[group_col] if group_col else row[image_col]
        rows.add(line, image, rows.diagnosis(line, row, diagnosis_col), fst, group)


def _missing(table: Table, rows: _Rows, columns: list[str]) -> bool:
    problems = table.missing(columns)
    rows.result.problems.extend(problems)
    return bool(problems)


IMPORTERS: dict[str, Callable[[Table, _Rows], None]] = {
    "fitzpatrick17k": _fitzpatrick17k,
    "ddi": _ddi,
    "isic": _isic,
    "pad_ufes_20": _pad_ufes_20,
    "scin": _scin,
    "ham10000": _ham10000,
    "generic": _generic,
}


def load_records(options: SourceOptions) -> ImportResult:
    """Every record of the metadata file, or every problem with it (the caller raises them together)."""
    table = read_table(options.metadata)
    result = ImportResult()
    result.problems.extend(table.ragged)
    if not table.rows:
        result.problems.append(f"{table.path.name}: no rows below the header")
        return result
    IMPORTERS[options.format](table, _Rows(table, options, result))
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


def slug(text: str) -> str:
    """A folder-safe form of a diagnosis ("Melanoma, NOS" → "melanoma-nos")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unnamed"
