"""`dermkohya utility` end to end on the demo data (CPU, tiny images, one epoch), and its scores on known inputs.

The "synthetic" set here is a second demo dataset (another seed) with an index.csv written by the test:
real demo drawings stand in for generated images, so the numbers test the plumbing, not a generator.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dermkohya import demo, prepare
from dermkohya.cli import main
from dermkohya.errors import DermkohyaError
from dermkohya.utility import classifier, data, scores
from dermkohya.utility.data import Item

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "resnet18", "--image-size", "32", "--epochs", "1", "--seeds", "2", "--batch-size", "32",
        "--bootstrap", "40", "--min-images", "3", "--min-positives", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    """The CPU is shared in CI and here: one torch thread avoids oversubscription (and is deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("utility")
    recipe = root / "demo" / "dataset.toml"
    recipe.parent.mkdir()
    recipe.write_text((PROJECT_ROOT / "datasets" / "demo" / "dataset.toml").read_text().replace("resolution = 512", "resolution = 64"))
    demo.make_demo_dataset(recipe.parent / "source", size=64, per_cell=4)
    prepare.prepare(recipe)
    synthetic = demo.make_demo_dataset(root / "stand-in", size=64, per_cell=2, seed=1)
    with open(synthetic / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(synthetic / "index.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "diagnosis", "fst", "prompt"])
        writer.writerows([r["image"], r["diagnosis"], r["fitzpatrick"], r["caption"]] for r in rows)
    prepared = recipe.parent / "prepared"
    return {"train": prepared / "train", "heldout": prepared / "heldout", "synthetic": synthetic, "out": root / "reports"}


def _invoke(study: dict[str, Path], *extra: str):
    return CliRunner().invoke(main, ["utility", "--train", str(study["train"]), "--heldout", str(study["heldout"]),
                                     "--synthetic", str(study["synthetic"]), "--out", str(study["out"]), "--name", "demo",
                                     *ARGS, *extra])  # fmt: skip


def _figures(block: dict) -> list[dict]:
    rows = [block["overall"], *block["per_fst"].values()]
    eo = block["equal_opportunity"]
    return [f for row in rows for f in (row["auroc"], row["balanced_accuracy"])] + [*eo["per_class"].values(), eo["macro"]]


@pytest.mark.slow
def test_utility_runs_end_to_end_and_resumes(study: dict[str, Path], one_thread: None) -> None:
    result = _invoke(study)
    assert result.exit_code == 0, result.output
    report = json.loads((study["out"] / "utility-demo.json").read_text())
    with open(study["heldout"] / "metadata.csv", newline="", encoding="utf-8") as fh:
        heldout = Counter(row["fitzpatrick"] for row in csv.DictReader(fh))
    assert report["counts"]["heldout"] == dict(heldout) and report["counts"]["heldout_total"] == 18
    for arm in ("real", "real_synthetic"):
        block = report["arms"][arm]
        assert {fst: row["n"] for fst, row in block["per_fst"].items()} == dict(heldout)
        for figure in _figures(block):
            assert len(figure["per_seed"]) == 2
            if figure["value"] is None:
                assert figure["reason"] and figure["ci"] is None
                continue
            assert 0.0 <= figure["value"] <= 1.0
            low, high = figure["ci"]
            assert 0.0 <= low <= figure["value"] <= high <= 1.0, figure
            assert figure["value"] == pytest.approx(np.mean(figure["per_seed"]), abs=1e-3)
    for delta in [report["difference"]["overall"], *report["difference"]["per_fst"].values()]:
        for figure in delta.values():
            assert figure["value"] is None or -1.0 <= figure["ci"][0] <= figure["value"] <= figure["ci"][1] <= 1.0
    mix = report["mix"]
    assert report["arms"]["real"]["train_images"] == 54 and report["arms"]["real"]["synthetic_images"] == 0
    assert report["arms"]["real_synthetic"]["synthetic_images"] == sum(m["synthetic_added"] for m in mix.values())
    assert mix["I"]["synthetic_wanted"] == 2 and mix["VI"]["synthetic_wanted"] == 36 and mix["VI"]["synthetic_added"] == 6
    assert any("FST VI" in note for note in report["notes"])
    assert (study["out"] / "utility-demo.md").read_text().count("FST VI") >= 2
    assert (study["out"] / report["plots"]["per_fst_auroc"]).stat().st_size > 1000
    runs = sorted((study["out"] / "utility-demo" / "runs").glob("*.json"))
    assert [p.name for p in runs] == ["real-seed0.json", "real-seed1.json", "real_synthetic-seed0.json", "real_synthetic-seed1.json"]

    stamps = {p: p.stat().st_mtime_ns for p in runs}
    again = _invoke(study)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps  # every seed resumed, none retrained
    rerun = json.loads((study["out"] / "utility-demo.json").read_text())
    assert rerun["arms"] == report["arms"] and rerun["difference"] == report["difference"]

    changed = _invoke(study, "--lr", "0.01")
    assert changed.exit_code == 1 and "--name" in changed.output


def test_same_seed_same_probabilities(study: dict[str, Path], one_thread: None) -> None:
    sets = data.read_sets(study["train"], study["heldout"], study["synthetic"])
    options = classifier.TrainOptions(model="resnet18", epochs=1, batch_size=16, image_size=32)
    first, _ = classifier.train_and_predict(sets.train[:16], sets.heldout[:4], 3, options, seed=5, device="cpu")
    second, _ = classifier.train_and_predict(sets.train[:16], sets.heldout[:4], 3, options, seed=5, device="cpu")
    assert np.array_equal(first, second) and np.allclose(first.sum(axis=1), 1.0)


def test_weights_come_from_a_local_file_without_the_classifier(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=1000)
    save_file(source.state_dict(), tmp_path / "resnet18.safetensors")
    model = classifier.create_model(classifier.TrainOptions(weights=tmp_path / "resnet18.safetensors"), 3)
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    other = timm.create_model("efficientnet_b0", num_classes=1000)
    save_file(other.state_dict(), tmp_path / "effnet.safetensors")
    with pytest.raises(DermkohyaError, match="not a resnet18 state dict"):
        classifier.create_model(classifier.TrainOptions(weights=tmp_path / "effnet.safetensors"), 3)
    with pytest.raises(DermkohyaError, match="no such file"):
        classifier.create_model(classifier.TrainOptions(weights=tmp_path / "missing.pth"), 3)


def test_scores_on_known_inputs() -> None:
    scores_ = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = np.array([True, False, True, False, False, False])
    assert scores.auroc(scores_, positive) == pytest.approx(7 / 8)  # 7 of the 8 positive-negative pairs ordered
    assert scores.auroc(scores_, np.ones(6, bool)) is None
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    assert scores.macro_auroc(probs, labels) == pytest.approx(0.75)
    assert scores.balanced_accuracy(probs, labels) == pytest.approx(0.5)
    assert scores.macro_auroc(probs[:2], np.array([0, 0])) is None
    groups = np.array(["I", "I", "VI", "VI"])
    # class 0: found on type I (1/1), missed on type VI (0/1) → gap 1
    assert scores.eo_gap(probs, labels, groups, 0, min_positives=1) == 1.0
    assert scores.eo_gap(probs, labels, groups, 0, min_positives=2) is None
    assert scores.cell_reason(np.array([0, 1]), 3).startswith("2 image(s)")
    assert scores.cell_reason(np.array([1, 1, 1]), 3) == "a single diagnosis in this cell"


def test_shares_and_mix(tmp_path: Path) -> None:
    assert data.parse_shares("I=0.2, vi=0.8") == {"I": 0.2, "VI": 0.8}
    assert data.parse_shares(None) == data.DEFAULT_SHARES
    with pytest.raises(DermkohyaError, match=r"VI='1'.*\[0, 1\)"):
        data.parse_shares("VI=1")
    with pytest.raises(DermkohyaError, match="'VII' is not a skin type"):
        data.parse_shares("VII=0.5")
    train = [Item(tmp_path / f"r{i}.png", i % 2, "I" if i < 8 else "VI") for i in range(10)]
    pool = [Item(tmp_path / f"s{i}.png", i % 2, "I" if i < 5 else "VI", True) for i in range(20)]
    sets = data.Sets(["a", "b"], train, [], pool, [])
    added, table = data.mix(sets, {"I": 0.2, "VI": 0.8}, seed=0)
    assert table["I"]["synthetic_added"] == 2 and table["VI"]["synthetic_added"] == 8  # 0.2/0.8·8, 0.8/0.2·2
    assert table["VI"]["share_achieved"] == 0.8 and len(added) == 10
    assert added == data.mix(data.Sets(["a", "b"], train, [], pool, []), {"I": 0.2, "VI": 0.8}, seed=0)[0]


def test_a_set_without_two_diagnoses_is_refused(study: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "train"
    shutil.copytree(study["train"], single)
    lines = (single / "metadata.csv").read_text().splitlines()
    (single / "metadata.csv").write_text("\n".join([lines[0], *[l for l in lines[1:] if "erythema" in l]]) + "\n")
    with pytest.raises(DermkohyaError, match="at least 2"):
        data.read_sets(single, study["heldout"], study["synthetic"])
