"""The demo dataset: deterministic bytes, idempotent, refuses folders it did not make."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermkohya import dataset
from dermkohya.demo import DIAGNOSES, MARKER, make_demo_dataset
from dermkohya.errors import DermkohyaError
from dermkohya.skin import FST_TYPES, fst_from_caption

SMALL = {"per_cell": 1, "size": 64}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_captions_and_metadata(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", per_cell=2, size=64)
    assert root == tmp_path / "demo"
    images = sorted((root / "1_derm").glob("demo_*.png"))
    assert len(images) == len(DIAGNOSES) * len(FST_TYPES) * 2
    with open(root / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {"image", "diagnosis", "fitzpatrick"} <= set(rows[0])
    assert [r["image"] for r in rows] == [f"1_derm/{p.name}" for p in images]
    for row in rows:
        caption = (root / row["image"]).with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert row["diagnosis"] in caption and "synthetic" in caption
        assert fst_from_caption(caption) == row["fitzpatrick"]
        with Image.open(root / row["image"]) as picture:
            assert picture.size == (64, 64) and picture.mode == "RGB"
    assert {(r["diagnosis"], r["fitzpatrick"]) for r in rows} == {(d, f) for d in DIAGNOSES for f in FST_TYPES}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = files(make_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = files(make_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = files(make_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys() and a["1_derm/demo_0000.png"] != c["1_derm/demo_0000.png"]
    assert a["1_derm/demo_0000.txt"] == c["1_derm/demo_0000.txt"]


def test_png_carries_no_timestamp(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    data = (root / "1_derm" / "demo_0000.png").read_bytes()
    assert b"tIME" not in data and b"tEXt" not in data


def test_skin_tones_darken_from_type_i_to_vi(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    with open(root / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["diagnosis"] == "pustule-like dots"]
    corners = []
    for row in sorted(rows, key=lambda r: FST_TYPES.index(r["fitzpatrick"])):
        pixels = np.asarray(Image.open(root / row["image"]), dtype=np.float32)
        corners.append(pixels[:12, :12].mean())  # background skin, away from lesion and label
    assert corners == sorted(corners, reverse=True) and corners[0] - corners[-1] > 100


def test_rerun_is_a_no_op(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    make_demo_dataset(root, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_rerun_repairs_its_own_missing_file(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    before = files(root)
    (root / "1_derm" / "demo_0005.png").unlink()
    (root / "1_derm" / "demo_0006.txt").write_text("edited")
    make_demo_dataset(root, **SMALL)
    assert files(root) == before


def test_interrupted_run_is_finished_not_refused(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    before = files(root)
    marker = root / MARKER
    marker.write_text(marker.read_text().replace('"files": {', '"files_": {'))  # as after a crash mid-way
    make_demo_dataset(root, **SMALL)
    assert files(root) == before


def test_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "patient.jpg").write_bytes(b"not yours")
    with pytest.raises(DermkohyaError, match=str(foreign)):
        make_demo_dataset(foreign, **SMALL)
    assert files(foreign) == {"patient.jpg": b"not yours"}


def test_refuses_other_parameters(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    before = files(root)
    with pytest.raises(DermkohyaError, match="seed"):
        make_demo_dataset(root, seed=1, per_cell=1, size=64)
    assert files(root) == before


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    make_demo_dataset(tmp_path / "demo", **SMALL)
    assert len(dataset.find_subsets(tmp_path / "demo")[0].images) == 18
