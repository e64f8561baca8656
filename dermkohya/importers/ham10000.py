"""HAM10000 (Tschandl et al. 2018): dermoscopy, seven diagnosis codes, no skin type."""

from __future__ import annotations

from dermkohya.importers.base import Rows, Table, missing, register
from dermkohya.skin import UNKNOWN

HAM10000_NAMES = {
    "akiec": "actinic keratosis or intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


@register("ham10000", display_name="HAM10000",
          licence="HAM10000 (Tschandl et al. 2018): CC BY-NC 4.0")
def read(table: Table, rows: Rows) -> None:
    if missing(table, rows, ["image_id", "dx"]):
        return
    rows.result.notes.append("HAM10000 records no skin type: every image is of unknown skin type")
    for line, row in table.rows:
        image = rows.image(line, "image_id", row["image_id"], (".jpg", ".jpeg", ".png"))
        code = row["dx"]
        if code not in HAM10000_NAMES:
            rows.result.problems.append(f"{table.where(line, 'dx')}: `{code}` is not one of {', '.join(HAM10000_NAMES)}")
            continue
        rows.add(line, image, HAM10000_NAMES[code], UNKNOWN, row.get("lesion_id") or row["image_id"])
