"""`dermkohya prepare`: recipes, balancing, image preparation, the split, idempotence, and the checker's verdict."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import _layouts
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms

from dermkohya import dataset, demo, prepare
from dermkohya.cli import main
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.skin import FST_TYPES

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the dermkohya checkout, itself a project

SKEWED = {"I": 21, "II": 21, "III": 7, "IV": 7, "V": 1, "VI": 1}  # 72 % FST I–II, 3.4 % FST V–VI
NO_SPLIT = "[split]\nheldout = 0\n"


def _flat(text: str) -> str:
    """CLI output without rich's line wrapping."""
    return " ".join(text.split())


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _expected_caption(diagnosis: str, fst: str) -> str:
    """The default template, spelt out independently of jinja."""
    return f"clinical dermatology photograph, {diagnosis}" + (f", Fitzpatrick skin type {fst}" if fst != "unknown" else "")


def _effective_shares(train_dir: Path) -> dict[str, float]:
    """Effective share per skin type as the checker reads the folders kohya will train on."""
    report = dataset.scan(train_dir, resolution=(_layouts.RESOLUTION,) * 2)
    effective = {k: v["effective"] for k, v in report.fst_counts.items() if k != "unknown" and v["effective"]}
    total = sum(effective.values())
    return {k: v / total for k, v in effective.items()}


# --- every layout → kohya folders the checker accepts ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(_layouts.LAYOUTS))
def test_every_layout_prepares_into_folders_the_checker_accepts(tmp_path: Path, name: str) -> None:
    layout = _layouts.LAYOUTS[name](tmp_path)
    record = prepare.prepare(layout.recipe)
    root = layout.recipe.parent
    train, heldout = root / record.train_data_dir, root / record.heldout_dir
    for folder in (train, heldout) if record.split.heldout_images else (train,):
        report = dataset.scan(folder, resolution=(_layouts.RESOLUTION,) * 2, decode=True)
        assert not report.has_errors(strict=True), [(p.code, p.message) for p in report.problems]
    assert record.content_hash == dataset.content_hash(train)
    assert record.split.train_images + record.split.heldout_images == layout.images
    assert sum(n for row in record.counts_before.values() for n in row.values()) == record.split.train_images

    rows = list(csv.DictReader((train / "metadata.csv").open(encoding="utf-8")))
    assert len(rows) == record.split.train_images
    for row in rows:
        image = train / row["image"]
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == _expected_caption(row["diagnosis"], row["fitzpatrick"]) + "\n"
        with Image.open(image) as img:
            assert img.size == (_layouts.RESOLUTION,) * 2 and img.mode == "RGB" and not img.getexif()
        repeats = int(image.parent.name.split("_", 1)[0])
        assert record.repeats[image.parent.name] == repeats
        assert record.counts_after[row["diagnosis"]][row["fitzpatrick"]] % repeats == 0

    kohya_toml = tomllib.loads((root / record.kohya_dataset_config).read_text())
    assert kohya_toml["general"]["caption_extension"] == ".txt"
    assert {Path(s["image_dir"]).name: s["num_repeats"] for s in kohya_toml["datasets"][0]["subsets"]} == record.repeats
    assert prepare.load_prepared(root) == record


def test_the_demo_recipe_prepares_the_demo_data(tmp_path: Path) -> None:
    recipe = tmp_path / "demo" / "dataset.toml"
    recipe.parent.mkdir()
    shutil.copy(PROJECT_ROOT / "datasets" / "demo" / "dataset.toml", recipe)
    demo.make_demo_dataset(recipe.parent / "source", size=64, per_cell=4)  # as datasets/demo/README.md says
    record = prepare.prepare(recipe)
    assert record.balance.policy == "fst" and record.balance.within_tolerance
    assert record.split.heldout_images == 18 and record.resolution == (512, 512)  # one per cell
    report = dataset.scan(recipe.parent / record.train_data_dir, resolution=(512, 512))
    assert not report.has_errors()
    assert {fst for fst, c in report.fst_counts.items() if c["images"]} == set(FST_TYPES)


# --- balancing ---------------------------------------------------------------------------------------------


def test_skewed_fixture_ends_within_five_percent_of_equal_shares_on_disk(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, SKEWED, rest=NO_SPLIT)
    record = prepare.prepare(layout.recipe)
    assert record.balance.within_tolerance and record.balance.unreachable == []
    shares = _effective_shares(tmp_path / record.train_data_dir)
    assert set(shares) == set(FST_TYPES)
    for fst, share in shares.items():
        assert abs(share * 6 - 1) <= 0.05 + 1e-9, (fst, share)  # the edge counts as within
    assert max(record.repeats.values()) <= 20


def test_skewed_fixture_reports_why_a_capped_target_is_unreachable(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, SKEWED, rest=NO_SPLIT + "[balance]\nmax_repeats = 10\n")
    result = CliRunner().invoke(main, ["prepare", str(layout.recipe)])
    assert result.exit_code == 0, result.output
    record = prepare.Prepared.read(tmp_path / "prepared.json")
    unreachable = record.balance.unreachable
    assert not record.balance.within_tolerance
    assert {line.split(":")[0] for line in unreachable} >= {"V", "VI"}
    assert all("max_repeats" in line for line in unreachable)
    assert "10 repeats (balance.max_repeats)" in _flat(result.output)
    assert "I, II, III, IV are balanced among themselves" in _flat(result.output)
    assert max(record.repeats.values()) == 10


def test_explicit_shares_from_the_fairskin_plan() -> None:
    counts = {("melanoma", "I"): 400, ("melanoma", "II"): 400, ("melanoma", "III"): 200, ("melanoma", "IV"): 210,
              ("melanoma", "V"): 45, ("melanoma", "VI"): 40}
    shares = {"I": 10, "II": 10, "III": 15, "IV": 15, "V": 25, "VI": 25}
    plan = prepare.plan_balance(counts, "shares", shares=shares, max_repeats=40)
    assert plan.within_tolerance
    for fst, target in shares.items():
        assert abs(plan.achieved[fst] / (target / 100) - 1) <= 0.05
        assert plan.achieved[fst] == pytest.approx(counts[("melanoma", fst)] * plan.repeats[("melanoma", fst)]
                                                   / sum(n * plan.repeats[c] for c, n in counts.items()))


def test_fst_x_diagnosis_balances_every_cell_and_names_empty_ones() -> None:
    counts = {(d, f): n for d, base in (("eczema", 40), ("melanoma", 12)) for f, n in zip(FST_TYPES, (base, base, 20, 10, 4, 0))}
    plan = prepare.plan_balance(counts, "fst_x_diagnosis", max_repeats=20)
    assert set(plan.achieved) == {f"{d} × {f}" for d in ("eczema", "melanoma") for f in FST_TYPES[:5]}
    assert all(abs(s / plan.target[c] - 1) <= 0.05 + 1e-9 for c, s in plan.achieved.items())
    assert sorted(line.split(":")[0] for line in plan.unreachable) == ["eczema × VI", "melanoma × VI"]


def test_grouped_skin_tones_are_balanced_as_groups() -> None:
    counts = {("melanoma", "I-II"): 60, ("melanoma", "III-IV"): 30, ("melanoma", "V-VI"): 12, ("nevus", "unknown"): 5}
    plan = prepare.plan_balance(counts, "fst")
    assert set(plan.target) == {"I-II", "III-IV", "V-VI"} and plan.within_tolerance
    assert plan.repeats[("nevus", "unknown")] == 1 and any("unknown skin type" in n for n in plan.notes)
    # Single types in the same data are folded into their group for balancing, never the reverse.
    mixed = prepare.plan_balance({**counts, ("melanoma", "II"): 10}, "fst")
    assert set(mixed.target) == {"I-II", "III-IV", "V-VI"}
    assert mixed.repeats[("melanoma", "II")] == mixed.repeats[("melanoma", "I-II")]


def test_policy_none_and_no_known_skin_type() -> None:
    counts = {("melanoma", "I"): 10, ("melanoma", "VI"): 1}
    none = prepare.plan_balance(counts, "none")
    assert set(none.repeats.values()) == {1} and none.unreachable == []
    unknown = prepare.plan_balance({("melanoma", "unknown"): 10}, "fst")
    assert unknown.repeats == {("melanoma", "unknown"): 1} and not unknown.within_tolerance and unknown.unreachable


def test_subsets_take_neighbouring_repeats_where_one_per_skin_type_is_too_coarse() -> None:
    # a typical skew (25/30/22/13/6/4 %) over five diagnoses: one repeat per skin type cannot land
    # within ±5 % under the cap, one of two neighbouring repeats per subset can
    base = {"I": 903, "II": 1086, "III": 780, "IV": 471, "V": 214, "VI": 150}
    counts = {(d, f): n + 7 * i for i, d in enumerate("abcde") for f, n in base.items()}
    merged = prepare.plan_balance({("all", f): sum(counts[(d, f)] for d in "abcde") for f in base}, "fst")
    assert not merged.within_tolerance
    plan = prepare.plan_balance(counts, "fst")
    assert plan.within_tolerance and plan.unreachable == []
    for fst in base:
        steps = {plan.repeats[(d, fst)] for d in "abcde"}
        assert max(steps) - min(steps) <= 1
    assert max(plan.repeats.values()) <= 20


def test_repeats_are_integers_within_the_cap_and_claims_hold() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        diagnoses = [f"d{i}" for i in range(1 + trial % 4)]
        counts = {(d, f): int(n) for d in diagnoses for f, n in zip(FST_TYPES, rng.integers(1, 400, 6))}
        cap = int(rng.integers(1, 30))
        plan = prepare.plan_balance(counts, "fst", max_repeats=cap)
        assert all(isinstance(r, int) and 1 <= r <= cap for r in plan.repeats.values())
        effective = {f: sum(counts[(d, f)] * plan.repeats[(d, f)] for d in diagnoses) for f in FST_TYPES}
        worst = max(abs(e / sum(effective.values()) * 6 - 1) for e in effective.values())
        assert plan.within_tolerance == (worst <= 0.05 + 1e-9) == (not plan.unreachable)
        assert all(plan.achieved[f] == pytest.approx(e / sum(effective.values())) for f, e in effective.items())


# --- malformed inputs: one report, exit 1, nothing written --------------------------------------------------


def test_malformed_csv_gives_one_report_exit_1_and_writes_nothing(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, {"I": 3, "II": 3})
    table = tmp_path / "data" / "table.csv"
    rows = list(csv.reader(table.open()))
    rows[2][2] = "VII"                 # line 3: unknown skin-type code
    rows[3][0] = "photos/nowhere.jpg"  # line 4: missing image
    rows.append(rows[1])               # line 8: duplicate of line 2
    _layouts.write_csv(table, rows[0], rows[1:])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["prepare", str(layout.recipe)])
    output = _flat(result.output)
    assert result.exit_code == 1
    assert "3 problem(s)" in output
    assert "line 3, column `skin`" in output and "`VII`" in output
    assert "line 4, column `file`" in output and "nowhere.jpg" in output
    assert "line 8: image `img_0004.jpg` is already listed on line 2" in output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

    _layouts.write_csv(table, ["file", "dx", "skin_type", "patient"], rows[1:2])
    result = CliRunner().invoke(main, ["prepare", str(layout.recipe)])
    assert result.exit_code == 1 and "missing column `skin`" in _flat(result.output)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_undecodable_image_is_reported_and_nothing_is_left_behind(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, {"I": 3, "II": 3})
    (tmp_path / "data" / "photos" / "eczema" / "img_0002.jpg").write_bytes(b"not an image")
    with pytest.raises(ProblemsError) as caught:
        prepare.prepare(layout.recipe)
    assert len(caught.value.problems) == 1 and "img_0002.jpg" in caught.value.problems[0]
    assert not (tmp_path / "prepared").exists() and not (tmp_path / ".prepared.tmp").exists()
    assert not (tmp_path / "prepared.json").exists()


def test_recipe_problems_are_reported_together_with_the_nearest_key(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, {"I": 2})
    text = layout.recipe.read_text().replace("[images]", "[images]\nresize = \"squash\"\nresolutoin = 128")
    text += '\n[balance]\npolcy = "fst"\n[caption]\ntemplate = "{{ diagnosis }} on {{ skin }}"\n'
    layout.recipe.write_text(text)
    with pytest.raises(ProblemsError) as caught:
        prepare.load_recipe(layout.recipe)
    problems = "\n".join(caught.value.problems)
    lines = layout.recipe.read_text().splitlines()  # the one TOML loader (schema.py): keys with their lines
    at = {key: lines.index(next(row for row in lines if row.startswith(key))) + 1 for key in ("resolutoin", "polcy", "resize")}
    assert f"unknown key `[images] resolutoin` (line {at['resolutoin']}): did you mean `resolution`?" in problems
    assert f"unknown key `[balance] polcy` (line {at['polcy']}): did you mean `policy`?" in problems
    assert f"`[images] resize` (line {at['resize']})" in problems and "squash" in problems
    assert len(caught.value.problems) == 3  # the template is checked once the schema is valid
    layout.recipe.write_text(layout.recipe.read_text().replace("resize = \"squash\"\nresolutoin = 128", "")
                             .replace("polcy", "policy"))
    with pytest.raises(ProblemsError, match="'skin' is undefined; the variables are diagnosis, fst, source, extra"):
        prepare.load_recipe(layout.recipe)


def test_recipe_cross_checks(tmp_path: Path) -> None:
    layout = _layouts.ddi(tmp_path, rows=3)
    layout.recipe.write_text(layout.recipe.read_text().replace(
        'images = "images"', 'images = "images"\nlabel = "label"\nlabels = "x.csv"') +
        "[balance]\npolicy = \"shares\"\nshares = { I = 10, II = 10 }\n")
    with pytest.raises(ProblemsError) as caught:
        prepare.load_recipe(layout.recipe)
    problems = "\n".join(caught.value.problems)
    assert "`source.label` = 'label': one of disease, malignant" in problems
    assert "`source.labels` is only for format = \"scin\"" in problems
    assert "lacks III, IV, V, VI" in problems


def test_diagnosis_filter_and_rename(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, rest=NO_SPLIT + '[diagnoses]\ninclude = ["melanoma"]\nrename = { melanoma = "malignant melanoma" }\n')
    record = prepare.prepare(layout.recipe)
    assert list(record.counts_before) == ["malignant melanoma"]
    assert record.source.skipped == {"diagnosis filtered out by the recipe": 15}
    layout.recipe.write_text(layout.recipe.read_text().replace('include = ["melanoma"]', 'include = ["melanomma"]'))
    with pytest.raises(ProblemsError, match="'melanomma' is not a diagnosis in table.csv \\(nearest: 'melanoma'\\)"):
        prepare.prepare(layout.recipe)


# --- images ---------------------------------------------------------------------------------------------------


def test_images_are_oriented_converted_stripped_or_hard_linked_and_sources_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)  # left half red: top half once EXIF orientation 6 (90° clockwise) is applied
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "patient 1234, clinic X"  # ImageDescription: must not reach the prepared copy
    Image.fromarray(pixels).save(data / "rotated.jpg", quality=95, exif=exif.tobytes())
    del exif[0x0112]
    Image.fromarray(pixels).save(data / "described.jpg", quality=95, exif=exif.tobytes(), comment=b"clinic X")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(pixels).save(data / "profiled.jpg", quality=95, icc_profile=srgb)
    Image.new("RGBA", (40, 80), (0, 0, 0, 0)).save(data / "transparent.png")
    Image.new("L", (40, 80), 128).save(data / "grey.png")
    Image.new("RGB", (40, 80), (10, 200, 30)).save(data / "clean.png")
    _layouts.write_csv(data / "meta.csv", ["image", "diagnosis", "fitzpatrick"],
                       [[n, "eczema", "III"] for n in ("rotated.jpg", "described.jpg", "profiled.jpg", "transparent.png", "grey.png", "clean.png")])
    recipe = _layouts.write_recipe(tmp_path, 'format = "generic"\nmetadata = "data/meta.csv"', NO_SPLIT + "[balance]\npolicy = \"none\"\n")
    recipe.write_text(recipe.read_text().replace("resolution = 64", "resolution = 64\nresize = \"none\""))
    sources = _snapshot(data)
    record = prepare.prepare(recipe)
    assert _snapshot(data) == sources
    folder = tmp_path / record.train_data_dir / "1_eczema_fst-iii"
    with Image.open(folder / "rotated.jpg") as img:
        assert img.size == (40, 80) and not img.getexif() and "icc_profile" not in img.info
        assert img.getpixel((20, 5))[0] > 200 and img.getpixel((20, 75))[2] > 200
    with Image.open(folder / "described.jpg") as img:
        assert not img.getexif() and "comment" not in img.info and img.getpixel((5, 20))[0] > 200
    assert b"clinic X" not in (folder / "described.jpg").read_bytes()
    with Image.open(folder / "profiled.jpg") as img:
        assert "icc_profile" not in img.info
    with Image.open(folder / "transparent.png") as img:
        assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    with Image.open(folder / "grey.png") as img:
        assert img.mode == "RGB" and img.getpixel((0, 0)) == (128, 128, 128)
    assert os.stat(folder / "clean.png").st_ino == os.stat(data / "clean.png").st_ino
    assert record.images == {"linked": 1, "written": 5}


def test_crop_and_fit_policies(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, {"I": 2}, rest=NO_SPLIT)
    _layouts.write_image(tmp_path / "data" / "photos" / "eczema" / "img_0000.jpg", 1, size=(200, 100))
    record = prepare.prepare(layout.recipe)
    sizes = {p.name: Image.open(p).size for p in (tmp_path / record.train_data_dir).rglob("*.jpg")}
    assert sizes == {"img_0000.jpg": (64, 64), "img_0001.jpg": (64, 64)}
    layout.recipe.write_text(layout.recipe.read_text().replace("resolution = 64", "resolution = 64\nresize = \"fit\""))
    record = prepare.prepare(layout.recipe)
    sizes = {p.name: Image.open(p).size for p in (tmp_path / record.train_data_dir).rglob("*.jpg")}
    assert sizes == {"img_0000.jpg": (64, 32), "img_0001.jpg": (64, 48)}
    kohya_toml = tomllib.loads((tmp_path / record.kohya_dataset_config).read_text())
    assert kohya_toml["general"]["enable_bucket"] is True  # one renderer with the run's: half to twice the size
    assert (kohya_toml["general"]["min_bucket_reso"], kohya_toml["general"]["max_bucket_reso"]) == (64, 128)


# --- the held-out split ------------------------------------------------------------------------------------------


def test_heldout_split_is_stratified_grouped_and_described(tmp_path: Path) -> None:
    layout = _layouts.ham10000(tmp_path, rows=40)  # lesion pairs: two images of one lesion stay together
    layout.recipe.write_text(layout.recipe.read_text() + "[split]\nheldout = 0.35\nseed = 3\n")
    record = prepare.prepare(layout.recipe)
    heldout = tmp_path / record.heldout_dir
    rows = list(csv.DictReader((heldout / "metadata.csv").open(encoding="utf-8")))
    assert len(rows) == record.split.heldout_images == 14  # round(0.35 × 20 lesions) = 7 lesions
    assert {r["image"] for r in rows} == {p.relative_to(heldout).as_posix() for p in heldout.rglob("*.jpg")}
    assert {r["diagnosis"] for r in rows} == layout.diagnoses  # every diagnosis is represented
    train_rows = list(csv.DictReader((tmp_path / record.train_data_dir / "metadata.csv").open(encoding="utf-8")))
    lesion = {r["source_image"]: r["source_line"] for r in rows}
    lines_held = {int(r["source_line"]) for r in rows}
    lines_train = {int(r["source_line"]) for r in train_rows}
    for line in lines_held:  # rows 2k and 2k+1 are one lesion (HAM_…k)
        partner = line + 1 if line % 2 == 0 else line - 1
        assert partner not in lines_train, lesion
    assert all(n >= 1 for row in record.counts_before.values() for n in row.values())


# --- idempotence and ownership --------------------------------------------------------------------------------------


def test_prepare_is_idempotent_and_force_rebuilds_the_same_bytes(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, SKEWED)
    first = prepare.prepare(layout.recipe)
    files = _snapshot(tmp_path / "prepared")
    stamp = (tmp_path / "prepared.json").stat().st_mtime_ns
    assert prepare.prepare(layout.recipe) == first
    assert (tmp_path / "prepared.json").stat().st_mtime_ns == stamp  # up to date: nothing rewritten
    assert prepare.prepare(layout.recipe, force=True) == first
    assert _snapshot(tmp_path / "prepared") == files
    # a parallel run writes the same bytes as a serial one
    assert prepare.prepare(layout.recipe, force=True, workers=2).content_hash == first.content_hash
    assert _snapshot(tmp_path / "prepared") == files
    # a changed input rebuilds without --force
    layout.recipe.write_text(layout.recipe.read_text() + '[caption]\nextra = "clinic photo"\n')
    assert prepare.prepare(layout.recipe).content_hash != first.content_hash
    assert not any(p.name.startswith(".prepared.") for p in tmp_path.iterdir())


def test_refuses_a_non_empty_folder_it_did_not_create(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, {"I": 2})
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "mine.txt").write_text("my notes")
    with pytest.raises(DermkohyaError, match="was not made by `dermkohya prepare`"):
        prepare.prepare(layout.recipe)
    assert (tmp_path / "prepared" / "mine.txt").read_text() == "my notes"
    (tmp_path / "prepared" / "mine.txt").unlink()
    assert prepare.prepare(layout.recipe).content_hash


def test_dry_run_writes_nothing_and_load_prepared_says_what_to_run(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, SKEWED)
    result = CliRunner().invoke(main, ["prepare", "--dry-run", str(layout.recipe)])
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepared.json").exists()
    with pytest.raises(DermkohyaError, match="run `dermkohya prepare"):
        prepare.load_prepared(tmp_path)


def test_prepared_json_is_a_typed_record_and_an_old_one_is_rebuilt(tmp_path: Path) -> None:
    layout = _layouts.generic(tmp_path, {"I": 2, "V": 1})
    record = prepare.prepare(layout.recipe)
    path = tmp_path / "prepared.json"
    assert json.loads(path.read_text())["format"] == "dermkohya.prepared/2"
    assert prepare.load_prepared(layout.recipe) == record
    old = record.model_dump(mode="json") | {"format": 1}  # as dermkohya wrote it before records.py
    path.write_text(json.dumps(old, indent=2))
    with pytest.raises(DermkohyaError, match="older dermkohya .* run `dermkohya prepare"):
        prepare.load_prepared(tmp_path)
    assert prepare.prepare(layout.recipe) == record  # not up to date any more: rewritten, same content
    assert prepare.load_prepared(tmp_path) == record


@pytest.mark.kohya
def test_kohya_accepts_the_dataset_config(tmp_path: Path) -> None:
    from dermkohya import kohya

    configs = []
    for policy in ("crop", "fit"):
        layout = _layouts.generic(tmp_path / policy, {"I": 2, "V": 1})
        layout.recipe.write_text(layout.recipe.read_text().replace("resolution = 64", f"resolution = 64\nresize = \"{policy}\""))
        configs.append(str(tmp_path / policy / prepare.prepare(layout.recipe).kohya_dataset_config))
    script = ("import sys\nfrom library import config_util\n"
              "sanitizer = config_util.ConfigSanitizer(True, True, False, True)\n"
              "for path in sys.argv[1:]:\n"
              "    config = sanitizer.sanitize_user_config(config_util.load_user_config(path))\n"
              "    print(sum(s['num_repeats'] for s in config['datasets'][0]['subsets']))\n")
    done = subprocess.run([str(kohya.find_python()), "-c", script, *configs], cwd=kohya.find_sd_scripts(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [int(line) for line in done.stdout.split()[-2:]] == [
        sum(prepare.Prepared.read(Path(c).parent.parent / "prepared.json").repeats.values()) for c in configs]
