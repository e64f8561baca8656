"""collect, inspect and the safetensors/LoRA checks.

Unit tests use a kohya-format LoRA built by tests/_lora_fixture.py (real kohya names and shapes, random
weights); the `kohya` tests train two steps with kohya itself and collect and load what it wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file, save_file

from dermkohya import collect, lora
from dermkohya.cli import main
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.manifests import LaunchManifest
from dermkohya.records import RecordError

from _kohya_run import kohya_run  # noqa: F401  (session fixture: a real 2-step kohya run)
from _lora_fixture import kohya_tensors, write_kohya_lora

PROMPTS = [f"clinical dermatology photograph, {d}, Fitzpatrick skin type {f}" for d in ("psoriasis", "eczema") for f in ("I", "III", "V")]


def make_manifest(**changes: object) -> dict:
    """A launch manifest as `dermkohya train` writes it (validated by its record when collect reads it)."""
    manifest = {
        "format": LaunchManifest.format_id(),
        "run_name": "demo",
        "run_file": "runs/demo.toml",
        "run_file_sha256": "a" * 64,
        "dermkohya_version": "0.1.0",
        "family": "sd15",
        "script": "train_network.py",
        "spec": {"description": "test run"},
        "network": {"module": "networks.lora", "dim": 4, "alpha": 4.0},
        "train": {"learning_rate": 1e-4, "batch_size": 4, "epochs": 3, "mixed_precision": "fp16", "resolution": 512},
        "sd_scripts": {"path": "vendor/sd-scripts", "commit": "48d368fa557731ad0488c07304dfeba8c07910eb",
                       "pinned_commit": "48d368fa557731ad0488c07304dfeba8c07910eb"},  # fmt: skip
        "base_model": {"spec": "models/sd15.safetensors", "path": "models/sd15.safetensors", "expected_sha256": "b" * 64,
                       "sha256": "b" * 64, "verified": True, "smoke": False},
        "dataset": {"train_data_dir": "datasets/demo/data", "prepared": None, "content_hash": "c" * 64, "images": 18,
                    "effective_samples": 18, "effective_counts": None, "skin_types": ["I", "II", "III", "IV", "V", "VI"],
                    "counts": {"psoriasis": {"I": 4, "III": 4, "V": 2}, "eczema": {"I": 4, "III": 3, "V": 1}},
                    "caption_template": "clinical dermatology photograph, {{ diagnosis }}, Fitzpatrick skin type {{ fst }}"},  # fmt: skip
        "sample_prompts": PROMPTS,
        "rendered_sha256": {},
        "launch_args": ["-m", "accelerate.commands.launch"],
        "script_args": ["--config_file", "runs/demo/config.toml"],
        "command": ["python", "-m", "accelerate.commands.launch", "train_network.py", "--config_file", "runs/demo/config.toml"],
        "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T01:00:00+00:00",
        "exit_code": 0,
    }
    manifest.update(changes)
    return manifest


def make_project(root: Path, *, manifest: dict | None = None, seed: int = 0, epochs: int = 1, samples: bool = True) -> Path:
    """A project after `dermkohya train`: output/demo/ with kohya-named LoRAs, samples and the manifest."""
    out = root / "output" / "demo"
    write_kohya_lora(out / "demo.safetensors", seed=seed)
    for epoch in range(1, epochs + 1):
        write_kohya_lora(out / f"demo-{epoch:06d}.safetensors", seed=seed + epoch)
    if samples:
        (out / "sample").mkdir()
        rng = np.random.default_rng(0)
        for i, _ in enumerate(PROMPTS):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(out / "sample" / f"demo_e000003_{i:02d}_20260101010000_{i + 1}.png")
            Image.fromarray(pixels).save(out / "sample" / f"demo_e000001_{i:02d}_20260101003000_{i + 1}.png")
    (out / "manifest.json").write_text(json.dumps(manifest or make_manifest()), encoding="utf-8")
    return root


def front_matter(card: str) -> dict:
    """The card's YAML front matter, parsed as the Hugging Face Hub would."""
    yaml = pytest.importorskip("yaml")
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ---- safetensors and LoRA checks ----------------------------------------------------------------------


def test_describe_matches_kohya_sd15_layout(tmp_path: Path) -> None:
    path = write_kohya_lora(tmp_path / "demo.safetensors", rank=16, alpha=16, dtype="float32")
    info = lora.describe(path)
    assert (info.format, info.family, info.rank, info.alpha) == ("kohya", "sd15", 16, 16.0)
    assert len(info.file.tensors) == 792
    assert info.module_counts() == {"text_encoder": 72, "unet": 192}
    assert info.block_counts()["unet"] == {"down_blocks.0": 24, "down_blocks.1": 24, "down_blocks.2": 24, "mid_block": 12,
                                           "up_blocks.1": 36, "up_blocks.2": 36, "up_blocks.3": 36}  # fmt: skip
    assert info.hash_ok is True
    assert 35e6 < info.size_bytes < 40e6  # DESIGN: ~38 MB for rank 16 fp32
    assert lora.kohya_problems(info, dim=16, alpha=16, family="sd15") == []


def test_header_rewrite_keeps_tensors_and_sshs_hash(tmp_path: Path) -> None:
    src = write_kohya_lora(tmp_path / "a.safetensors")
    sf = lora.read_header(src)
    dest = tmp_path / "b.safetensors"
    lora.write_with_metadata(sf, {**sf.metadata, "dermkohya.run_name": "demo ✓"}, dest)
    assert int.from_bytes(dest.read_bytes()[:8], "little") % 8 == 0
    before, after = load_file(src), load_file(dest)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    rewritten = lora.describe(dest)
    assert rewritten.metadata["dermkohya.run_name"] == "demo ✓"
    assert rewritten.metadata["sshs_model_hash"] == sf.metadata["sshs_model_hash"]
    assert rewritten.hash_ok is True


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_nan_and_inf_are_found_in_every_dtype(tmp_path: Path, dtype: str) -> None:
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file as save_torch

        tensors = {k: torch.from_numpy(v.astype("float32")).to(torch.bfloat16) for k, v in kohya_tensors().items()}
        name = next(k for k in tensors if k.endswith("lora_up.weight"))
        tensors[name][0, 0] = float("inf")
        save_torch(tensors, str(tmp_path / "x.safetensors"))
    else:
        tensors = kohya_tensors(dtype=dtype)
        name = next(k for k in tensors if k.endswith("lora_down.weight"))
        tensors[name][0, 0] = np.nan
        save_file(tensors, str(tmp_path / "x.safetensors"))
    info = lora.describe(tmp_path / "x.safetensors")
    assert info.scan.non_finite == [name]
    assert any("NaN or Inf" in p for p in lora.kohya_problems(info))


def test_truncated_and_garbage_files_are_rejected(tmp_path: Path) -> None:
    data = write_kohya_lora(tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(DermkohyaError, match="truncated"):
        lora.read_header(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    with pytest.raises(DermkohyaError, match="truncated"):
        lora.read_header(tmp_path / "head.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(DermkohyaError, match="not JSON"):
        lora.read_header(tmp_path / "junk.safetensors")


def test_tampered_tensor_bytes_break_the_sshs_hash(tmp_path: Path) -> None:
    path = write_kohya_lora(tmp_path / "demo.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ProblemsError) as caught:
        collect.verify(path, dim=4, alpha=4.0)
    assert any("altered after training" in p for p in caught.value.problems)


def test_every_mismatch_is_reported_at_once(tmp_path: Path) -> None:
    tensors = kohya_tensors(rank=8, alpha=8.0)
    del tensors[next(k for k in tensors if k.endswith(".alpha"))]
    tensors["stray.weight"] = np.zeros(3, dtype="float16")
    save_file(tensors, str(tmp_path / "x.safetensors"), {"ss_base_model_version": "sd_v1"})
    with pytest.raises(ProblemsError) as caught:
        collect.verify(tmp_path / "x.safetensors", dim=16, alpha=16.0, family="sdxl")
    text = "\n".join(caught.value.problems)
    for expected in ("not LoRA tensors: stray.weight", "lack lora_down/lora_up/alpha", "network dim is 16",
                     "network alpha is 16", "family is sdxl"):  # fmt: skip
        assert expected in text


def test_peft_style_diffusers_lora_is_described(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {}
    for block in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.2"):
        key = f"unet.{block}.transformer_blocks.0.attn1.to_q"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((8, 320)).astype("float32")
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((320, 8)).astype("float32")
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"))
    info = lora.describe(tmp_path / "pytorch_lora_weights.safetensors")
    assert (info.format, info.rank, info.hash_ok) == ("peft", 8, None)
    assert info.block_counts() == {"unet": {"down_blocks.0": 1, "up_blocks.1": 1}}
    assert "kohya" in lora.kohya_problems(info)[0]


# ---- collect ---------------------------------------------------------------------------------------------


def test_collect_files_adapter_card_manifest_and_checklist(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    source = lora.read_header(root / "output/demo/demo.safetensors")
    artifact = collect.collect("demo", project_root=root)

    assert artifact == root / "artifacts/demo/demo.safetensors"
    info = lora.describe(artifact)
    kohya_keys = {k: v for k, v in source.metadata.items() if k.startswith(("ss_", "sshs_", "modelspec."))}
    assert {k: info.metadata[k] for k in kohya_keys} == kohya_keys
    assert info.hash_ok is True
    meta = info.grouped_metadata()["dermkohya"]
    assert meta["dermkohya.run_name"] == "demo"
    assert meta["dermkohya.base_model.sha256"] == "b" * 64
    assert json.loads(meta["dermkohya.dataset.counts"])["eczema"]["V"] == 1
    assert json.loads(meta["dermkohya.command"])[0] == "python"
    assert meta["dermkohya.sd_scripts.commit"].startswith("48d368fa")
    assert "Research use only" in meta["dermkohya.disclaimer"]
    assert (root / "artifacts/demo/demo.safetensors.sha256").read_text().split() == [lora.file_sha256(artifact), "demo.safetensors"]

    card = (root / "artifacts/demo/model_card.md").read_text()
    fm = front_matter(card)
    assert (fm["base_model"], fm["license"], fm["instance_prompt"]) == ("sd15.safetensors", "creativeml-openrail-m", "derm")
    assert {"lora", "dermatology", "research-only", "sd-1.5"} <= set(fm["tags"])
    assert "| eczema | 4 | 3 | 1 | 8 |" in card and "| **Total** | **8** | **7** | **3** | **18** |" in card
    assert "![Samples](samples.png)" in card and "at epoch 3" in card
    assert 'load_lora_weights("artifacts/demo", weight_name="demo.safetensors")' in card
    assert "<lora:demo:0.8>" in card and "Research use only" in card

    grid = Image.open(root / "artifacts/demo/samples.png")
    assert grid.width > 3 * 128 and grid.height > 2 * 128  # 2 diagnoses × 3 skin types

    record = json.loads((root / "artifacts/demo/manifest.json").read_text())
    assert record["run_name"] == "demo" and record["collect"]["artifact"]["sha256"] == lora.file_sha256(artifact)
    assert [c["ok"] for c in record["collect"]["candidates"]] == [True, True]
    assert len(record["collect"]["modules"]) == 264
    checklist = {c["letter"]: c for c in record["collect"]["checklist"]}
    assert "".join(checklist) == "LORAFINE"
    assert all(checklist[x]["ticked"] for x in "LORAFIE") and not checklist["N"]["ticked"]
    assert "dermkohya evaluate" in checklist["N"]["evidence"]
    assert "- [ ] **N** Numeric validation" in card and "- [x] **O** Obtain base model checksum" in card


def test_card_keeps_images_and_effective_samples_apart(tmp_path: Path) -> None:
    # issue #11.6: a prepared dataset of 18 images at 3 repeats said "Images: 54" and "Trained on 54 images"
    dataset = make_manifest()["dataset"] | {
        "images": 18, "effective_samples": 54,
        "effective_counts": {"psoriasis": {"I": 12, "III": 12, "V": 6}, "eczema": {"I": 12, "III": 9, "V": 3}}}
    root = make_project(tmp_path, manifest=make_manifest(dataset=dataset))
    artifact = collect.collect("demo", project_root=root)
    card = (artifact.parent / "model_card.md").read_text()
    assert "- Images: 18\n" in card and "- Effective samples per epoch (images × repeats): 54" in card
    assert "Trained on 18 images (54 effective samples per epoch with repeats)" in card
    assert "| **Total** | **8** | **7** | **3** | **18** |" in card  # images
    assert "| **Total** | **24** | **21** | **9** | **54** |" in card  # images × repeats
    meta = lora.describe(artifact).grouped_metadata()["dermkohya"]
    assert (meta["dermkohya.dataset.images"], meta["dermkohya.dataset.effective_samples"]) == ("18", "54")
    checklist = json.loads((artifact.parent / "manifest.json").read_text())["collect"]["checklist"]
    assert "18 labelled images (54 effective samples per epoch, images × repeats)" in checklist[0]["evidence"]


def test_a_launch_manifest_missing_a_key_is_refused_by_its_record(tmp_path: Path) -> None:
    # images and images × repeats apart (#11.6): a manifest without `images` is refused, never shown as a guess
    dataset = {k: v for k, v in make_manifest()["dataset"].items() if k != "images"}
    root = make_project(tmp_path, manifest=make_manifest(dataset=dataset))
    with pytest.raises(RecordError, match=r"output/demo/manifest.json: not a valid launch-manifest record: "
                                          r"dataset.images: Field required .*`dermkohya train RUN --new`"):
        collect.collect("demo", project_root=root)
    assert not (root / "artifacts").exists()


def test_an_older_launch_manifest_without_format_is_refused(tmp_path: Path) -> None:
    older = {k: v for k, v in make_manifest().items() if k != "format"}
    root = make_project(tmp_path, manifest=older)
    with pytest.raises(RecordError, match=r"manifest.json: an unversioned or foreign file, not a launch-manifest record "
                                          r".*re-run `dermkohya train RUN --new`, or collect it with the dermkohya version"):
        collect.collect("demo", project_root=root)


def test_numeric_validation_is_ticked_by_an_evaluation_of_this_adapter(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    source_sha = lora.file_sha256(root / "output/demo/demo.safetensors")
    (root / "reports").mkdir()
    (root / "reports/other.json").write_text(json.dumps({"loras": [{"sha256": "0" * 64}]}))
    (root / "reports/demo-grid.json").write_text(json.dumps({"loras": [{"path": "x", "sha256": source_sha, "weight": 0.8}]}))
    artifact = collect.collect("demo", project_root=root)
    checklist = json.loads((artifact.parent / "manifest.json").read_text())["collect"]["checklist"]
    numeric = next(c for c in checklist if c["letter"] == "N")
    assert numeric["ticked"] and "reports/demo-grid.json" in numeric["evidence"] and "other.json" not in numeric["evidence"]


def test_collect_twice_never_replaces_the_first_artifact(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    first = collect.collect("demo", project_root=root)
    digest = lora.file_sha256(first)
    assert collect.collect("demo", project_root=root) == first  # identical result: a no-op

    write_kohya_lora(root / "output/demo/demo.safetensors", seed=99)  # a re-train with a different result
    with pytest.raises(DermkohyaError, match="never replaced.*--new-version"):
        collect.collect("demo", project_root=root)
    assert lora.file_sha256(first) == digest

    second = collect.collect("demo", project_root=root, new_version=True)
    assert second.name == "demo-v2.safetensors" and lora.file_sha256(first) == digest
    assert (second.parent / "model_card-v2.md").is_file() and (second.parent / "demo-v2.safetensors.sha256").is_file()
    assert collect.collect("demo", project_root=root, new_version=True) == second
    assert sorted(p.name for p in second.parent.glob("*.safetensors")) == ["demo-v2.safetensors", "demo.safetensors"]
    assert not list(second.parent.glob(".*"))  # no temp files left behind


def test_collect_rejects_a_tampered_lora_and_reports_a_bad_epoch(tmp_path: Path) -> None:
    root = make_project(tmp_path, epochs=2)
    epoch = root / "output/demo/demo-000002.safetensors"
    epoch.write_bytes(epoch.read_bytes()[:-10])
    artifact = collect.collect("demo", project_root=root)
    record = json.loads((artifact.parent / "manifest.json").read_text())
    bad = [c for c in record["collect"]["candidates"] if not c["ok"]]
    assert [c["file"] for c in bad] == ["demo-000002.safetensors"] and "truncated" in bad[0]["problems"][0]
    with pytest.raises(DermkohyaError, match="truncated"):
        collect.collect("demo", project_root=root, which="epoch:2")

    final = root / "output/demo/demo.safetensors"
    data = bytearray(final.read_bytes())
    data[-100] ^= 0xFF
    final.write_bytes(bytes(data))
    with pytest.raises(ProblemsError, match="altered after training"):
        collect.collect("demo", project_root=tmp_path, new_version=True)


def test_collect_a_chosen_epoch(tmp_path: Path) -> None:
    root = make_project(tmp_path, epochs=2)
    artifact = collect.collect("demo", project_root=root, which="epoch:1")
    meta = lora.describe(artifact).metadata
    assert (meta["dermkohya.checkpoint"], meta["dermkohya.source_file"]) == ("epoch 1", "demo-000001.safetensors")
    with pytest.raises(DermkohyaError, match="demo-000007.safetensors: not found"):
        collect.collect("demo", project_root=root, which="epoch:7")


def test_collect_says_what_a_launch_did_not_record(tmp_path: Path) -> None:
    base = make_manifest()["base_model"] | {"sha256": None, "verified": False}
    sparse = make_manifest(base_model=base, train={}, sample_prompts=[], started=None, finished=None)
    root = make_project(tmp_path, manifest=sparse, samples=False)
    artifact = collect.collect("demo", project_root=root)
    card = (artifact.parent / "model_card.md").read_text()
    assert "not recorded" in card and "No kohya sample images" in card
    checklist = json.loads((artifact.parent / "manifest.json").read_text())["collect"]["checklist"]
    unticked = {c["letter"]: c["evidence"] for c in checklist if not c["ticked"]}
    assert set(unticked) == {"O", "F", "I", "N", "E"}  # L: the dataset part is always recorded
    assert "not recorded" in unticked["O"] and "learning rate" in unticked["F"]


def test_collect_checks_rank_against_the_run(tmp_path: Path) -> None:
    root = make_project(tmp_path, manifest=make_manifest(network={"module": "networks.lora", "dim": 16, "alpha": 16}))
    with pytest.raises(ProblemsError, match="network dim is 16"):
        collect.collect("demo", project_root=root)
    assert not (root / "artifacts/demo/demo.safetensors").exists()


def test_collect_refuses_a_failed_run_and_a_missing_one(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match="train the run first"):
        collect.collect("demo", project_root=tmp_path)
    root = make_project(tmp_path, manifest=make_manifest(exit_code=1))
    with pytest.raises(DermkohyaError, match="exited with code 1"):
        collect.collect("demo", project_root=root)


def test_collect_by_run_file_uses_its_name(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    (root / "runs").mkdir()
    run_file = root / "runs" / "whatever.toml"
    run_file.write_text('name = "demo"\n[model]\nbase = "random:sd15"\n[dataset]\ntrain_data_dir = "data"\n', encoding="utf-8")
    assert collect.collect(run_file, project_root=root).name == "demo.safetensors"


# ---- the CLI ----------------------------------------------------------------------------------------------


def test_cli_collect_and_inspect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["collect", "demo"])
    assert result.exit_code == 0, result.output
    assert "artifacts/demo/demo.safetensors" in result.output

    result = runner.invoke(main, ["inspect", "artifacts/demo/demo.safetensors", "--json"])
    summary = json.loads(result.output)
    assert summary["rank"] == 4 and summary["modules"]["total"] == 264 and summary["hash"]["ok"] is True
    assert set(summary["metadata"]) == {"ss", "modelspec", "dermkohya", "other"}
    assert summary["metadata"]["dermkohya"]["dermkohya.run_name"] == "demo"

    result = runner.invoke(main, ["inspect", "artifacts/demo/demo.safetensors"])
    assert result.exit_code == 0 and "valid" in result.output and "dermkohya.run_name" in result.output

    shutil.copy("artifacts/demo/demo.safetensors", "cut.safetensors")
    Path("cut.safetensors").write_bytes(Path("cut.safetensors").read_bytes()[:5000])
    result = runner.invoke(main, ["inspect", "cut.safetensors"])
    assert result.exit_code == 1 and "truncated" in result.output and "Traceback" not in result.output


# ---- real kohya files ---------------------------------------------------------------------------------


@pytest.mark.kohya
@pytest.mark.slow
def test_collect_and_inspect_a_real_kohya_lora(kohya_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(kohya_run, root)
    artifact = collect.collect("smoke", project_root=root)
    info = lora.describe(artifact)
    assert (info.rank, info.alpha, len(info.modules), len(info.file.tensors)) == (16, 16.0, 264, 792)
    assert info.hash_ok is True and info.metadata["ss_sd_model_hash"] == "IsADirectory"
    assert len(info.grouped_metadata()["ss"]) > 80 and info.metadata["dermkohya.run_name"] == "smoke"
    record = json.loads((artifact.parent / "manifest.json").read_text())
    labels = [c["checkpoint"] for c in record["collect"]["candidates"]]
    assert labels == ["step 1", "step 2", "final"] and all(c["ok"] for c in record["collect"]["candidates"])
    assert record["collect"]["samples"]["cells"], "kohya's sample image should be in the grid"
    assert (artifact.parent / "samples.png").is_file()
    assert collect.collect("smoke", project_root=root) == artifact


@pytest.mark.kohya
@pytest.mark.slow
def test_diffusers_loads_every_module_of_the_collected_lora(kohya_run: Path, tmp_path: Path) -> None:
    """Issue item 5: the collected file loads outside kohya, offline, and every LoRA module is applied."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = tmp_path / "project"
    shutil.copytree(kohya_run, root)
    artifact = collect.collect("smoke", project_root=root)
    info = lora.describe(artifact)
    manifest = json.loads((root / "output/smoke/manifest.json").read_text())

    pipe = StableDiffusionPipeline.from_pretrained(manifest["base_model"]["path"], torch_dtype=torch.float32, local_files_only=True)
    pipe.load_lora_weights(str(artifact.parent), weight_name=artifact.name, adapter_name="derm")

    def adapted(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
        return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "derm" in m.lora_A}

    unet, text_encoder = adapted(pipe.unet), adapted(pipe.text_encoder)
    assert (len(unet), len(text_encoder)) == (info.module_counts()["unet"], info.module_counts()["text_encoder"])
    assert len(unet) + len(text_encoder) == len(info.modules) == 264

    # the weights diffusers holds are kohya's: lora_A is lora_down, lora_B is lora_up, scaled by alpha/rank
    sf = lora.read_header(artifact)
    down = lora.read_array(sf, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
    up = lora.read_array(sf, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight")
    layer = text_encoder["text_model.encoder.layers.0.self_attn.q_proj"]
    assert np.allclose(layer.lora_A["derm"].weight.detach().numpy(), down)
    assert np.allclose(layer.lora_B["derm"].weight.detach().numpy(), up)
    assert layer.scaling["derm"] == pytest.approx(info.alpha / info.rank)
