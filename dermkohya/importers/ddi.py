"""DDI, the Diverse Dermatology Images set (Daneshjou et al. 2022): skin tones recorded as groups 12/34/56."""

from __future__ import annotations

from dermkohya.importers.base import GROUPED, Rows, Table, missing, register


@register("ddi", display_name="DDI",
          licence="DDI (Daneshjou et al. 2022): Stanford AIMI research use agreement, non-commercial", labels=("disease", "malignant"))
def read(table: Table, rows: Rows) -> None:
    label = rows.options.label or "disease"
    if missing(table, rows, ["DDI_file", "skin_tone", label]):
        return
    for line, row in table.rows:
        image = rows.image(line, "DDI_file", row["DDI_file"])
        fst = rows.fst(line, row, "skin_tone", GROUPED, "12, 34 or 56 (DDI records grouped skin tones)")
        if label == "malignant":
            flag = row["malignant"].strip().lower()
            if flag not in {"true", "false", "1", "0"}:
                rows.result.problems.append(f"{table.where(line, 'malignant')}: `{row['malignant']}` is not True or False")
                continue
            diagnosis = "malignant" if flag in {"true", "1"} else "benign"
        else:
            diagnosis = rows.diagnosis(line, row, label).replace("-", " ")
        rows.add(line, image, diagnosis, fst, row.get("DDI_ID") or row["DDI_file"])
