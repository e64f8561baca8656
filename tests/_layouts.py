"""Fixture datasets in each public metadata layout (a few dozen rows, images generated), for the prepare tests.

Each builder writes `<root>/<layout files>` and a recipe `<root>/dataset.toml`, and returns the recipe path
with what the test should expect. Column names and codes follow the published files.
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 64


@dataclass
class Layout:
    recipe: Path
    images: int  # records expected after import (and after skipping what the layout skips)
    diagnoses: set[str]
    fsts: set[str]
    skipped: int = 0
    extra: dict = field(default_factory=dict)


def write_image(path: Path, seed: int, size: tuple[int, int] = (80, 60), fmt: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=3)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt or ("PNG" if path.suffix == ".png" else "JPEG"), quality=90)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_recipe(root: Path, source: str, rest: str = "") -> Path:
    recipe = root / "dataset.toml"
    recipe.write_text(f"[source]\n{source}\n\n[images]\nresolution = {RESOLUTION}\n\n{rest}\n", encoding="utf-8")
    return recipe


def fitzpatrick17k(root: Path, rows: int = 36) -> Layout:
    labels = [("psoriasis", "inflammatory", "non-neoplastic"), ("basal cell carcinoma", "malignant epidermal", "malignant")]
    table = []
    for i in range(rows):
        md5 = hashlib.md5(f"f17k-{i}".encode()).hexdigest()
        scale = -1 if i % 9 == 8 else (i % 6) + 1
        label = labels[i % 2]
        table.append([md5, scale, scale, *label, "", f"https://example.org/{md5}.jpg", ""])
        write_image(root / "images" / f"{md5}.jpg", i)
    write_csv(root / "fitzpatrick17k.csv", ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label",
                                            "nine_partition_label", "three_partition_label", "qc", "url", "url_alphanum"], table)
    recipe = write_recipe(root, 'format = "fitzpatrick17k"\nmetadata = "fitzpatrick17k.csv"\nimages = "images"')
    return Layout(recipe, rows, {"psoriasis", "basal cell carcinoma"}, {"I", "II", "III", "IV", "V", "VI", "unknown"})


def ddi(root: Path, rows: int = 30) -> Layout:
    diseases = ["melanoma-in-situ", "seborrheic-keratosis", "verruca-vulgaris"]
    table = []
    for i in range(rows):
        name = f"{i + 1:06d}.png"
        table.append([i, i + 1, name, (12, 34, 56)[i % 3], i % 3 == 0, diseases[i % 3 if i % 2 else 0]])
        write_image(root / "images" / name, 100 + i, fmt="PNG")
    write_csv(root / "ddi_metadata.csv", ["", "DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"], table)
    recipe = write_recipe(root, 'format = "ddi"\nmetadata = "ddi_metadata.csv"\nimages = "images"')
    return Layout(recipe, rows, {"melanoma in situ", "seborrheic keratosis", "verruca vulgaris"}, {"I-II", "III-IV", "V-VI"})


def isic(root: Path, rows: int = 30) -> Layout:
    table = []
    for i in range(rows):
        isic_id = f"ISIC_{i:07d}"
        deep = "" if i % 10 == 9 else ("Melanoma Invasive" if i % 2 else "Nevus")
        top = "Malignant" if i % 2 else "Benign"
        fst = "" if i % 7 == 6 else ["I", "II", "III", "IV", "V", "VI"][i % 6]
        table.append([isic_id, "Example Clinic", "CC-BY-NC" if i % 2 else "CC-0", top, "", deep, fst, f"IL_{i // 2:07d}"])
        write_image(root / "ISIC-images" / f"{isic_id}.jpg", 200 + i)
    write_csv(root / "metadata.csv", ["isic_id", "attribution", "copyright_license", "diagnosis_1", "diagnosis_2",
                                      "diagnosis_3", "fitzpatrick_skin_type", "lesion_id"], table)
    recipe = write_recipe(root, 'format = "isic"\nmetadata = "metadata.csv"\nimages = "ISIC-images"')
    return Layout(recipe, rows, {"Nevus", "Melanoma Invasive", "Malignant"}, {"I", "II", "III", "IV", "V", "VI", "unknown"})


def pad_ufes_20(root: Path, rows: int = 30) -> Layout:
    codes = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    header = ["patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age", "pesticide",
              "gender", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system", "fitspatrick",
              "region", "diameter_1", "diameter_2", "diagnostic", "itch", "grew", "hurt", "changed", "bleed", "elevation",
              "img_id", "biopsed"]
    table = []
    for i in range(rows):
        img = f"PAT_{i // 2}_{i}_{100 + i}.png"
        fst = "" if i % 8 == 7 else f"{(i % 6) + 1}.0"
        row = {"patient_id": f"PAT_{i // 2}", "lesion_id": i, "fitspatrick": fst, "diagnostic": codes[i % 6], "img_id": img}
        table.append([row.get(h, "UNK") for h in header])
        write_image(root / "images" / f"imgs_part_{1 + i % 3}" / img, 300 + i, fmt="PNG")
    write_csv(root / "metadata.csv", header, table)
    recipe = write_recipe(root, 'format = "pad_ufes_20"\nmetadata = "metadata.csv"\nimages = "images"')
    names = {"actinic keratosis", "basal cell carcinoma", "melanoma", "nevus", "squamous cell carcinoma", "seborrheic keratosis"}
    return Layout(recipe, rows, names, {"I", "II", "III", "IV", "V", "VI", "unknown"})


def scin(root: Path, cases: int = 16) -> Layout:
    cases_rows, label_rows = [], []
    images = skipped = 0
    for i in range(cases):
        case = f"-{7000000000000000 + i}"
        paths = []
        for k in range(1 + i % 3):
            rel = f"dataset/images/{case}_{k}.png"
            write_image(root / rel, 400 + 10 * i + k, fmt="PNG")
            paths.append(rel)
        paths += [""] * (3 - len(paths))
        fst = ["FST1", "FST2", "FST3", "FST4", "FST5", "FST6", "NONE_IDENTIFIED", ""][i % 8]
        cases_rows.append([case, "AGE_18_TO_29", *paths, fst])
        if i % 5 == 4:  # SCIN has cases dermatologists did not label
            label_rows.append([case, "", "", ""])
            skipped += 1 + i % 3
        else:
            weighted = "{'Eczema': 0.6, 'Psoriasis': 0.4}" if i % 2 else "{'Psoriasis': 0.33, 'Urticaria': 0.67}"
            label_rows.append([case, "['Eczema', 'Psoriasis']", weighted, "FST3"])
            images += 1 + i % 3
    write_csv(root / "dataset" / "scin_cases.csv", ["case_id", "age_group", "image_1_path", "image_2_path",
                                                    "image_3_path", "fitzpatrick_skin_type"], cases_rows)
    write_csv(root / "dataset" / "scin_labels.csv", ["case_id", "dermatologist_skin_condition_on_label_name",
                                                     "weighted_skin_condition_label",
                                                     "dermatologist_fitzpatrick_skin_type_label_1"], label_rows)
    recipe = write_recipe(root, 'format = "scin"\nmetadata = "dataset/scin_cases.csv"\nlabels = "dataset/scin_labels.csv"\n'
                                'images = "."')
    return Layout(recipe, images, {"Eczema", "Urticaria"}, {"I", "II", "III", "IV", "V", "VI", "unknown"}, skipped)


def ham10000(root: Path, rows: int = 30) -> Layout:
    codes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    table = []
    for i in range(rows):
        image_id = f"ISIC_{24306 + i:07d}"
        table.append([f"HAM_{i // 2:07d}", image_id, codes[(i // 2) % 7], "histo", 45, "male", "back", "vidir_modern"])
        write_image(root / f"HAM10000_images_part_{1 + i % 2}" / f"{image_id}.jpg", 500 + i)
    write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization",
                                                "dataset"], table)
    recipe = write_recipe(root, 'format = "ham10000"\nmetadata = "HAM10000_metadata.csv"\nimages = "."')
    names = {"actinic keratosis or intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
             "melanoma", "melanocytic nevus", "vascular lesion"}
    return Layout(recipe, rows, names, {"unknown"})


def generic(root: Path, counts: dict[str, int] | None = None, rest: str = "") -> Layout:
    """A generic CSV with its own column names; `counts` per skin type makes a skewed fixture."""
    counts = counts or {"I": 5, "II": 5, "III": 5, "IV": 5, "V": 5, "VI": 5}
    rows, i = [], 0
    for fst, n in counts.items():
        for _ in range(n):
            diagnosis = ("eczema", "melanoma")[i % 2]
            rel = f"photos/{diagnosis}/img_{i:04d}.jpg"
            write_image(root / "data" / rel, 600 + i)
            rows.append([rel, diagnosis, fst, f"patient-{i}"])
            i += 1
    random.Random(0).shuffle(rows)
    write_csv(root / "data" / "table.csv", ["file", "dx", "skin", "patient"], rows)
    source = ('format = "generic"\nmetadata = "data/table.csv"\nimages = "data"\nlicence = "test fixture"\n'
              '[source.columns]\nimage = "file"\ndiagnosis = "dx"\nfitzpatrick = "skin"\ngroup = "patient"')
    recipe = write_recipe(root, source, rest)
    return Layout(recipe, sum(counts.values()), {"eczema", "melanoma"}, {k for k, v in counts.items() if v})


LAYOUTS = {
    "fitzpatrick17k": fitzpatrick17k,
    "ddi": ddi,
    "isic": isic,
    "pad_ufes_20": pad_ufes_20,
    "scin": scin,
    "ham10000": ham10000,
    "generic": generic,
}
