"""merge and resize: argument handling and refusals here; kohya's own scripts in the `kohya` tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dermkohya import lora, merge
from dermkohya.errors import DermkohyaError, ProblemsError

from _kohya_run import kohya_run  # noqa: F401  (session fixture: a real 2-step kohya run)
from _lora_fixture import kohya_hash, write_kohya_lora


def test_parse_lora_arg() -> None:
    assert merge.parse_lora_arg("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert merge.parse_lora_arg("dir/a.safetensors:0.6") == (Path("dir/a.safetensors"), 0.6)
    assert merge.parse_lora_arg("a.safetensors:-0.5") == (Path("a.safetensors"), -0.5)
    assert merge.parse_lora_arg("odd:name.safetensors") == (Path("odd:name.safetensors"), 1.0)


def _sdxl_base(path: Path) -> Path:
    save_file({"conditioner.embedders.1.model.x": np.zeros(2, "float16"), "model.diffusion_model.y": np.zeros(2, "float16")}, str(path))
    return path


def test_merge_refuses_before_running_kohya(tmp_path: Path) -> None:
    good = write_kohya_lora(tmp_path / "good.safetensors")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    with pytest.raises(DermkohyaError, match="never replaced"):
        merge.merge(tmp_path, [(good, 1.0)], taken)
    with pytest.raises(DermkohyaError, match=r"\.safetensors"):
        merge.merge(tmp_path, [(good, 1.0)], tmp_path / "out.ckpt")
    with pytest.raises(DermkohyaError, match="at least one LoRA"):
        merge.merge(tmp_path, [], tmp_path / "out.safetensors")

    bad = write_kohya_lora(tmp_path / "bad.safetensors")
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0x10
    bad.write_bytes(bytes(data))
    with pytest.raises(ProblemsError) as caught:
        merge.merge(tmp_path, [(good, 1.0), (bad, 0.5)], tmp_path / "out.safetensors")
    assert len(caught.value.problems) == 1 and "bad.safetensors" in caught.value.problems[0]

    with pytest.raises(DermkohyaError, match="an sdxl base, but the LoRAs are sd15"):
        merge.merge(_sdxl_base(tmp_path / "xl.safetensors"), [(good, 1.0)], tmp_path / "out.safetensors")
    with pytest.raises(DermkohyaError, match="not a Stable Diffusion checkpoint|LoRA"):
        merge.merge(good, [(good, 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_resize_refusals(tmp_path: Path) -> None:
    good = write_kohya_lora(tmp_path / "good.safetensors")
    with pytest.raises(DermkohyaError, match="at least 1"):
        merge.resize(good, 0, tmp_path / "small.safetensors")
    with pytest.raises(DermkohyaError, match="never replaced"):
        merge.resize(good, 2, good)


@pytest.mark.kohya
@pytest.mark.slow
def test_merge_two_loras_into_the_smoke_base(kohya_run: Path, tmp_path: Path) -> None:
    """kohya converts the diffusers smoke base, merges two LoRAs with weights; the result loads in diffusers."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    manifest = json.loads((kohya_run / "output/smoke/manifest.json").read_text())
    base = Path(manifest["base_model"]["path"])
    final, step1 = kohya_run / "output/smoke/smoke.safetensors", kohya_run / "output/smoke/smoke-step00000001.safetensors"
    out = tmp_path / "merged.safetensors"
    record = merge.merge(base, [(final, 0.8), (step1, 0.5)], out)

    assert [(r["file"], r["weight"]) for r in record["loras"]] == [("smoke.safetensors", 0.8), ("smoke-step00000001.safetensors", 0.5)]
    assert record["script"] == "networks/merge_lora.py" and record["base"]["format"] == "diffusers"
    verified = record["verified"]
    assert verified["tensors"] == verified["base_tensors"] > 1000
    assert verified["changed_tensors"] == 264  # exactly the weights of kohya's 264 LoRA modules

    sf = lora.read_header(out)
    merged = json.loads(sf.metadata["dermkohya.merged_loras"])
    assert [(m["file"], m["weight"]) for m in merged] == [("smoke.safetensors", 0.8), ("smoke-step00000001.safetensors", 0.5)]
    assert merged[0]["sha256"] == lora.file_sha256(final)
    assert sf.metadata["modelspec.merged_from"]  # kohya's own record is kept
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == lora.file_sha256(out)
    assert (tmp_path / "merged.safetensors.sha256").read_text().split()[0] == lora.file_sha256(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the converted base is gone

    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(base), local_files_only=True, torch_dtype=torch.float32)
    assert sum(p.numel() for p in pipe.unet.parameters()) > 800_000_000

    with pytest.raises(DermkohyaError, match="never replaced"):
        merge.merge(base, [(final, 1.0)], out)
    out.unlink()  # 4 GB: pytest keeps its last temp folders


@pytest.mark.kohya
@pytest.mark.slow
def test_resize_a_real_lora(kohya_run: Path, tmp_path: Path) -> None:
    """kohya's resize_lora.py on the text-encoder half of a real kohya LoRA (its SVDs of the U-Net's large
    layers take many CPU minutes); the half keeps kohya's names, values and metadata, its hash recomputed."""
    whole = kohya_run / "output/smoke/smoke.safetensors"
    tensors = {k: v for k, v in load_file(whole).items() if k.startswith("lora_te_")}
    metadata = lora.read_header(whole).metadata
    source = tmp_path / "smoke-te.safetensors"
    save_file(tensors, str(source), {**metadata, "sshs_model_hash": kohya_hash(tensors, metadata)})

    out = tmp_path / "smoke-te-r4.safetensors"
    record = merge.resize(source, 4, out)
    info = lora.describe(out)
    assert (max(info.ranks), len(info.modules), info.hash_ok) == (4, 72, True)
    assert set(record["ranks"]) <= {1, 4} and sum(record["ranks"].values()) == 72  # kohya gives all-zero modules rank 1
    assert record["source"]["sha256"] == lora.file_sha256(source) and record["rank"] == 4
    assert json.loads(info.metadata["dermkohya.resize"])["new_rank"] == 4
    assert "resized from 16 to 4" in info.metadata["ss_training_comment"]
