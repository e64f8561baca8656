"""A sidecar metadata.csv: diagnosis and Fitzpatrick skin type per image, for counts kohya never sees.

`dermkohya prepare` writes one beside its kohya folders; a user's own dataset may carry one too. Image
paths in it are relative to the dataset root.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from dermkohya.dataset.problems import Problem, display, problem
from dermkohya.skin import parse_fst

METADATA_FILE = "metadata.csv"


def read_metadata(root: Path, all_images: Iterable[Path], problems: list[Problem]) -> dict[Path, dict[str, str]]:
    """diagnosis / skin type per image from a sidecar metadata.csv (image paths relative to the root)."""
    sidecar = root / METADATA_FILE
    if not sidecar.is_file():
        return {}
    images = {display(image, root): image for image in all_images}
    rows: dict[Path, dict[str, str]] = {}
    with open(sidecar, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        image_col = columns.get("image")
        fst_col = next((columns[c] for c in ("fitzpatrick", "fst", "fitzpatrick_skin_type") if c in columns), None)
        diag_col = columns.get("diagnosis")
        if image_col is None or (fst_col is None and diag_col is None):
            return {}
        for line, row in enumerate(reader, start=2):
            name = (row.get(image_col) or "").strip()
            path = images.get(name)
            if path is None:
                problems.append(problem("metadata-missing-image", sidecar,
                                        f"line {line}: image '{name}' is not in any subset folder"))
                continue
            record: dict[str, str] = {}
            if diag_col and (row.get(diag_col) or "").strip():
                record["diagnosis"] = row[diag_col].strip()
            if fst_col:
                fst = parse_fst(row.get(fst_col) or "")
                if fst is None:
                    problems.append(problem("metadata-bad-value", sidecar,
                                            f"line {line}: fitzpatrick '{row.get(fst_col)}' is not a skin type"))
                else:
                    record["fitzpatrick"] = fst
            rows[path] = record
    return rows
