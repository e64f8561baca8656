"""One base-model resolver for every stage: single-file checkpoints (SD 1.5 / SDXL), .ckpt, diffusers
folders and random:*; the [model] family check; the offline tokenizer cache rendered for every base; and
(`kohya`, `slow`) the issue's new user: a single-file SD 1.5 checkpoint, `dermkohya train` with no hub
and an empty HF_HOME, then `dermkohya generate` from the same file with the LoRA it made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from _smoke import smoke_sd15_model  # noqa: F401  (session fixture: the shared smoke model)
from PIL import Image

from dermkohya import basemodel, kohya, render
from dermkohya.errors import DermkohyaError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

SD15_KEYS = [
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.conv_out.weight",
]
SDXL_KEYS = ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.2.weight"]  # fmt: skip
SD2_KEYS = ["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.2.weight"]


def _checkpoint(path: Path, keys: list[str]) -> Path:
    """A real .safetensors file with the tensor names of a family (identification reads only the header)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def _diffusers_folder(path: Path, cross_attention_dim: int = 768) -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross_attention_dim}))
    return path


def _project(root: Path, base: str, family: str = "sd15") -> Path:
    """A project with one run file on `base` and a tiny kohya folder (4 captioned 64 px images)."""
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "tiny.toml").write_text(RUN.format(base=base, family=family), encoding="utf-8")
    folder = root / "data" / "1_derm"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"clinical dermatology photograph, plaque, Fitzpatrick skin type {['I', 'III', 'V', 'VI'][i]}")
    return root


RUN = """\
[model]
base = "{base}"
family = "{family}"
[dataset]
train_data_dir = "data"
min_bucket_reso = 64
max_bucket_reso = 64
[train]
resolution = 64
batch_size = 2
epochs = 1
mixed_precision = "no"
data_loader_workers = 0
persistent_data_loader_workers = false
[sample]
prompts = ["clinical dermatology photograph, plaque, Fitzpatrick skin type V"]
every_n_epochs = 1
steps = 2
"""


# --- the resolver ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "family"), [(SD15_KEYS, "sd15"), (SDXL_KEYS, "sdxl"), (SD2_KEYS, "sd2")])
def test_resolver_identifies_single_files(tmp_path: Path, keys: list[str], family: str) -> None:
    _checkpoint(tmp_path / "models" / "base.safetensors", keys)
    base = basemodel.resolve_base("models/base.safetensors", tmp_path)
    assert (base.format, base.family, base.smoke, base.single_file, base.warning) == ("safetensors", family, False, True, None)
    assert base.path == tmp_path / "models" / "base.safetensors"


def test_resolver_identifies_ckpt_diffusers_and_random(tmp_path: Path) -> None:
    ckpt = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": {SD15_KEYS[0]: torch.zeros(1)}}, ckpt)
    base = basemodel.resolve_base(str(ckpt), tmp_path)
    assert (base.format, base.family, base.single_file) == ("ckpt", "sd15", True)
    assert "pickle" in base.warning and "weights_only=False" in base.warning and "v1-5.ckpt" in base.warning

    _diffusers_folder(tmp_path / "xl", cross_attention_dim=2048)
    base = basemodel.resolve_base("xl", tmp_path)
    assert (base.format, base.family, base.single_file) == ("diffusers", "sdxl", False)

    base = basemodel.resolve_base("random:sdxl", tmp_path)
    assert (base.format, base.family, base.smoke) == ("diffusers", "sdxl", True)
    assert base.path == tmp_path / "models" / "smoke" / "random-sdxl-seed0-v1" and not base.path.exists()
    with pytest.raises(DermkohyaError, match="random:sd3: unknown smoke model"):
        basemodel.resolve_base("random:sd3", tmp_path)


def test_resolver_names_a_missing_base_or_returns_it_unidentified(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match=r"v1-5-pruned\.safetensors: base model not found"):
        basemodel.resolve_base("models/v1-5-pruned.safetensors", tmp_path)
    base = basemodel.resolve_base("models/v1-5-pruned.ckpt", tmp_path, must_exist=False)
    assert not base.found and base.family is None and base.format == "ckpt" and "pickle" in base.warning


# --- the family check, before anything launches -------------------------------------------------------------


def test_sdxl_file_with_family_sd15_is_one_clear_error(tmp_path: Path) -> None:
    root = _project(tmp_path, "models/xl.safetensors")
    _checkpoint(root / "models" / "xl.safetensors", SDXL_KEYS)
    with pytest.raises(DermkohyaError) as info:
        render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False)
    message = str(info.value)
    assert str(root / "runs" / "tiny.toml") in message
    assert '[model] family = "sd15"' in message and "is an SDXL checkpoint" in message
    assert 'set [model] family = "sdxl"' in message
    assert not (root / "runs" / "tiny").exists()  # refused before anything was written


def test_sd2_file_is_refused_and_a_matching_family_renders(tmp_path: Path) -> None:
    root = _project(tmp_path, "models/v2.safetensors")
    _checkpoint(root / "models" / "v2.safetensors", SD2_KEYS)
    with pytest.raises(DermkohyaError, match="SD 2.x checkpoint.*SD 1.5 and SDXL only"):
        render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False)
    _checkpoint(root / "models" / "v2.safetensors", SD15_KEYS)
    rendered = render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False)
    assert rendered.base_path == root / "models" / "v2.safetensors"


def test_every_base_gets_the_offline_tokenizer_cache(tmp_path: Path) -> None:
    """Offline, kohya asks the hub for the CLIP tokenizer of every base but the one in this cache."""
    root = _project(tmp_path, "models/v1-5-pruned.safetensors")
    rendered = render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False)  # not downloaded yet: renders
    config = tomllib.loads(rendered.files["config.toml"].read_text())
    assert config["model"]["pretrained_model_name_or_path"] == "models/v1-5-pruned.safetensors"
    assert config["model"]["tokenizer_cache_dir"] == "models/tokenizers"


def test_ckpt_base_renders_with_the_pickle_warning(tmp_path: Path) -> None:
    root = _project(tmp_path, "models/v1-5.ckpt")
    (root / "models").mkdir()
    torch.save({"state_dict": {SD15_KEYS[0]: torch.zeros(1)}}, root / "models" / "v1-5.ckpt")
    rendered = render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False)
    assert any("pickle" in w and "v1-5.ckpt" in w for w in rendered.warnings)


# --- generation takes every base it can load ----------------------------------------------------------------


def test_generation_loads_every_kind_of_base_offline(tmp_path: Path) -> None:
    """Single files get their family's weightless config folder (no hub); folders load as they are."""
    from dermkohya.generate import load_base

    for name, keys, family in (("sd15.safetensors", SD15_KEYS, "sd15"), ("xl.safetensors", SDXL_KEYS, "sdxl")):
        base, config = load_base(str(_checkpoint(tmp_path / name, keys)), tmp_path)
        assert base.family == family and config == tmp_path / "models" / "configs" / f"{family}-v1"
        index = json.loads((config / "model_index.json").read_text())
        assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
        assert (config / "tokenizer" / "vocab.json").is_file() and (config / "unet" / "config.json").is_file()
        assert not list(config.rglob("*.safetensors"))  # configs only
    assert (tmp_path / "models" / "configs" / "sdxl-v1" / "tokenizer_2" / "vocab.json").is_file()

    ckpt = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": {SD15_KEYS[0]: torch.zeros(1)}}, ckpt)
    base, config = load_base(str(ckpt), tmp_path)
    assert base.format == "ckpt" and config is not None and base.warning
    base, config = load_base(str(_diffusers_folder(tmp_path / "folder")), tmp_path)
    assert base.format == "diffusers" and config is None


def test_generation_refuses_only_what_it_cannot_load(tmp_path: Path) -> None:
    from dermkohya.generate import load_base

    with pytest.raises(DermkohyaError, match="SD 2.x checkpoint; generation loads SD 1.5 and SDXL"):
        load_base(str(_checkpoint(tmp_path / "v2.safetensors", SD2_KEYS)), tmp_path)
    lora = _checkpoint(tmp_path / "adapter.safetensors", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    with pytest.raises(DermkohyaError, match="a LoRA or other adapter"):
        load_base(str(lora), tmp_path)


# --- hints for a kohya that still reaches the hub ----------------------------------------------------------


def test_offline_tokenizer_failure_gets_a_hint() -> None:
    """The lines kohya's log ends with when the tokenizer is looked up on the hub offline (seen on an H200)."""
    tail = [
        '  File "/opt/venv/lib/python3.11/site-packages/transformers/models/clip/tokenization_clip.py", line 306, in __init__',
        '    with open(vocab_file, encoding="utf-8") as vocab_handle:',
        "         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
        "TypeError: expected str, bytes or os.PathLike object, not NoneType",
        "subprocess.CalledProcessError: Command '['/usr/bin/python3', 'train_network.py', ...]' returned non-zero exit status 1.",
    ]
    hint = kohya.hint_for(tail)
    assert hint and "HF_HUB_OFFLINE" in hint and "tokenizer_cache_dir" in hint and "config.toml" in hint
    assert "dermkohya train" in hint and "--online" in hint


def test_other_hub_lookups_get_a_hint() -> None:
    for line in (
        "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.",
        "huggingface_hub.errors.LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub and we "
        "cannot find the requested files in the local cache. Please check your connection and try again",
    ):
        hint = kohya.hint_for(["Traceback (most recent call last):", line])
        assert hint and "HF_HUB_OFFLINE" in hint and "[model] base" in hint and "--online" in hint


# --- the new user: a single-file checkpoint, no hub, empty HF_HOME ----------------------------------


@pytest.fixture(scope="session")
def single_file_sd15(smoke_sd15_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The smoke model as one SD 1.5 checkpoint, converted by sd-scripts' own tool (fp16, ≈2 GB)."""
    out = tmp_path_factory.getbasetemp() / "single-file" / "v1-5-pruned.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        sd_scripts = kohya.find_sd_scripts()
        env = kohya.kohya_env() | {"PYTHONPATH": str(sd_scripts)}
        argv = [str(kohya.find_python()), "tools/convert_diffusers20_original_sd.py", "--v1", "--fp16", str(smoke_sd15_model), str(out)]
        result = subprocess.run(argv, cwd=sd_scripts, env=env, capture_output=True, text=True)
        assert result.returncode == 0 and out.is_file(), (result.stdout + result.stderr)[-3000:]
    return out


PLAN = """\
name = "first-run"
[model]
base = "models/v1-5-pruned.safetensors"
[[lora]]
path = "artifacts/tiny/tiny.safetensors"
[classes]
diagnoses = ["plaque"]
skin_types = ["I", "V"]
count = 2
[sampler]
steps = 2
width = 64
height = 64
[engine]
batch_size = 2
[filter]
enabled = false
"""


def _dermkohya(root: Path, hf_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "COLUMNS": "200",
           "SD_SCRIPTS_DIR": str(kohya.find_sd_scripts()), "KOHYA_PYTHON": str(kohya.find_python())}  # fmt: skip
    command = [sys.executable, "-c", "from dermkohya.cli import main; main()", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.kohya
@pytest.mark.slow
def test_single_file_checkpoint_trains_and_generates_offline(tmp_path: Path, single_file_sd15: Path) -> None:
    root = _project(tmp_path / "project", "models/v1-5-pruned.safetensors")
    (root / "models").mkdir()
    (root / "models" / "v1-5-pruned.safetensors").symlink_to(single_file_sd15)
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()

    trained = _dermkohya(root, hf_home, "train", "runs/tiny.toml")
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    lora = root / "artifacts" / "tiny" / "tiny.safetensors"
    assert lora.is_file()
    assert (root / "models" / "tokenizers" / "openai_clip-vit-large-patch14" / "vocab.json").is_file()
    assert not (root / "models" / "smoke").exists()  # the single file was the base, nothing else
    manifest = json.loads((root / "output" / "tiny" / "manifest.json").read_text())
    assert manifest["base_model"]["path"] == "models/v1-5-pruned.safetensors"
    base_sha256 = manifest["base_model"]["sha256"]
    assert base_sha256 == basemodel.sha256_path(single_file_sd15)

    (root / "plans").mkdir()
    (root / "plans" / "first-run.toml").write_text(PLAN, encoding="utf-8")
    made = _dermkohya(root, hf_home, "generate", "plans/first-run.toml", "--no-progress")
    assert made.returncode == 0, (made.stdout + made.stderr)[-4000:]
    images = sorted((root / "synthetic" / "first-run").glob("plaque/*/*.png"))
    assert len(images) == 2
    from dermkohya.generate import read_record

    record = read_record(images[0])
    assert record["base_model"] == "models/v1-5-pruned.safetensors" and record["base_sha256"] == base_sha256
    assert record["loras"][0]["path"] == "artifacts/tiny/tiny.safetensors"
    # diffusers stamps its cache layout version there; nothing else may appear (nothing was fetched)
    fetched = [p for p in hf_home.rglob("*") if p.is_file() and p.name != "version_diffusers_cache.txt"]
    assert not fetched, f"files appeared in the empty HF_HOME: {fetched}"
