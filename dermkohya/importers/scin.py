"""SCIN (Google Research, 2024): cases of up to three images, dermatologist labels in a second file."""

from __future__ import annotations

import ast

from dermkohya.importers.base import SINGLE, Rows, Table, missing, read_table, register


@register("scin", display_name="SCIN",
          licence="SCIN (Google Research, 2024): the dataset's own data use terms")
def read(table: Table, rows: Rows) -> None:
    if missing(table, rows, ["case_id", "image_1_path", "fitzpatrick_skin_type"]):
        return
    labels = _labels(table, rows)
    if labels is None:
        return
    image_columns = [c for c in ("image_1_path", "image_2_path", "image_3_path") if c in table.header]
    for line, row in table.rows:
        fst = rows.fst(line, row, "fitzpatrick_skin_type", SINGLE, "FST1–FST6, or empty/NONE_IDENTIFIED for unknown")
        diagnosis = labels.get(row["case_id"], "")
        if not diagnosis:
            rows.result.skipped["SCIN case without a dermatologist label"] += sum(1 for c in image_columns if row[c])
            continue
        for column in image_columns:
            if row[column]:
                rows.add(line, rows.image(line, column, row[column]), diagnosis, fst, row["case_id"])


def _labels(table: Table, rows: Rows) -> dict[str, str] | None:
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
