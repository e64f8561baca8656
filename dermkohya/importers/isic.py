"""ISIC Archive metadata export: diagnosis levels 1–5, an optional Fitzpatrick column, a licence per image."""

from __future__ import annotations

from dermkohya.importers.base import SINGLE, Rows, Table, missing, register


@register("isic", display_name="ISIC",
          licence="ISIC Archive: the licence stated for each image", labels=("diagnosis_3", "diagnosis_1", "diagnosis_2", "diagnosis_4", "diagnosis_5"))
def read(table: Table, rows: Rows) -> None:
    label = rows.options.label or "diagnosis_3"
    if missing(table, rows, ["isic_id", "diagnosis_1"]):
        return
    fst_column = "fitzpatrick_skin_type" if "fitzpatrick_skin_type" in table.header else None
    if fst_column is None:
        rows.result.notes.append(f"{table.path.name} has no `fitzpatrick_skin_type` column: every skin type is unknown")
    # The chosen level, else the deepest level above it that is filled (many images only have diagnosis_1).
    level = int(label.rsplit("_", 1)[1])
    levels = [f"diagnosis_{i}" for i in range(level, 0, -1) if f"diagnosis_{i}" in table.header]
    for line, row in table.rows:
        image = rows.image(line, "isic_id", row["isic_id"], (".jpg", ".jpeg", ".png"))
        fst = rows.fst(line, row, fst_column, SINGLE, "I–VI, or empty for unknown")
        diagnosis = next((row[c] for c in levels if row.get(c)), "")
        if not diagnosis:
            rows.result.problems.append(f"{table.where(line, 'diagnosis_1')}: empty; every row needs a diagnosis")
        licence = row.get("copyright_license")
        if licence:
            licence = f"ISIC Archive: {licence}" + (f", {row['attribution']}" if row.get("attribution") else "")
        rows.add(line, image, diagnosis, fst, row.get("lesion_id") or row["isic_id"], licence)
