"""The embedded demo dataset: procedural, clearly non-clinical lesion-like blobs on skin tones I–VI.

It exists so that `make train`, the tests and a new user have a real kohya dataset without patient
data or a download. Every file is a pure function of (seed, per_cell, size): the same call writes the
same bytes, and a second call into the folder it made only verifies them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dermkohya.files import sha256_file, write_atomic
from dermkohya.errors import DermkohyaError
from dermkohya.skin import FST_TYPES

DIAGNOSES: tuple[str, ...] = ("erythema patch", "pustule-like dots", "scaly plaque")
# Illustrative sRGB skin tones from light (I) to dark (VI); not a colour standard.
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "I": (243, 219, 201), "II": (229, 192, 163), "III": (203, 155, 118),
    "IV": (163, 114, 80), "V": (113, 76, 52), "VI": (68, 46, 33),
}
DEMO_REPEATS = 1
DEMO_CONCEPT = "derm"
CAPTION_TEMPLATE = "clinical dermatology photograph, {diagnosis}, Fitzpatrick skin type {fst}, synthetic demo image"
MARKER = ".dermkohya-demo.json"
LABEL = "SYNTHETIC DEMO - NOT A CLINICAL IMAGE"


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bicubically enlarged."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    field = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(field, 0.0, 1.0)


def _blob(rng: np.random.Generator, size: int, radius: float, softness: float) -> np.ndarray:
    """An irregular lesion-shaped mask in [0, 1] near the image centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size * (0.5 + rng.uniform(-0.1, 0.1)), size * (0.5 + rng.uniform(-0.1, 0.1))
    stretch = rng.uniform(0.7, 1.3)
    dist = np.hypot((xx - cx) * stretch, (yy - cy) / stretch)
    edge = radius * (0.75 + 0.5 * _smooth_noise(rng, size, 6))
    return 1.0 / (1.0 + np.exp(-(edge - dist) / max(softness, 1e-3)))


def _mix(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha = alpha.astype(np.float32)[..., None]
    return image + (np.asarray(colour, dtype=np.float32) - image) * alpha


def demo_image(diagnosis: str, fst: str, rng: np.random.Generator, size: int = 512) -> Image.Image:
    """One procedural image of `diagnosis` on skin type `fst`, labelled as synthetic in the corner."""
    base = np.array(SKIN_TONES[fst], dtype=np.float32)
    shade = 1.0 + 0.10 * (_smooth_noise(rng, size, 5) - 0.5)
    ramp = np.linspace(-0.06, 0.06, size, dtype=np.float32)
    light = ramp[None, :] if rng.random() < 0.5 else ramp[:, None]
    pores = 4.0 * (_smooth_noise(rng, size, max(8, size // 4)) - 0.5)
    image = base * (shade + light)[..., None] + pores[..., None]
    lum = float(base.mean()) / 255.0
    if diagnosis == "erythema patch":
        mask = _blob(rng, size, size * rng.uniform(0.16, 0.26), size * 0.03)
        red = np.array([196.0, 48.0, 58.0]) * (0.45 + 0.55 * lum)
        image = _mix(image, 0.35 * base + 0.65 * red, 0.8 * mask * (0.8 + 0.2 * _smooth_noise(rng, size, 12)))
    elif diagnosis == "pustule-like dots":
        halo = np.zeros((size, size), np.float32)
        core = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(18, 40))):
            cx, cy = np.clip(rng.normal(size / 2, size * 0.14, 2), 0, size - 1)
            r = size * rng.uniform(0.006, 0.016)
            x0, x1 = int(max(0, cx - 3 * r)), int(min(size, cx + 3 * r + 1))
            y0, y1 = int(max(0, cy - 3 * r)), int(min(size, cy + 3 * r + 1))
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            d = np.hypot(xx - cx, yy - cy)
            halo[y0:y1, x0:x1] = np.maximum(halo[y0:y1, x0:x1], np.clip(1.0 - d / (2.4 * r), 0.0, 1.0))
            core[y0:y1, x0:x1] = np.maximum(core[y0:y1, x0:x1], np.clip(1.2 - d / r, 0.0, 1.0))
        image = _mix(image, 0.4 * base + 0.6 * np.array([190.0, 60.0, 60.0]) * (0.5 + 0.5 * lum), 0.7 * halo)
        image = _mix(image, np.array([238.0, 226.0, 170.0]), np.clip(core, 0.0, 1.0))
    elif diagnosis == "scaly plaque":
        mask = _blob(rng, size, size * rng.uniform(0.18, 0.28), size * 0.01)
        plaque = 0.45 * base + 0.55 * np.array([205.0, 112.0, 110.0]) * (0.55 + 0.45 * lum)
        image = _mix(image, plaque, 0.85 * mask)
        flakes = (_smooth_noise(rng, size, size // 8) > 0.68).astype(np.float32)
        image = _mix(image, np.array([226.0, 222.0, 212.0]), 0.75 * flakes * mask)
    else:
        raise DermkohyaError(f"unknown demo diagnosis {diagnosis!r}; use one of {', '.join(DIAGNOSES)}")
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    try:
        font = ImageFont.load_default(size=max(8, size // 40))
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    margin = max(2, size // 64)
    draw.text((margin + 1, size - margin - max(8, size // 40) + 1), LABEL, fill=(0, 0, 0), font=font)
    draw.text((margin, size - margin - max(8, size // 40)), LABEL, fill=(255, 255, 255), font=font)
    return picture


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)  # no pnginfo: no timestamps; bytes depend on pixels only
    return buffer.getvalue()


def _sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _read_marker(out_dir: Path) -> dict | None:
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("generator") == "dermkohya demo-data" else None


def demo_records(*, per_cell: int = 2) -> list[tuple[str, str, str]]:
    """(file stem, diagnosis, skin type) of every demo image, in file order."""
    records = []
    for diagnosis in DIAGNOSES:
        for fst in FST_TYPES:
            for _ in range(per_cell):
                records.append((f"demo_{len(records):04d}", diagnosis, fst))
    return records


def make_demo_dataset(out_dir: Path, *, seed: int = 0, per_cell: int = 2, size: int = 512) -> Path:
    """Write the demo train_data_dir (`<out_dir>/1_derm/demo_XXXX.png` + `.txt`, `metadata.csv`).

    Returns `out_dir`. A folder this function made with the same parameters is only verified (and
    repaired where a file is missing or changed); any other non-empty folder is refused untouched.
    """
    out_dir = Path(out_dir)
    if per_cell < 1 or size < 32:
        raise DermkohyaError(f"demo-data: per_cell must be ≥ 1 and size ≥ 32 (got {per_cell}, {size})")
    params = {"seed": seed, "per_cell": per_cell, "size": size}
    marker = _read_marker(out_dir) if out_dir.is_dir() else None
    if marker is None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise DermkohyaError(f"{out_dir}: not empty and not made by `dermkohya demo-data`; "
                             "give an empty or new folder (nothing was written)")
    if marker is not None and marker.get("params") != params:
        raise DermkohyaError(f"{out_dir}: holds a demo dataset made with {marker.get('params')}, not {params}; "
                             "delete it or give another folder")
    expected = (marker or {}).get("files") or {}
    if expected and all(_sha256(out_dir / rel) == digest for rel, digest in expected.items()):
        return out_dir

    folder = out_dir / f"{DEMO_REPEATS}_{DEMO_CONCEPT}"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / MARKER, json.dumps({"generator": "dermkohya demo-data", "params": params,
                                                "files": None}, indent=2).encode())
    files: dict[str, str] = {}
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["image", "diagnosis", "fitzpatrick", "caption", "source"])
    for index, (stem, diagnosis, fst) in enumerate(demo_records(per_cell=per_cell)):
        rng = np.random.default_rng([seed, index])
        caption = CAPTION_TEMPLATE.format(diagnosis=diagnosis, fst=fst)
        for name, data in ((f"{stem}.png", _png_bytes(demo_image(diagnosis, fst, rng, size))),
                           (f"{stem}.txt", (caption + "\n").encode())):
            write_atomic(folder / name, data)
            files[f"{folder.name}/{name}"] = hashlib.sha256(data).hexdigest()
        writer.writerow([f"{folder.name}/{stem}.png", diagnosis, fst, caption, "dermkohya demo (synthetic)"])
    metadata = rows.getvalue().encode()
    write_atomic(out_dir / "metadata.csv", metadata)
    files["metadata.csv"] = hashlib.sha256(metadata).hexdigest()
    write_atomic(out_dir / MARKER, json.dumps({"generator": "dermkohya demo-data", "params": params,
                                                "files": files}, indent=2, sort_keys=True).encode())
    return out_dir
