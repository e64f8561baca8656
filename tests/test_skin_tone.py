"""ITA° skin-tone fidelity on images of known skin colour: constructed Lab patches and the demo's drawings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermkohya import skin_tone
from dermkohya.demo import SKIN_TONES, make_demo_dataset
from dermkohya.skin import FST_TYPES

# ITA° ranges well inside each class band (the bands: > 55, 41–55, 28–41, 10–28, −30–10, < −30)
BANDS = {"I": (57, 75), "II": (43, 53), "III": (30, 39), "IV": (12, 26), "V": (-28, 8), "VI": (-60, -32)}


def constructed(rng: np.random.Generator, ita: float, size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An sRGB patch of skin with ITA `ita` (Lab: L* = 50 + b*·tan ITA, pixel noise, a lighting ramp), a
    darker reddish lesion blob, 3–7 dark hair lines and a few specular dots; returns (rgb, lesion, hair)."""
    while True:
        b = rng.uniform(8, 28)
        lightness = 50 + b * np.tan(np.radians(ita))
        if 22 <= lightness <= 88:
            break
    a = rng.uniform(4, 14)
    yy, xx = np.mgrid[0:size, 0:size]
    lab = np.zeros((size, size, 3))
    lab[..., 0] = lightness + rng.normal(0, 1.0, (size, size)) + 4 * (xx / size - 0.5)
    lab[..., 1], lab[..., 2] = a, b
    cx, cy, r = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65), size * rng.uniform(0.12, 0.25)
    lesion = np.hypot((xx - cx) * rng.uniform(0.7, 1.3), yy - cy) < r
    lab[lesion] = [max(lightness - rng.uniform(15, 30), 8), a + rng.uniform(5, 15), b + rng.uniform(0, 8)]
    hair = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(3, 8))):
        x0, slope = rng.uniform(0, size), rng.uniform(-1.5, 1.5)
        for y in range(size):
            x = int(x0 + slope * (y - size / 2))
            if 0 <= x < size - 1:
                hair[y, x : x + 2] = True
    lab[hair] = [max(lightness - rng.uniform(25, 40), 4), 2, 3]
    for _ in range(int(rng.integers(0, 4))):
        sx, sy = rng.uniform(0, size, 2)
        lab[np.hypot(xx - sx, yy - sy) < 2] = [98, 0, 2]
    return skin_tone.lab_to_srgb(lab), lesion, hair


def test_constructed_patches_recover_the_requested_class_and_the_mask_ignores_lesion_and_hair() -> None:
    rng = np.random.default_rng(17)
    hits, total = 0, 0
    for fst, (lo, hi) in BANDS.items():
        for _ in range(10):
            ita = rng.uniform(lo, hi)
            rgb, lesion, hair = constructed(rng, ita)
            mask, _ = skin_tone.skin_mask(rgb)
            tone = skin_tone.measure_array(rgb, fst)
            total += 1
            hits += tone.ita_class == fst
            assert not (mask & lesion).any(), (fst, ita)
            assert (mask & hair).sum() <= 0.01 * mask.sum(), (fst, ita)
            assert mask.sum() >= 0.5 * (~lesion & ~hair).sum(), "most of the healthy skin is kept"
            assert tone.ita == pytest.approx(ita, abs=4.0) and tone.agrees
    assert hits / total >= 0.95


def test_demo_images_agree_with_their_labels(tmp_path: Path) -> None:
    """The demo draws skin from its own sRGB table; the masked ITA lands on the table colour's ITA (the
    lesion, the pores, the lighting ramp and the printed label do not move it), within ±1 class of the label.
    The table is illustrative: its II, IV and V tones sit one ITA class lighter/darker than their label."""
    root = make_demo_dataset(tmp_path / "demo", per_cell=1, size=128)
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        lab = skin_tone.srgb_to_lab(np.array(SKIN_TONES[row["fitzpatrick"]], dtype=np.uint8))
        expected = skin_tone.ita_degrees(lab[0], lab[2])
        tone = skin_tone.measure(root / row["image"], row["fitzpatrick"])
        assert tone.ita == pytest.approx(expected, abs=4.0), row
        assert tone.agrees is True and tone.skin_fraction > 0.5, row


def test_ita_formula_classes_and_agreement() -> None:
    assert skin_tone.ita_degrees(50.0, 20.0) == 0.0
    assert skin_tone.ita_degrees(70.0, 20.0) == pytest.approx(45.0)
    assert [skin_tone.ita_class(v) for v in (55.01, 55.0, 41.0, 28.0, 10.0, -30.0, -30.01)] == ["I", "II", "III", "IV", "V", "VI", "VI"]
    assert skin_tone.agrees("III", "IV") and not skin_tone.agrees("III", "V")
    assert skin_tone.agrees("V-VI", "IV") and not skin_tone.agrees("I-II", "IV")
    assert skin_tone.agrees("unknown", "IV") is None
    lab = np.array([[62.0, 12.0, 17.0], [30.0, 9.0, 14.0]])
    assert np.abs(skin_tone.srgb_to_lab(skin_tone.lab_to_srgb(lab)) - lab).max() < 1.0


def test_an_image_without_skin_is_unmeasured_not_guessed(tmp_path: Path) -> None:
    path = tmp_path / "black.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(path)
    tone = skin_tone.measure(path, "VI")
    assert tone.ita is None and tone.ita_class is None and "healthy skin" in (tone.reason or "")


def _tones(fst: str, itas: list[float]) -> list[skin_tone.Tone]:
    return [skin_tone.Tone(f"{fst}{i}.png", fst, None, None, v, skin_tone.ita_class(v), skin_tone.agrees(fst, skin_tone.ita_class(v)), 0.8) for i, v in enumerate(itas)]


def test_summary_and_drift_flags(tmp_path: Path) -> None:
    real = _tones("II", [45, 48, 50, 52]) + _tones("VI", [-50, -45, -40, -42])
    synthetic = (_tones("II", [44, 49, 51, 53]) + _tones("VI", [-20, -25, -28, -15])  # VI drawn 20° too light
                 + _tones("IV", [60, 62, 20, 64]))  # no real IV; 1 of 4 within ±1 class
    section = skin_tone.report(real, synthetic, resamples=50)
    per_fst = section["synthetic"]["per_fst"]
    assert section["drift"] == ["IV", "VI"]
    assert "lighter" in section["drift_reasons"]["VI"] and "no real images" in section["drift_reasons"]["IV"]
    assert per_fst["II"]["n"] == 4 and per_fst["II"]["ita_median"] == pytest.approx(50.0)
    assert per_fst["II"]["ita_iqr"] == [pytest.approx(47.75), pytest.approx(51.5)]
    assert per_fst["IV"]["agreement"] == 0.25
    assert per_fst["VI"]["agreement"] == 1.0 and per_fst["VI"]["exact_agreement"] == 0.0  # ±1 class hides it; the median does not
    for row in [*per_fst.values(), *section["real"]["per_fst"].values()]:
        lo, hi = row["ita_median_ci"]
        assert lo <= row["ita_median"] <= hi and 0 <= row["agreement"] <= 1
    json.dumps(section)
    csv_path = skin_tone.write_tones_csv(tmp_path / "tones.csv", real, synthetic)
    assert len(csv_path.read_text().splitlines()) == 1 + len(real) + len(synthetic)
    png = skin_tone.plot(tmp_path / "ita.png", real, synthetic)
    assert Image.open(png).size[0] > 100


def test_fst_types_all_have_a_band() -> None:
    assert set(BANDS) == set(FST_TYPES) == set(skin_tone.ITA_NAMES)


def test_evaluate_reports_skin_tone_and_flags_a_lighter_type_without_any_weights(tmp_path: Path) -> None:
    """`dermkohya evaluate --skip fid,lpips,clip,memorisation`: demo drawings as the real held-out set, and as a
    stand-in synthetic set whose type-II drawings are labelled VI (what a generator drifting light would give)."""
    from click.testing import CliRunner

    from dermkohya.cli import main

    real = make_demo_dataset(tmp_path / "real", per_cell=1, size=96)
    synthetic = make_demo_dataset(tmp_path / "synthetic" / "drift", per_cell=1, size=96, seed=1)
    with open(synthetic / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["fitzpatrick"] != "VI"]
    with open(synthetic / "index.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "diagnosis", "fst", "prompt"])
        for r in rows:
            fst = "VI" if r["fitzpatrick"] == "II" else r["fitzpatrick"]
            writer.writerow([r["image"], r["diagnosis"], fst, f"{r['diagnosis']}, Fitzpatrick skin type {fst}"])
    out = tmp_path / "reports"
    result = CliRunner().invoke(main, ["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--out", str(out),
                                       "--skip", "fid,lpips,clip,memorisation"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "drift.json").read_text())
    tone = report["skin_tone"]
    assert tone["drift"] == ["VI"] and "lighter" in tone["drift_reasons"]["VI"]
    assert list(tone["real"]["per_fst"]) == list(FST_TYPES) and all(r["n"] == 3 for r in tone["real"]["per_fst"].values())
    assert list(tone["synthetic"]["per_fst"]) == ["I", "III", "IV", "V", "VI"] and tone["synthetic"]["per_fst"]["VI"]["agreement"] == 0.0
    for side in ("real", "synthetic"):
        for fst, row in tone[side]["per_fst"].items():
            assert set(row) >= {"n", "ita_median", "ita_iqr", "agreement"}
            assert row["ita_iqr"][0] <= row["ita_median"] <= row["ita_iqr"][1] and 0 <= row["agreement"] <= 1, (side, fst)
    fst_rows = {r["fst"]: r for r in report["rows"] if r["group"] == "skin type"}
    assert fst_rows["III"]["ita_median"] == pytest.approx(fst_rows["III"]["ita_median_real"], abs=3.0)
    assert fst_rows["VI"]["ita_median"] - fst_rows["VI"]["ita_median_real"] > 100 and fst_rows["VI"]["ita_agreement"] == 0.0
    md = (out / "drift.md").read_text()
    assert "## Skin tone (ITA°)" in md and "Drift: **FST VI**" in md and f"]({report['plots']['skin_tone']})" in md
    assert (out / report["plots"]["skin_tone"]).is_file() and (out / "drift" / "skin_tone.csv").is_file()
