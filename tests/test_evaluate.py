"""evaluate: a generated set (tiny pipeline) against a generated held-out split, with random-weight
Inception, LPIPS and CLIP files: the report's rows, plots, memorisation, and the missing-file errors.
The report record, its markdown and a metric added through the registry are tested without torch."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_metrics import random_images, save_random_inception, save_random_lpips, save_tiny_clip

from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.evaluate import EvaluationReport, Options, Weights, evaluate, read_real
from dermkohya.metrics import networks, quality, registry
from dermkohya.metrics.base import Column, Evaluation, Group, Metric
from dermkohya.records import RecordError

try:
    from test_generate import tiny, write_plan  # noqa: F401  (the tiny pipeline fixture)
except pytest.skip.Exception:  # no torch/diffusers: only the tests that need no network run
    tiny = write_plan = None
needs_pipeline = pytest.mark.skipif(tiny is None, reason="needs torch, diffusers and peft (pip install -e '.[ml]')")


# The keys reports/<plan>.json had before it became a record (collect and users' scripts read them).
OLD_KEYS = {
    "plan", "synthetic", "real", "train", "created", "dermkohya_version", "base_model", "loras", "metrics", "weights",
    "options", "device", "rows", "memorisation", "plots", "notes",
}  # fmt: skip


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder laid out as `dermkohya evaluate --weights` expects, every network random."""
    folder = tmp_path_factory.mktemp("weights")
    save_random_inception(folder / networks.INCEPTION_FILE)
    save_random_lpips(folder / "lpips")
    save_tiny_clip(folder / "clip", folder / "tokenizers")
    return folder


def write_split(folder: Path, rows: list[tuple[str, str]], seed: int) -> Path:
    """A prepared-style split: images in subfolders and metadata.csv (image, diagnosis, fitzpatrick, caption)."""
    folder.mkdir(parents=True)
    images = random_images(len(rows), 48, seed=seed)
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "diagnosis", "fitzpatrick", "caption"])
        for i, ((diagnosis, fst), pixels) in enumerate(zip(rows, images)):
            rel = f"1_{diagnosis.replace(' ', '_')}/{i:03d}.png"
            (folder / rel).parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / rel)
            writer.writerow([rel, diagnosis, fst, f"clinical dermatology photograph, {diagnosis}"])
    return folder


@pytest.fixture(scope="session")
def sets(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> dict[str, Path]:  # noqa: F811
    from dermkohya.generate import generate

    root = tmp_path_factory.mktemp("eval")
    synthetic = root / "synthetic" / "t"
    generate(write_plan(root, tiny, count=12), out=synthetic, show_progress=False)
    cells = [(d, f) for d in ("Melanoma", "basal cell carcinoma") for f in ("1", "4", "6")]  # codes as datasets write them
    prepared = root / "prepared"
    heldout = write_split(prepared / "heldout", cells * 2, seed=10)
    train = write_split(prepared / "train", cells, seed=20)
    first = next(synthetic.glob("melanoma/I/*.png"))  # a training image that IS a synthetic one
    shutil.copy(first, train / "copied.png")
    with (train / "metadata.csv").open("a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["copied.png", "melanoma", "I", "copy"])
    return {"synthetic": synthetic, "heldout": heldout, "copied": first, "root": root}


@needs_pipeline
def test_report_has_rows_per_skin_type_diagnosis_and_cell(tmp_path: Path, sets: dict[str, Path], weights: Path) -> None:
    report = evaluate(
        sets["heldout"], sets["synthetic"], weights=Weights.under(weights), out_dir=tmp_path / "reports", options=Options(min_fid=6, kid_subsets=20, lpips_size=64)
    )
    rows = {(r["group"], r["label"]): r for r in report.rows}
    assert [k for k in rows if k[0] == "skin type"] == [("skin type", "FST I"), ("skin type", "FST IV"), ("skin type", "FST VI")]
    assert ("diagnosis", "melanoma") in rows and ("cell", "basal cell carcinoma · FST VI") in rows
    overall = rows[("overall", "all")]
    assert (overall["n_real"], overall["n_synthetic"]) == (12, 12)
    assert all((r["n_real"], r["n_synthetic"]) == (4, 4) for k, r in rows.items() if k[0] == "skin type")
    assert overall["fid"] > 0 and np.isfinite(overall["kid"]) and overall["kid_std"] >= 0
    assert rows[("skin type", "FST I")]["fid"] is None  # 4 per side: below min_fid, KID only
    assert rows[("skin type", "FST I")]["kid"] is not None
    assert 0 < overall["lpips_to_real"] and 0 < overall["lpips_diversity"]
    assert 0 <= overall["clip_score"] <= 100 and 0 <= overall["clip_score_real"] <= 100
    for key in ("kid", "lpips_to_real", "clip_score"):  # per-skin-type bootstrap intervals around the figure
        fst_i = rows[("skin type", "FST I")]
        assert fst_i[f"{key}_ci"][0] <= fst_i[f"{key}_ci"][1] and overall[f"{key}_ci"] is None, key
    assert set(report.skin_tone["synthetic"]["per_fst"]) == {"I", "IV", "VI"} and report.skin_tone["real"]["per_fst"]["VI"]["n"] == 4
    assert overall["clip_diversity"] > 0 and overall["rejection_rate"] == 0

    memo = report.memorisation
    assert memo["train_images"] == 7 and memo["flagged"] >= 1
    copied = [p for p in memo["pairs_flagged"] if p["train"].endswith("copied.png")]
    assert copied and Path(copied[0]["synthetic"]) == sets["copied"] and copied[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    shown = next(p for p in memo["pairs_shown"] if p["train"].endswith("copied.png"))
    assert shown["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("skin type", "FST I")]["memorised"] >= 1

    out = tmp_path / "reports"
    saved = json.loads((out / "t.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report.rows)) and saved["weights"]["inception"]["sha256"]
    assert set(saved) == {"format", "skin_tone", *OLD_KEYS} and saved["format"] == "dermkohya.evaluation/1"
    assert EvaluationReport.read(out / "t.json") == report
    md = (out / "t.md").read_text()
    assert "## Per skin type" in md and "| FST IV | 4 | 4 |" in md and "## Memorisation" in md and "⚑" in md
    assert "|\n\n|" not in md  # markdown tables without blank lines inside
    for plot in ("fst_metrics", "grid", "memorisation"):
        assert (out / report.plots[plot]).is_file() and f"]({report.plots[plot]})" in md


@needs_pipeline
def test_missing_weights_are_all_named_before_anything_runs(tmp_path: Path, sets: dict[str, Path]) -> None:
    with pytest.raises(ProblemsError) as info:
        evaluate(sets["heldout"], sets["synthetic"], weights=Weights.under(tmp_path / "empty"), out_dir=tmp_path / "r")
    text = "\n".join(info.value.problems)
    assert f"{tmp_path}/empty/{networks.INCEPTION_FILE}: missing" in text
    assert f"{tmp_path}/empty/lpips/{networks.ALEXNET_FILE}: missing" in text
    assert f"{tmp_path}/empty/clip/config.json: missing" in text
    assert "--skip fid,lpips,clip,memorisation" in text
    assert not (tmp_path / "r").exists()


@needs_pipeline
def test_skipping_every_network_still_reports_counts(tmp_path: Path, sets: dict[str, Path]) -> None:
    report = evaluate(sets["heldout"], sets["synthetic"], weights=Weights.under(tmp_path), out_dir=tmp_path, options=Options(enabled=()))
    assert report.rows[0]["n_synthetic"] == 12 and report.rows[0]["kid"] is None and report.memorisation is None
    assert "Not checked." in (tmp_path / "t.md").read_text()


def test_bad_held_out_rows_are_reported_together(tmp_path: Path) -> None:
    folder = tmp_path / "h"
    folder.mkdir()
    Image.fromarray(random_images(1)[0]).save(folder / "a.png")
    (folder / "metadata.csv").write_text("image,diagnosis,fitzpatrick\na.png,nevus,3\nb.png,nevus,2\na.png,nevus,9\n")
    with pytest.raises(ProblemsError) as info:
        read_real(folder)
    assert info.value.problems == [
        f"line 3: image b.png not found under {folder}",
        "line 4: fitzpatrick '9' is not a skin type (I–VI, 1–6, 12/34/56)",
    ]
    (folder / "metadata.csv").write_text("image,dx\na.png,nevus\n")
    with pytest.raises(DermkohyaError, match="missing column\\(s\\) diagnosis, fitzpatrick"):
        read_real(folder)


@needs_pipeline
def test_cli_evaluate(tmp_path: Path, sets: dict[str, Path], weights: Path) -> None:
    from dermkohya.cli import main

    args = ["evaluate", "--real", str(sets["heldout"]), "--synthetic", str(sets["synthetic"]), "--out", str(tmp_path)]
    ok = CliRunner().invoke(main, [*args, "--weights", str(weights), "--skip", "lpips"])
    assert ok.exit_code == 0, ok.output
    assert "12 synthetic vs 12 real" in ok.output and "flagged as memorised" in ok.output and (tmp_path / "t.md").is_file()
    missing = CliRunner().invoke(main, [*args, "--weights", str(tmp_path / "none"), "--skip", "lpips,clip,memorisation"])
    assert missing.exit_code == 1 and networks.INCEPTION_FILE in missing.output and "--skip fid" in missing.output
    bad = CliRunner().invoke(main, [*args, "--skip", "fidd"])
    assert bad.exit_code == 2 and "unknown metric(s) fidd" in bad.output


# --- without torch: the record, its markdown, and a metric added through the registry ----------------------


def write_synthetic(folder: Path, cells: list[tuple[str, str]], per_cell: int = 2) -> Path:
    """A set laid out as `dermkohya generate` writes it: <diagnosis>/<fst>/<n>.png and index.csv."""
    images = iter(random_images(len(cells) * per_cell, 48, seed=30))
    folder.mkdir(parents=True)
    with (folder / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "diagnosis", "fst", "prompt", "rejected_attempts"])
        for n, (diagnosis, fst) in enumerate(c for c in cells for _ in range(per_cell)):
            rel = f"{diagnosis}/{fst}/{n}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(next(images)).save(folder / rel)
            writer.writerow([rel, diagnosis, fst, f"{diagnosis}, Fitzpatrick {fst}", n % 2])
    return folder


def test_markdown_table_columns_come_from_the_registry(tmp_path: Path) -> None:
    row = {"group": "overall", "label": "all", "diagnosis": None, "fst": None, "n_real": 4, "n_synthetic": 3, "fid": None, "kid": 0.01234,
           "kid_std": 0.0011, "lpips_to_real": 0.4, "lpips_diversity": None, "clip_score": 30.123, "clip_score_real": None,
           "clip_diversity": 0.2, "clip_diversity_real": 0.25, "rejection_rate": 0.0, "memorised": 2,
           "ita_median": 40.0, "ita_median_real": None, "ita_agreement": 0.5, "kid_ci": [0.001, 0.0234]}  # fmt: skip
    report = EvaluationReport(
        plan="t", synthetic="synthetic/t", real="r", train=None, created="now", dermkohya_version="0", base_model=None, loras=[],
        metrics=["fid"], weights={}, options={"min_fid": 7}, device="cpu", rows=[row], memorisation=None, plots={"grid": "t/grid.png"}, notes=[],
    )  # fmt: skip
    json_path, md_path = report.write_files(tmp_path)
    md = md_path.read_text()
    assert ("| overall | real | synthetic | FID ↓ | KID ↓ (± sd) | LPIPS to real ↓ | LPIPS diversity ↑ | CLIP score ↑ (real) | "
            "CLIP diversity ↑ (real) | ITA° (real) | ITA ±1 class | rejected | memorised |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            "| all | 4 | 3 | – | 0.0123 ± 0.0011 [0.0010, 0.0234] | 0.400 | – | 30.12 (–) | 0.200 (0.250) | 40.0 (–) | 0.50 | 0.000 | 2 |\n") in md  # fmt: skip
    assert "both sides have at least\n  7; KID" in md and '- "rejected" is the share' in md
    assert EvaluationReport.read(json_path) == report and report.headline() == {"kid": 0.01234, "lpips_to_real": 0.4, "clip_score": 30.123}
    (tmp_path / "plan.json").write_text('{"format": "dermkohya.plan/1"}')
    with pytest.raises(RecordError, match=r"plan.json: a plan record, not a evaluation record .*re-run `dermkohya evaluate`"):
        EvaluationReport.read(tmp_path / "plan.json")


class Brightness(Metric):
    """What a new metric file holds: mean luma of the row's synthetic images, the real ones as baseline."""

    name, skip, help, position = "brightness", "toy", "mean luma of the images", 65
    columns = (Column("brightness", "brightness ↑ (real)", baseline="brightness_real", plot="brightness ↑"),)
    reading = "brightness is the mean Rec. 601 luma; `lpips_size` was {lpips_size}."

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        def luma(images: list[Any], members: list[int]) -> float | None:
            return float(np.mean([quality.luminance(np.asarray(Image.open(images[i].path))).mean() for i in members])) if members else None

        real = luma(ev.real, group.real)  # a numpy scalar, as metric code often returns: the report takes it as a number
        return {"brightness": luma(ev.synthetic, group.synthetic), "brightness_real": None if real is None else np.float32(real)}


@pytest.fixture
def brightness() -> Any:
    registry.register(Brightness())
    yield
    registry.unregister("brightness")


def test_a_metric_added_in_one_file_reaches_rows_markdown_plot_and_skip(tmp_path: Path, brightness: None) -> None:
    cells = [("melanoma", "I"), ("melanoma", "VI"), ("nevus", "I")]
    synthetic = write_synthetic(tmp_path / "synthetic" / "s", cells)
    heldout = write_split(tmp_path / "prepared" / "heldout", [("Melanoma", "1"), ("Melanoma", "6"), ("nevus", "1")] * 2, seed=10)
    assert "toy" in Options().enabled and "brightness" in registry.row_keys()
    report = evaluate(heldout, synthetic, weights=Weights.under(tmp_path / "none"), out_dir=tmp_path / "r", options=Options(enabled=("toy",)), device="cpu")
    rows = {r["label"]: r for r in report.rows}
    assert 0 < rows["all"]["brightness"] < 1 and 0 < rows["FST VI"]["brightness_real"] < 1 and rows["all"]["kid"] is None
    assert rows["all"]["rejection_rate"] == pytest.approx(1 - 6 / 9, abs=1e-4)  # 0, 1, 0, 1, 0, 1 rejected attempts
    assert report.memorisation is None and report.notes == [] and report.weights == {}
    md = (tmp_path / "r" / "s.md").read_text()
    assert "| rejected | brightness ↑ (real) | memorised |" in md and "`lpips_size` was 256." in md
    assert (tmp_path / "r" / report.plots["fst_metrics"]).is_file()
    skipped = evaluate(heldout, synthetic, weights=Weights.under(tmp_path / "none"), out_dir=tmp_path / "r2", options=Options(enabled=()), device="cpu")
    assert skipped.rows[0]["brightness"] is None

    from dermkohya.cli import main

    assert "toy (brightness)" in " ".join(CliRunner().invoke(main, ["evaluate", "--help"]).output.split())  # wrapped anywhere
