"""Each public metadata layout normalises to the same records; every malformed row is named."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dermkohya import importers
from dermkohya.errors import DermkohyaError
from dermkohya.importers import SourceOptions, load_records
import _layouts


def _options(layout: _layouts.Layout) -> SourceOptions:
    import tomllib

    source = tomllib.loads(layout.recipe.read_text())["source"]
    root = layout.recipe.parent
    return SourceOptions(
        format=source["format"], metadata=root / source["metadata"], images=root / source.get("images", "."),
        labels=root / source["labels"] if "labels" in source else None, columns=source.get("columns", {}))


@pytest.mark.parametrize("name", sorted(_layouts.LAYOUTS))
def test_every_layout_normalises_to_records(tmp_path: Path, name: str) -> None:
    layout = _layouts.LAYOUTS[name](tmp_path)
    result = load_records(_options(layout))
    assert result.problems == []
    assert len(result.records) == layout.images
    assert sum(result.skipped.values()) == layout.skipped
    assert {r.diagnosis for r in result.records} == layout.diagnoses
    assert {r.fst for r in result.records} == layout.fsts
    for record in result.records:
        assert record.image.is_file() and record.image.is_relative_to(tmp_path)
        assert record.source == importers.DISPLAY_NAMES[name]
        assert record.licence and record.group


def test_fitzpatrick17k_codes_and_partitions(tmp_path: Path) -> None:
    layout = _layouts.fitzpatrick17k(tmp_path)
    records = load_records(_options(layout)).records
    by_line = {r.line: r for r in records}
    assert by_line[2].fst == "I" and by_line[7].fst == "VI"  # line 2 is the first data row (scale 1)
    assert by_line[10].fst == "unknown"  # fitzpatrick_scale -1
    options = _options(layout)
    three = load_records(SourceOptions(**{**options.__dict__, "label": "three_partition_label"})).records
    assert {r.diagnosis for r in three} == {"non-neoplastic", "malignant"}


def test_ddi_keeps_grouped_skin_tones_and_can_label_malignancy(tmp_path: Path) -> None:
    layout = _layouts.ddi(tmp_path)
    options = _options(layout)
    records = load_records(options).records
    assert Counter(r.fst for r in records) == {"I-II": 10, "III-IV": 10, "V-VI": 10}  # never split into single types
    malignant = load_records(SourceOptions(**{**options.__dict__, "label": "malignant"})).records
    assert Counter(r.diagnosis for r in malignant) == {"malignant": 10, "benign": 20}


def test_isic_falls_back_to_shallower_diagnosis_and_keeps_each_images_licence(tmp_path: Path) -> None:
    records = load_records(_options(_layouts.isic(tmp_path))).records
    by_id = {r.image.stem: r for r in records}
    assert by_id["ISIC_0000009"].diagnosis == "Malignant"  # diagnosis_3 empty → diagnosis_1
    assert by_id["ISIC_0000001"].licence.startswith("ISIC Archive: CC-BY-NC")
    assert by_id["ISIC_0000000"].group == by_id["ISIC_0000001"].group == "IL_0000000"  # one lesion, two images


def test_pad_ufes_finds_images_in_part_folders_and_reads_the_misspelt_column(tmp_path: Path) -> None:
    records = load_records(_options(_layouts.pad_ufes_20(tmp_path))).records
    assert {r.image.parent.name for r in records} == {"imgs_part_1", "imgs_part_2", "imgs_part_3"}
    assert Counter(r.fst for r in records)["unknown"] == 3  # empty `fitspatrick`


def test_scin_joins_labels_takes_the_top_weighted_condition_and_expands_images(tmp_path: Path) -> None:
    layout = _layouts.scin(tmp_path)
    result = load_records(_options(layout))
    assert result.skipped == {"SCIN case without a dermatologist label": layout.skipped}
    per_case = Counter(r.group for r in result.records)
    assert max(per_case.values()) == 3  # image_1..3_path of one case
    assert {r.diagnosis for r in result.records if r.group.endswith("1")} == {"Eczema"}


def test_ham10000_records_no_skin_type(tmp_path: Path) -> None:
    result = load_records(_options(_layouts.ham10000(tmp_path)))
    assert {r.fst for r in result.records} == {"unknown"}
    assert any("no skin type" in note for note in result.notes)


def _generic_csv(tmp_path: Path, rows: list[list[str]], header: tuple[str, ...] = ("image", "diagnosis", "fitzpatrick")) -> SourceOptions:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _layouts.write_image(tmp_path / name, len(name))
    _layouts.write_csv(tmp_path / "meta.csv", list(header), rows)
    return SourceOptions(format="generic", metadata=tmp_path / "meta.csv", images=tmp_path)


def test_malformed_rows_are_all_named_with_line_and_column(tmp_path: Path) -> None:
    options = _generic_csv(tmp_path, [
        ["a.jpg", "eczema", "III"],
        ["b.jpg", "eczema", "7"],          # line 3: unknown skin-type code
        ["missing.jpg", "eczema", "II"],   # line 4: missing image
        ["a.jpg", "eczema", "III"],        # line 5: duplicate of line 2
        ["c.jpg", "", "IV"],               # line 6: no diagnosis
    ])
    problems = load_records(options).problems
    assert len(problems) == 4
    assert any("line 3, column `fitzpatrick`" in p and "`7`" in p for p in problems)
    assert any("line 4, column `image`" in p and "missing.jpg" in p for p in problems)
    assert any("line 5" in p and "line 2" in p and "duplicate" in p for p in problems)
    assert any("line 6, column `diagnosis`" in p for p in problems)


def test_missing_column_names_the_nearest_one(tmp_path: Path) -> None:
    options = _generic_csv(tmp_path, [["a.jpg", "eczema", "III"]], header=("image", "diagnosis", "fitzpatric"))
    problems = load_records(options).problems
    assert problems == ["meta.csv: missing column `fitzpatrick` (did you mean `fitzpatric`?)"]


def test_ragged_rows_and_missing_images_can_be_skipped(tmp_path: Path) -> None:
    options = _generic_csv(tmp_path, [["a.jpg", "eczema", "III", "extra"], ["gone.jpg", "eczema", "I"]])
    assert any("line 2: 4 fields, the header has 3" in p for p in load_records(options).problems)
    options = _generic_csv(tmp_path, [["a.jpg", "eczema", "III"], ["gone.jpg", "eczema", "I"]])
    skipping = load_records(SourceOptions(**{**options.__dict__, "missing_images": "skip"}))
    assert skipping.problems == [] and len(skipping.records) == 1
    assert skipping.skipped == {"image file missing": 1}


def test_a_layout_code_outside_its_vocabulary_is_an_error(tmp_path: Path) -> None:
    layout = _layouts.ddi(tmp_path, rows=3)
    text = layout.recipe.parent.joinpath("ddi_metadata.csv").read_text().replace(",12,", ",3,", 1)
    layout.recipe.parent.joinpath("ddi_metadata.csv").write_text(text)
    problems = load_records(_options(layout)).problems
    assert len(problems) == 1 and "line 2, column `skin_tone`" in problems[0] and "12, 34 or 56" in problems[0]


def test_unreadable_files_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match="not found"):
        load_records(SourceOptions(format="generic", metadata=tmp_path / "nope.csv", images=tmp_path))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DermkohyaError, match="empty"):
        load_records(SourceOptions(format="generic", metadata=tmp_path / "empty.csv", images=tmp_path))


def test_slug_is_folder_safe() -> None:
    assert importers.slug("Melanoma, NOS") == "melanoma-nos"
    assert importers.slug("actinic keratosis / Bowen's") == "actinic-keratosis-bowen-s"


def test_every_format_module_is_registered_with_its_names_licence_and_labels() -> None:
    modules = {p.stem for p in Path(importers.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert set(importers.FORMATS) == modules == set(_layouts.LAYOUTS)  # one file per format, one fixture each
    for name, fmt in importers.FORMATS.items():
        assert fmt.name == name and fmt.display_name and fmt.licence
        assert importers.DISPLAY_NAMES[name] == fmt.display_name and importers.LICENCES[name] == fmt.licence
    assert importers.LABEL_CHOICES["ddi"] == ("disease", "malignant")


def test_a_registered_format_is_a_recipe_format_without_other_edits(tmp_path: Path) -> None:
    from dermkohya import prepare
    from dermkohya.errors import ProblemsError

    @importers.register("test_tabs", display_name="Tab test", licence="test only", labels=("dx",))
    def read(table: importers.Table, rows: importers.Rows) -> None:
        for line, row in table.rows:
            rows.add(line, rows.image(line, "file", row["file"]), row["dx"], "III", row["file"])

    try:
        layout = _layouts.generic(tmp_path, {"I": 2})
        (tmp_path / "tabs.csv").write_text("file,dx\n" + "".join(f"{r.image.name},eczema\n"
                                           for r in load_records(_options(layout)).records))
        text = layout.recipe.read_text()
        start = text.index("[source]")
        end = next(i for i in range(start + 1, len(text)) if text.startswith("\n[", i) and not text.startswith("\n[source", i))
        layout.recipe.write_text(text[:start] + '[source]\nformat = "test_tabs"\nmetadata = "tabs.csv"\n'
                                 f'images = "{_options(layout).images.relative_to(tmp_path)}"\nlabel = "dx"\n' + text[end:])
        record = prepare.prepare(layout.recipe)
        assert (record.source.name, record.source.licences) == ("Tab test", {"test only": 2})
        layout.recipe.write_text(layout.recipe.read_text().replace('"test_tabs"', '"test_tab"'))
        with pytest.raises(ProblemsError, match="'test_tab' is not a source format; use one of .*test_tabs"):
            prepare.load_recipe(layout.recipe)
    finally:
        importers.FORMATS.pop("test_tabs", None)
