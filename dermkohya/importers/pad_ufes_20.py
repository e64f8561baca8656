"""PAD-UFES-20 (Pacheco et al. 2020): smartphone images, six diagnosis codes, the column spelt `fitspatrick`."""

from __future__ import annotations

from dermkohya.importers.base import SINGLE, Rows, Table, missing, register

PAD_UFES_NAMES = {
    "ACK": "actinic keratosis",
    "BCC": "basal cell carcinoma",
    "MEL": "melanoma",
    "NEV": "nevus",
    "SCC": "squamous cell carcinoma",
    "SEK": "seborrheic keratosis",
}


@register("pad_ufes_20", display_name="PAD-UFES-20",
          licence="PAD-UFES-20 (Pacheco et al. 2020): CC BY 4.0")
def read(table: Table, rows: Rows) -> None:
    if missing(table, rows, ["img_id", "diagnostic", "fitspatrick"]):
        return
    for line, row in table.rows:
        image = rows.image(line, "img_id", row["img_id"])
        fst = rows.fst(line, row, "fitspatrick", SINGLE, "1–6, or empty for unknown")
        code = row["diagnostic"]
        if code not in PAD_UFES_NAMES:
            rows.result.problems.append(f"{table.where(line, 'diagnostic')}: `{code}` is not one of "
                                        f"{', '.join(PAD_UFES_NAMES)}")
            continue
        rows.add(line, image, PAD_UFES_NAMES[code], fst, row.get("lesion_id") or row["img_id"])
