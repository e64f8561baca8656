"""A generic CSV: the columns named in the recipe's [source.columns] (the demo's layout by default)."""

from __future__ import annotations

from dermkohya.importers.base import ANY, Rows, Table, missing, register


@register("generic", display_name="generic CSV",
          licence="not stated: set `source.licence` in the recipe")
def read(table: Table, rows: Rows) -> None:
    columns = {"image": "image", "diagnosis": "diagnosis", "fitzpatrick": "fitzpatrick", "group": None}
    columns.update(rows.options.columns)
    image_col, diagnosis_col = columns["image"] or "image", columns["diagnosis"] or "diagnosis"
    fst_col, group_col = columns["fitzpatrick"], columns["group"]
    if missing(table, rows, [c for c in (image_col, diagnosis_col, fst_col, group_col) if c]):
        return
    for line, row in table.rows:
        image = rows.image(line, image_col, row[image_col])
        fst = rows.fst(line, row, fst_col, ANY, "I–VI (or 1–6), a group I-II/III-IV/V-VI (or 12/34/56), or empty for unknown")
        group = row[group_col] if group_col else row[image_col]
        rows.add(line, image, rows.diagnosis(line, row, diagnosis_col), fst, group)
