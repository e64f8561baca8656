"""dermkohya check: one test per defect class, each proving the defective file is found and named."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dermkohya import dataset
from dermkohya.cli import main
from dermkohya.demo import make_demo_dataset
from dermkohya.errors import DermkohyaError

RES = (64, 64)
CAPTION = "clinical dermatology photograph, scaly plaque, Fitzpatrick skin type III"


def image(path: Path, *, size: tuple[int, int] = RES, mode: str = "RGB", fmt: str | None = None,
          **save: object) -> Path:
    """A small noise image seeded by its path, so no two files are duplicates by accident."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size[0] * size[1] * channels, dtype=np.uint8)
    Image.frombytes(mode, size, pixels.tobytes()).save(path, format=fmt, **save)
    return path


def pair(folder: Path, stem: str, caption: str = CAPTION, *, ext: str = ".png", **kwargs: object) -> Path:
    """An image with its .txt caption."""
    path = image(folder / f"{stem}{ext}", **kwargs)
    (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return path


def clean(tmp_path: Path, n: int = 3) -> Path:
    root = tmp_path / "data"
    for i in range(n):
        pair(root / "10_derm", f"img{i}")
    return root


def run(root: Path, **kwargs: object) -> dataset.CheckReport:
    kwargs.setdefault("resolution", RES)
    return dataset.scan(root, **kwargs)


def found(report: dataset.CheckReport, code: str) -> dict[Path, dataset.Problem]:
    return {p.path: p for p in report.problems if p.code == code}


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A structurally valid PNG that claims width × height (only the header is ever read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    body += chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


# --- a clean dataset --------------------------------------------------------------------------------

def test_clean_dataset_has_no_problems_and_summarises(tmp_path: Path) -> None:
    root = clean(tmp_path)
    report = run(root)
    assert report.problems == []
    assert not report.has_errors(strict=True)
    assert report.images == 3
    assert [(s.path.name, s.repeats, s.concept, s.effective_samples) for s in report.subsets] == [("10_derm", 10, "derm", 30)]
    assert report.fst_counts["III"] == {"images": 3, "effective": 30}
    assert report.fst_counts["VI"] == {"images": 0, "effective": 0}
    assert sum(report.token_histogram.values()) == 3


def test_demo_dataset_passes_with_per_concept_and_skin_type_summary(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", per_cell=1, size=64)
    report = run(root)
    assert report.problems == [], [p.message for p in report.problems]
    assert report.images == 18
    assert {k: v["images"] for k, v in report.fst_counts.items()} == {t: 3 for t in ("I", "II", "III", "IV", "V", "VI")}
    assert {k: v["images"] for k, v in report.diagnosis_counts.items()} == {
        "erythema patch": 6, "pustule-like dots": 6, "scaly plaque": 6}


# --- folders kohya will not parse -------------------------------------------------------------------

def test_folder_without_repeats_is_an_error_naming_it(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "derm_extra", "a")
    problem = found(run(root), "folder-no-repeats")[root / "derm_extra"]
    assert problem.severity == "error" and "derm_extra" in problem.message


def test_zero_repeats_folder_is_an_error(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "0_derm", "a")
    report = run(root)
    assert root / "0_derm" in found(report, "folder-zero-repeats")
    assert [s.path.name for s in report.subsets] == ["10_derm"]


def test_nested_image_folder_is_an_error(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "10_derm" / "more", "deep")
    problem = found(run(root), "nested-folder")[root / "10_derm" / "more"]
    assert problem.severity == "error" and "1 image" in problem.message


def test_no_parsable_folder_is_an_error_and_find_subsets_raises(tmp_path: Path) -> None:
    root = tmp_path / "data"
    pair(root / "derm", "a")
    image(root / "loose.png")
    report = run(root)
    assert report.has_errors()
    assert root in found(report, "no-subsets")
    assert root / "loose.png" in found(report, "images-in-root")
    with pytest.raises(DermkohyaError, match=str(root)):
        dataset.find_subsets(root)


def test_find_subsets_lists_images(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "2_derm_rare", "x")
    subsets = dataset.find_subsets(root)
    assert [(s.path.name, s.repeats, s.concept, len(s.images)) for s in subsets] == [
        ("10_derm", 10, "derm", 3), ("2_derm_rare", 2, "derm_rare", 1)]
    assert all(s.caption_extension == ".txt" for s in subsets)


# --- captions ---------------------------------------------------------------------------------------

def test_image_without_caption_is_an_error(tmp_path: Path) -> None:
    root = clean(tmp_path)
    lonely = image(root / "10_derm" / "lonely.png")
    problem = found(run(root), "missing-caption")[lonely]
    assert problem.severity == "error" and "'derm'" in problem.message


def test_caption_without_image_is_reported(tmp_path: Path) -> None:
    root = clean(tmp_path)
    orphan = root / "10_derm" / "gone.txt"
    orphan.write_text(CAPTION)
    assert orphan in found(run(root), "orphan-caption")


def test_caption_extension_mismatch_names_the_run_extension(tmp_path: Path) -> None:
    root = clean(tmp_path)
    img = image(root / "10_derm" / "kohya_default.png")
    (root / "10_derm" / "kohya_default.caption").write_text(CAPTION)
    problem = found(run(root), "wrong-caption-extension")[img]
    assert problem.severity == "error" and ".txt" in problem.message and "kohya_default.txt" in problem.fix
    # the same dataset checked for a run that reads .caption: now the .txt files are the mismatch
    report = run(root, caption_extension=".caption")
    assert root / "10_derm" / "img0.png" in found(report, "wrong-caption-extension")
    assert img not in found(report, "wrong-caption-extension")


def test_empty_caption_is_an_error(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "10_derm", "blank", "   ")
    pair(root / "10_derm", "firstblank", "")
    (root / "10_derm" / "firstblank.txt").write_text("\nsecond line only")
    problems = found(run(root), "empty-caption")
    assert {root / "10_derm" / "blank.txt", root / "10_derm" / "firstblank.txt"} <= set(problems)


def test_non_utf8_caption_is_an_error(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "10_derm", "latin")
    (root / "10_derm" / "latin.txt").write_bytes("erythème, peau très foncée".encode("latin-1"))
    problem = found(run(root), "caption-not-utf8")[root / "10_derm" / "latin.txt"]
    assert "0xe8" in problem.message


def test_long_caption_warns_with_token_count(tmp_path: Path) -> None:
    root = clean(tmp_path)
    text = ", ".join(["erythematous scaly plaque on the extensor surface"] * 12)
    pair(root / "10_derm", "wordy", text)
    problem = found(run(root), "caption-too-long")[root / "10_derm" / "wordy.txt"]
    tokens = dataset.clip_token_counter().count(text)
    assert tokens > 75 and problem.severity == "warning" and f"{tokens} CLIP tokens" in problem.message
    assert run(root).token_histogram["151+"] == 1 or run(root).token_histogram["76–150"] == 1


def test_multiline_and_bom_captions_warn(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "10_derm", "two", CAPTION + "\nsecond caption")
    pair(root / "10_derm", "bom")
    (root / "10_derm" / "bom.txt").write_bytes(b"\xef\xbb\xbf" + CAPTION.encode())
    report = run(root)
    assert root / "10_derm" / "two.txt" in found(report, "caption-multiline")
    assert root / "10_derm" / "bom.txt" in found(report, "caption-bom")
    assert not report.has_errors()


def test_clip_token_counter_matches_clip_bpe() -> None:
    counter = dataset.clip_token_counter()
    if not counter.exact:
        pytest.skip("open_clip_torch's BPE merges are not installed (make env installs them)")
    # counts from CLIP's reference tokenizer (open_clip SimpleTokenizer), without start/end tokens
    assert counter.count("clinical dermatology photograph, erythema patch, Fitzpatrick skin type IV, synthetic demo image") == 17
    assert counter.count("a photo of a cat") == 5
    assert counter.count("") == 0


def test_approximate_token_counter_is_close() -> None:
    approx = dataset.ClipTokenCounter(None)
    assert not approx.exact and "approximate" in approx.name
    assert 14 <= approx.count("clinical dermatology photograph, erythema patch, Fitzpatrick skin type IV, synthetic demo image") <= 22


# --- image files ------------------------------------------------------------------------------------

def test_zero_byte_image_is_unreadable(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "10_derm", "empty")
    (root / "10_derm" / "empty.png").write_bytes(b"")
    problem = found(run(root), "unreadable-image")[root / "10_derm" / "empty.png"]
    assert problem.severity == "error" and "0 bytes" in problem.message


def test_truncated_jpeg_is_found_by_the_header_scan(tmp_path: Path) -> None:
    root = clean(tmp_path)
    cut = pair(root / "10_derm", "cut", ext=".jpg")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    problem = found(run(root), "unreadable-image")[cut]
    assert "truncated" in problem.message


def test_png_that_is_really_a_jpeg(tmp_path: Path) -> None:
    root = clean(tmp_path)
    fake = pair(root / "10_derm", "fake", fmt="JPEG")  # named .png
    assert "JPEG" in found(run(root), "format-mismatch")[fake].message


def test_corrupt_data_needs_decode(tmp_path: Path) -> None:
    root = clean(tmp_path)
    broken = pair(root / "10_derm", "broken")
    data = bytearray(broken.read_bytes())
    start = data.find(b"IDAT") + 4
    data[start : start + 2] = b"\xff\xff"  # the zlib stream's header damaged, the PNG's structure intact
    broken.write_bytes(bytes(data))
    assert broken not in found(run(root), "unreadable-image")
    assert broken in found(run(root, decode=True), "unreadable-image")


def test_cmyk_16bit_and_alpha_modes(tmp_path: Path) -> None:
    root = clean(tmp_path)
    cmyk = pair(root / "10_derm", "cmyk", mode="CMYK", ext=".jpg")
    alpha = pair(root / "10_derm", "alpha", mode="RGBA")
    deep = root / "10_derm" / "deep.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(deep)
    (root / "10_derm" / "deep.txt").write_text(CAPTION)
    report = run(root)
    assert cmyk in found(report, "cmyk")
    assert alpha in found(report, "alpha-channel")
    assert found(report, "bit-depth")[deep].severity == "error"


def test_exif_rotation_is_reported(tmp_path: Path) -> None:
    root = clean(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = pair(root / "10_derm", "turned", ext=".jpg", exif=exif.tobytes())
    assert "rotated 90°" in found(run(root), "exif-rotation")[turned].message


def test_image_smaller_than_resolution_warns(tmp_path: Path) -> None:
    root = clean(tmp_path)
    tiny = pair(root / "10_derm", "tiny", size=(32, 48))
    problem = found(run(root), "too-small")[tiny]
    assert problem.severity == "warning" and "32×48" in problem.message


def test_decompression_bomb_sizes(tmp_path: Path) -> None:
    root = clean(tmp_path)
    bomb = png_header_only(root / "10_derm" / "bomb.png", 20_000, 20_000)
    big = png_header_only(root / "10_derm" / "big.png", 10_000, 10_000)
    for stem in ("bomb", "big"):
        (root / "10_derm" / f"{stem}.txt").write_text(CAPTION)
    report = run(root, decode=True)  # must not try to decode 400 megapixels
    assert found(report, "decompression-bomb")[bomb].severity == "error"
    assert found(report, "huge-image")[big].severity == "warning"


def test_duplicate_images_by_content(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "3_other", "copy")
    shutil.copyfile(root / "10_derm" / "img1.png", root / "3_other" / "copy.png")
    problem = found(run(root), "duplicate-image")[root / "3_other" / "copy.png"]
    assert "10_derm/img1.png" in problem.message


def test_stray_files_and_ignored_images(tmp_path: Path) -> None:
    root = clean(tmp_path)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "10_derm" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "__MACOSX" / "10_derm").mkdir(parents=True)
    (root / "10_derm" / "notes.docx").write_bytes(b"PK")
    shouty = pair(root / "10_derm", "Shouty", ext=".Jpg", fmt="JPEG")
    gif = image(root / "10_derm" / "anim.gif")
    report = run(root)
    strays = found(report, "stray-file")
    assert {root / ".DS_Store", root / "10_derm" / ".DS_Store", root / "__MACOSX", root / "10_derm" / "notes.docx"} <= set(strays)
    assert {shouty, gif} <= set(found(report, "ignored-image"))


# --- dataset TOML, metadata sidecar, hashing, parallelism, read-only ---------------------------------

def test_dataset_toml_subsets(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "rare", "r0")
    (root / "rare" / "r1.png").write_bytes((root / "rare" / "r0.png").read_bytes()[:0])
    config = tmp_path / "dataset.toml"
    config.write_text(
        '[general]\nclass_tokens = "derm"\n\n[[datasets]]\nresolution = 64\n\n'
        f'[[datasets.subsets]]\nimage_dir = "{root / "10_derm"}"\nnum_repeats = 2\ncaption_extension = ".txt"\n\n'
        '[[datasets.subsets]]\nimage_dir = "data/rare"\nnum_repeats = 5\n')
    report = run(config)
    assert [(s.path.name, s.repeats, s.concept) for s in report.subsets] == [("10_derm", 2, "derm"), ("rare", 5, "derm")]
    assert config in found(report, "caption-extension-unset")
    assert root / "rare" / "r1.png" in found(report, "unreadable-image")
    assert root / "rare" / "r1.png" in found(report, "missing-caption")
    assert [s.path.name for s in dataset.find_subsets(config)] == ["10_derm", "rare"]


def test_metadata_sidecar_counts_and_bad_rows(tmp_path: Path) -> None:
    root = clean(tmp_path)
    (root / "metadata.csv").write_text(
        "image,diagnosis,fitzpatrick\n10_derm/img0.png,psoriasis,5\n10_derm/img1.png,psoriasis,VI\n"
        "10_derm/img2.png,eczema,seven\n10_derm/missing.png,eczema,1\n")
    report = run(root)
    assert report.fst_counts["V"]["images"] == 1 and report.fst_counts["VI"] == {"images": 1, "effective": 10}
    assert report.fst_counts["III"]["images"] == 1  # img2's caption says III where the CSV value is unusable
    assert report.diagnosis_counts == {"eczema": {"images": 1, "effective": 10}, "psoriasis": {"images": 2, "effective": 20}}
    messages = [p.message for p in report.problems if p.path == root / "metadata.csv"]
    assert any("line 4" in m and "seven" in m for m in messages)
    assert any("line 5" in m and "missing.png" in m for m in messages)


def test_content_hash_tracks_content_not_location(tmp_path: Path) -> None:
    root = clean(tmp_path)
    digest = dataset.content_hash(root)
    assert digest == run(root).content_hash
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert dataset.content_hash(moved) == digest
    (moved / "10_derm" / "img0.txt").write_text(CAPTION + ", edited")
    assert dataset.content_hash(moved) != digest
    (root / "10_derm").rename(root / "5_derm")
    assert dataset.content_hash(root) != digest


def test_process_pool_gives_the_same_report(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(210):  # above the in-process threshold
        pair(root / "1_derm", f"p{i:03d}", size=(16, 16))
    image(root / "1_derm" / "nocap.png", size=(16, 16))
    serial = run(root, workers=1, resolution=(16, 16))
    pooled = run(root, workers=2, resolution=(16, 16), decode=True)
    assert [p.to_dict(root) for p in pooled.problems] == [p.to_dict(root) for p in serial.problems]
    assert pooled.content_hash == serial.content_hash and pooled.images == 211


def test_scan_never_modifies_the_dataset(tmp_path: Path) -> None:
    root = clean(tmp_path)
    pair(root / "10_derm", "cut", ext=".jpg")
    pair(root / "0_skip", "x")
    image(root / "10_derm" / "nocap.png")
    (root / "10_derm" / "orphan.caption").write_text("x")
    def snapshot() -> dict[Path, tuple[bytes, int] | None]:
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None for p in root.rglob("*")}
    before = snapshot()
    run(root)
    run(root, decode=True, caption_extension=".caption", workers=2)
    assert snapshot() == before


# --- the command line -------------------------------------------------------------------------------

def test_cli_lists_every_defective_file_and_exits_1(tmp_path: Path) -> None:
    root = clean(tmp_path)
    image(root / "10_derm" / "lonely.png")
    (root / "10_derm" / "gone.txt").write_text(CAPTION)
    result = CliRunner().invoke(main, ["check", str(root), "--resolution", "64"])
    assert result.exit_code == 1, result.output
    assert "missing-caption" in result.output and "10_derm/lonely.png" in result.output
    assert "orphan-caption" in result.output and "10_derm/gone.txt" in result.output


def test_cli_json_and_strict(tmp_path: Path) -> None:
    root = clean(tmp_path)
    (root / "10_derm" / "gone.txt").write_text(CAPTION)  # a warning only
    result = CliRunner().invoke(main, ["check", str(root), "--resolution", "64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["errors"] == 0 and report["counts"] == {"orphan-caption": 1}
    assert report["problems"][0]["path"] == "10_derm/gone.txt"
    assert report["summary"]["subsets"][0]["effective_samples"] == 30
    strict = CliRunner().invoke(main, ["check", str(root), "--resolution", "64", "--strict"])
    assert strict.exit_code == 1


def test_cli_demo_dataset_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    made = CliRunner().invoke(main, ["demo-data", str(root), "--per-cell", "1", "--size", "64"])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(main, ["check", str(root), "--resolution", "64"])
    assert result.exit_code == 0, result.output
    assert "1_derm" in result.output and "Fitzpatrick skin type" in result.output and "no problems" in result.output


def test_cli_missing_dataset_is_one_red_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "nope" in result.output and "Traceback" not in result.output


# --- kohya's documented dataset configs (sd-scripts docs/config_README-en.md) ------------------------

KOHYA_DOCS = Path(__file__).parent / "data" / "kohya_docs"


def docs_config(tmp_path: Path, name: str) -> Path:
    """One of the docs' TOML examples with its Windows (and /path/to) paths pointed at `tmp_path`."""
    text = (KOHYA_DOCS / name).read_text(encoding="utf-8")
    text = text.replace("C:\\", f"{tmp_path.as_posix()}/").replace("\\", "/").replace("/path/to", tmp_path.as_posix())
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    return config


def metadata_json(path: Path, entries: dict[str, dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def docs_mixed_example(tmp_path: Path) -> Path:
    """The docs' first example: two DreamBooth subsets, a reg subset with class tokens only, a fine-tuning subset."""
    for i in range(2):
        pair(tmp_path / "hoge", f"h{i}", f"hoge girl, photo {i}")
    for i in range(3):
        pair(tmp_path / "fuga", f"f{i}", f"fuga boy, photo {i}")
    for i in range(4):
        image(tmp_path / "reg" / f"r{i}.png")  # no captions: kohya trains them on class_tokens 'human'
    for i in range(2):
        image(tmp_path / "piyo" / f"p{i}.png")
    metadata_json(tmp_path / "piyo" / "piyo_md.json", {
        "p0.png": {"caption": "a photo of piyo", "tags": "bird, yellow"},
        str(tmp_path / "piyo" / "p1.png"): {"caption": "", "tags": "bird, Fitzpatrick skin type II"},
    })
    return docs_config(tmp_path, "mixed_dreambooth_finetuning.toml")


def test_docs_example_reports_every_subset_dreambooth_reg_and_fine_tuning(tmp_path: Path) -> None:
    config = docs_mixed_example(tmp_path)
    report = run(config)
    assert not report.has_errors(), [p.to_dict(tmp_path) for p in report.errors]
    assert {p.code for p in report.problems} == {"too-small"}  # 64×64 images at the docs' 512 and 768
    assert [(report.subset_label(s), s.kind, s.is_reg, s.concept, s.repeats, len(s.images), s.effective_samples,
             s.resolution) for s in report.subsets] == [
        ("hoge", "dreambooth", False, "hoge girl", 1, 2, 2, (512, 512)),
        ("fuga", "dreambooth", False, "fuga boy", 1, 3, 3, (512, 512)),
        ("reg", "dreambooth", True, "human", 1, 4, 4, (512, 512)),
        ("piyo/piyo_md.json", "fine-tuning", False, "", 1, 2, 2, (768, 768)),
    ]
    assert (report.images, report.reg_images, report.effective_samples, report.reg_effective_samples) == (11, 4, 11, 4)
    assert sum(report.token_histogram.values()) == 7  # every caption kohya reads: 5 files, 2 metadata entries
    assert report.fst_counts["II"] == {"images": 1, "effective": 1}  # from p1's tags
    summary = report.to_dict()["summary"]
    assert summary["train"] == {"images": 7, "effective_samples": 7} and summary["reg"] == {"images": 4, "effective_samples": 4}
    assert summary["subsets"][3] == {"folder": "piyo", "repeats": 1, "concept": "", "is_reg": False, "images": 2,
                                     "effective_samples": 2, "kind": "fine-tuning", "metadata_file": "piyo/piyo_md.json"}
    assert "kind" not in summary["subsets"][0]
    assert [len(s.images) for s in dataset.find_subsets(config)] == [2, 3, 4, 2]


def test_docs_example_content_hash_covers_every_subset(tmp_path: Path) -> None:
    config = docs_mixed_example(tmp_path)
    digest = dataset.content_hash(config)
    assert run(config).content_hash == digest
    metadata = tmp_path / "piyo" / "piyo_md.json"
    for edit in (lambda: metadata.write_text(metadata.read_text().replace("a photo of piyo", "a photo of piyo!")),
                 lambda: image(tmp_path / "piyo" / "p0.png", size=(65, 64)),
                 lambda: image(tmp_path / "reg" / "r0.png", size=(65, 64)),
                 lambda: (tmp_path / "hoge" / "h0.txt").write_text("edited")):
        edit()
        changed = dataset.content_hash(config)
        assert changed != digest and run(config).content_hash == changed
        digest = changed


def test_docs_example_same_image_dir_in_two_datasets_counts_both(tmp_path: Path) -> None:
    for i in range(2):
        pair(tmp_path / "hoge", f"h{i}")
    report = run(docs_config(tmp_path, "same_image_dir_two_datasets.toml"))
    assert [(s.path.name, s.resolution, len(s.images)) for s in report.subsets] == [
        ("hoge", (512, 512), 2), ("hoge", (768, 768), 2)]
    assert report.images == 4 and report.effective_samples == 4
    assert config_warnings(report) == {"caption-extension-unset"}  # the example relies on --caption_extension


def config_warnings(report: dataset.CheckReport) -> set[str]:
    return {p.code for p in report.problems} - {"too-small"}


def test_docs_example_wildcard_captions_are_not_multiline_warnings(tmp_path: Path) -> None:
    pair(tmp_path / "image_dir", "miku", "1girl, hatsune miku\na girl with a microphone standing on a stage")
    report = run(docs_config(tmp_path, "separators_wildcard.toml"))
    assert [(s.path.name, s.repeats, s.enable_wildcard, len(s.images)) for s in report.subsets] == [("image_dir", 1, True, 1)]
    assert config_warnings(report) == set() and report.subsets[0].resolution == (1024, 1024)


# --- fine-tuning and reg subsets: what kohya does with them ------------------------------------------

def fine_tuning_config(tmp_path: Path, metadata: str, image_dir: str | None = "images") -> Path:
    config = tmp_path / "ft.toml"
    lines = ["[[datasets]]", "[[datasets.subsets]]", f"metadata_file = '{metadata}'", "num_repeats = 3"]
    if image_dir is not None:
        lines.append(f"image_dir = '{image_dir}'")
    config.write_text("\n".join(lines) + "\n")
    return config


def test_fine_tuning_defects_are_found(tmp_path: Path) -> None:
    for stem in ("ok", "stem_only", "no_caption", "unlisted"):
        image(tmp_path / "images" / f"{stem}.png")
    metadata_json(tmp_path / "md.json", {
        "ok.png": {"caption": CAPTION},
        "gone.png": {"caption": CAPTION},
        "stem_only": {"caption": CAPTION},  # merge_captions_to_metadata.py's key: kohya opens it as written
        "no_caption.png": {"tags": ""},
        "bad.png": {"caption": 3},
    })
    report = run(fine_tuning_config(tmp_path, "md.json"))
    metadata = tmp_path / "md.json"
    messages = [p.message for p in report.problems if p.code == "metadata-key-no-image"]
    assert len(messages) == 2 and any("'gone.png'" in m for m in messages)
    assert any("'stem_only'" in m and "'stem_only.png'" in m for m in messages)
    assert "'no_caption.png'" in found(report, "empty-caption")[metadata].message
    assert "'bad.png'" in found(report, "bad-metadata-file")[metadata].message
    assert tmp_path / "images" / "unlisted.png" in found(report, "image-not-in-metadata")
    assert tmp_path / "images" / "stem_only.png" in found(report, "image-not-in-metadata")
    subset = report.subsets[0]
    assert [i.name for i in subset.images] == ["no_caption.png", "ok.png"] and subset.effective_samples == 6
    assert report.has_errors()


def test_fine_tuning_metadata_file_forms(tmp_path: Path) -> None:
    image(tmp_path / "images" / "a.png")
    (tmp_path / "md.jsonl").write_text(json.dumps({"image_path": "a.png", "caption": CAPTION}) + "\n")
    report = run(fine_tuning_config(tmp_path, "md.jsonl"))
    assert not report.has_errors() and report.images == 1 and report.effective_samples == 3
    (tmp_path / "broken.json").write_text("{not json")
    assert tmp_path / "broken.json" in found(run(fine_tuning_config(tmp_path, "broken.json")), "bad-metadata-file")
    metadata_json(tmp_path / "rel.json", {"a.png": {"caption": CAPTION}})
    no_dir = run(fine_tuning_config(tmp_path, "rel.json", image_dir=None))
    assert "no image_dir" in found(no_dir, "bad-metadata-file")[tmp_path / "rel.json"].message
    missing = run(fine_tuning_config(tmp_path, "nowhere.json"))
    assert "metadata_file does not exist" in found(missing, "not-found")[Path("nowhere.json")].message
    metadata_json(tmp_path / "empty.json", {})
    assert tmp_path / "empty.json" in found(run(fine_tuning_config(tmp_path, "empty.json")), "empty-subset")


def test_long_fine_tuning_caption_counts_caption_and_tags(tmp_path: Path) -> None:
    image(tmp_path / "images" / "a.png")
    metadata_json(tmp_path / "md.json", {"a.png": {"caption": CAPTION, "tags": ", ".join(["erythema"] * 40)}})
    report = run(fine_tuning_config(tmp_path, "md.json"))
    assert "md.json" in found(report, "caption-too-long")[tmp_path / "images" / "a.png"].message


def test_reg_subset_without_captions_needs_class_tokens(tmp_path: Path) -> None:
    pair(tmp_path / "train", "t0")
    image(tmp_path / "reg" / "r0.png")
    image(tmp_path / "plain" / "p0.png")
    config = tmp_path / "reg.toml"
    config.write_text(
        "[general]\ncaption_extension = '.txt'\n[[datasets]]\n"
        "[[datasets.subsets]]\nimage_dir = 'train'\nclass_tokens = 'derm'\n"
        "[[datasets.subsets]]\nimage_dir = 'reg'\nis_reg = true\nclass_tokens = 'skin'\nnum_repeats = 2\n")
    report = run(config)
    assert not report.has_errors() and (report.reg_images, report.reg_effective_samples) == (1, 2)
    config.write_text(config.read_text().replace("class_tokens = 'skin'\n", "")
                      + "[[datasets.subsets]]\nimage_dir = 'plain'\nclass_tokens = 'derm'\n")
    missing = found(run(config), "missing-caption")
    assert "empty caption" in missing[tmp_path / "reg" / "r0.png"].message  # reg without class tokens
    assert "class token 'derm'" in missing[tmp_path / "plain" / "p0.png"].message  # training subsets need captions


def test_mixed_dataset_and_controlnet_subsets_are_named(tmp_path: Path) -> None:
    pair(tmp_path / "db", "a")
    image(tmp_path / "ft" / "b.png")
    metadata_json(tmp_path / "ft" / "md.json", {"b.png": {"caption": CAPTION}})
    config = tmp_path / "mixed.toml"
    config.write_text(
        "[general]\ncaption_extension = '.txt'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'db'\n"
        "[[datasets.subsets]]\nimage_dir = 'ft'\nmetadata_file = 'ft/md.json'\n"
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'db'\nconditioning_data_dir = 'cond'\n")
    report = run(config)
    assert "mixes DreamBooth subsets" in found(report, "bad-config")[config].message
    assert "ControlNet" in found(report, "unsupported-subset")[config].message
    assert [s.kind for s in report.subsets] == ["dreambooth", "fine-tuning"]


def test_cli_shows_fine_tuning_and_reg_subsets(tmp_path: Path) -> None:
    config = docs_mixed_example(tmp_path)
    result = CliRunner().invoke(main, ["check", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the terminal wraps long lines
    assert "piyo/piyo_md.json" in text and "(fine-tuning)" in text and "reg (reg)" in text
    assert "train 7 images (7 effective samples), reg 4 images (4)" in text
    as_json = json.loads(CliRunner().invoke(main, ["check", str(config), "--json"]).output)
    assert as_json["summary"]["reg"]["images"] == 4 and as_json["summary"]["subsets"][3]["kind"] == "fine-tuning"


@pytest.mark.kohya
def test_every_docs_example_reads_as_kohya_reads_it(tmp_path: Path) -> None:
    """kohya's own dataset group (tests/kohya_datasets.py) keeps the same subsets, images and totals."""
    from dermkohya import kohya

    configs = [docs_mixed_example(tmp_path / "mixed")]
    for i in range(2):
        pair(tmp_path / "same" / "hoge", f"h{i}")
    configs.append(docs_config(tmp_path / "same", "same_image_dir_two_datasets.toml"))
    pair(tmp_path / "wild" / "image_dir", "miku", "1girl, hatsune miku\na girl with a microphone")
    configs.append(docs_config(tmp_path / "wild", "separators_wildcard.toml"))
    helper = Path(__file__).with_name("kohya_datasets.py")
    out = subprocess.run([str(kohya.find_python()), str(helper), *map(str, configs)], cwd=kohya.find_sd_scripts(),
                         env=kohya.kohya_env(), capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("DERMKOHYA-DATASETS ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    for config, datasets in zip(configs, json.loads(lines[-1].removeprefix("DERMKOHYA-DATASETS "))):
        report = run(config)
        theirs = [(s["metadata_file"] or s["image_dir"], s["is_reg"], s["num_repeats"], s["images"])
                  for d in datasets for s in d["subsets"]]
        ours = [(str(s.metadata_file or s.path), s.is_reg, s.repeats, len(s.images)) for s in report.subsets]
        assert ours == theirs, config.name
        assert sum(d["num_train_images"] for d in datasets) == report.effective_samples - report.reg_effective_samples
        assert sum(d["num_reg_images"] for d in datasets) == report.reg_effective_samples
