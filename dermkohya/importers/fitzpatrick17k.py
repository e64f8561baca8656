"""Fitzpatrick17k (Groh et al. 2021): 17k clinical atlas images with Fitzpatrick types I–VI."""

from __future__ import annotations

from dermkohya.importers.base import SINGLE, Rows, Table, missing, register


@register("fitzpatrick17k", display_name="Fitzpatrick17k",
          licence=(
        "Fitzpatrick17k (Groh et al. 2021): annotations CC BY-NC-SA 3.0; images under the terms of "
    "their source atlases (DermaAmin, Atlas Dermatologico)"
    ), labels=("label", "nine_partition_label", "three_partition_label"))
def read(table: Table, rows: Rows) -> None:
    label = rows.options.label or "label"
    if missing(table, rows, ["md5hash", "fitzpatrick_scale", label]):
        return
    for line, row in table.rows:
        image = rows.image(line, "md5hash", row["md5hash"], (".jpg", ".jpeg", ".png"))
        fst = rows.fst(line, row, "fitzpatrick_scale", SINGLE, "1–6, or -1 for unknown")
        rows.add(line, image, rows.diagnosis(line, row, label), fst, row["md5hash"])
