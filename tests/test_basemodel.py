"""basemodel: the offline tokenizer, the random smoke models, cached hashing, base identification."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from dermkohya import basemodel, clip_bpe, kohya
from dermkohya.errors import DermkohyaError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


# --- tokenizer ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return basemodel.build_tokenizer_cache(tmp_path_factory.mktemp("tokenizers"))


def test_tokenizer_cache_has_kohyas_layout(tokenizer_cache: Path) -> None:
    for model_id in (basemodel.CLIP_L_TOKENIZER_ID, basemodel.CLIP_BIGG_TOKENIZER_ID):
        folder = tokenizer_cache / model_id.replace("/", "_")
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        assert (folder / "tokenizer_config.json").is_file()


def test_tokenizer_gives_the_real_clip_ids(tokenizer_cache: Path) -> None:
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_cache / "openai_clip-vit-large-patch14"))
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("psoriasis plaque, Fitzpatrick V", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    caption = "an erythematous plaque on the elbow of fitzpatrick skin type v"
    assert tok.decode(tok(caption).input_ids, skip_special_tokens=True).strip() == caption


def test_sdxl_second_tokenizer_pads_with_bang(tokenizer_cache: Path) -> None:
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_cache / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizer_files_are_what_transformers_saves(tokenizer_cache: Path, tmp_path: Path) -> None:
    """build_tokenizer_cache writes the files itself (no transformers import on a first run): byte for byte
    what CLIPTokenizer.save_pretrained writes for the same vocabulary and special tokens."""
    for model_id, pad in basemodel._TOKENIZERS.items():
        ours = tokenizer_cache / model_id.replace("/", "_")
        tok = transformers.CLIPTokenizer(str(ours / "vocab.json"), str(ours / "merges.txt"), unk_token="<|endoftext|>",
                                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad,
                                         model_max_length=basemodel.CLIP_MAX_LENGTH)
        theirs = tmp_path / model_id.replace("/", "_")
        tok.save_pretrained(str(theirs))
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (model_id, name)


def test_tokenizer_cache_keeps_existing_entries(tokenizer_cache: Path) -> None:
    vocab = tokenizer_cache / "openai_clip-vit-large-patch14" / "vocab.json"
    before = vocab.stat().st_mtime_ns
    basemodel.build_tokenizer_cache(tokenizer_cache)
    assert vocab.stat().st_mtime_ns == before


def test_missing_bpe_merges_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_bpe, "merges_file", lambda: None)
    with pytest.raises(DermkohyaError, match="open-clip-torch"):
        basemodel.build_tokenizer_cache(tmp_path / "tok")
    assert not (tmp_path / "tok" / "openai_clip-vit-large-patch14").exists()


# --- random smoke models -----------------------------------------------------------------------------------


def _scaled_down(configs: dict[str, dict]) -> dict[str, dict]:
    """The real configs with every width shrunk: the same builder code, in seconds instead of a minute."""
    small = {name: dict(cfg) for name, cfg in configs.items()}
    unet = small["unet"]
    depth = len(unet["block_out_channels"])
    unet |= {"block_out_channels": [32, 64, 64, 64][:depth], "norm_num_groups": 8, "layers_per_block": 1}
    if "transformer_layers_per_block" in unet:  # SDXL
        unet |= {"attention_head_dim": [2, 2, 4], "transformer_layers_per_block": [1, 1, 1]}
        unet |= {"addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 8 * 6 + 32}
        unet["cross_attention_dim"] = 64
    else:
        unet |= {"attention_head_dim": 2, "cross_attention_dim": 32}
    small["vae"] |= {"block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1}
    small["vae"] |= {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    narrow = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32}
    for name in ("text_encoder", "text_encoder_2"):
        if name in small:
            small[name] = small[name] | narrow
    return small


def _tensor_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_builder_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    small = _scaled_down(basemodel.SD15_CONFIGS)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        basemodel._build_pipeline_folder(tmp_path / name, "sd15", seed, small)
    a, b, c = (_tensor_files(tmp_path / n) for n in "abc")
    assert set(a) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    assert a == b
    assert all(a[k] != c[k] for k in a)


def test_smoke_folder_says_so_and_loads_as_a_pipeline(tmp_path: Path) -> None:
    folder = tmp_path / "smoke"
    basemodel._build_pipeline_folder(folder, "sd15", 0, _scaled_down(basemodel.SD15_CONFIGS))
    assert "RANDOM WEIGHTS" in (folder / basemodel.SMOKE_MARKER).read_text()
    index = json.loads((folder / "model_index.json").read_text())
    assert "RANDOM WEIGHTS" in index["_dermkohya_smoke_model"]
    info = json.loads((folder / basemodel.SMOKE_INFO).read_text())
    assert info["random_weights"] is True and info["seed"] == 0 and info["kind"] == "sd15"
    # what kohya does with a diffusers folder (library/train_util.py::_load_target_model)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), tokenizer=None, safety_checker=None)
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    assert pipe.unet.dtype == torch.float16 or pipe.unet.dtype == torch.float32
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert tok("a photo of a cat").input_ids[1:-1] == [320, 1125, 539, 320, 2368]


def test_sdxl_smoke_folder_loads_as_an_sdxl_pipeline(tmp_path: Path) -> None:
    folder = tmp_path / "xl"
    basemodel._build_pipeline_folder(folder, "sdxl", 0, _scaled_down(basemodel.SDXL_CONFIGS))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    assert isinstance(pipe.text_encoder_2, transformers.CLIPTextModelWithProjection)
    assert pipe.tokenizer_2.pad_token == "!"
    assert basemodel.identify_base(folder)["family"] == "sdxl"
    # kohya's SDXL loader under fp16 (library/sdxl_train_util.py::_load_target_model) asks for the fp16 variant
    fp16 = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float16, variant="fp16", tokenizer=None)
    assert fp16.unet.dtype == torch.float16
    unet = folder / "unet"
    assert (unet / "diffusion_pytorch_model.fp16.safetensors").stat().st_ino == (unet / "diffusion_pytorch_model.safetensors").stat().st_ino


@pytest.mark.parametrize(
    ("configs", "unet_params", "encoder_params"),
    [
        (basemodel.SD15_CONFIGS, 859_520_964, {"text_encoder": 123_060_480}),
        (basemodel.SDXL_CONFIGS, 2_567_463_684, {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
    ],
    ids=["sd15", "sdxl"],
)
def test_full_configs_have_the_real_models_sizes(configs: dict, unet_params: int, encoder_params: dict) -> None:
    """On the meta device: the published parameter counts, so kohya's fixed-size U-Net accepts the weights."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(diffusers.UNet2DConditionModel(**configs["unet"])) == unet_params
        assert count(diffusers.AutoencoderKL(**configs["vae"])) == 83_653_863
        for name, expected in encoder_params.items():
            cls = transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else transformers.CLIPTextModel
            assert count(cls(transformers.CLIPTextConfig(**configs[name]))) == expected


def test_builder_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DermkohyaError, match="never overwrites"):
        basemodel.build_random_sd15(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_unknown_smoke_kind(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match="random:sd15"):
        basemodel.ensure_smoke_model("sd3", cache_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_smoke_model_paths_build_nothing(tmp_path: Path) -> None:
    model, tokenizers = basemodel.smoke_model_paths("sdxl", seed=3, cache_root=tmp_path)
    assert model.parent == tmp_path / "smoke" and "sdxl" in model.name and "seed3" in model.name
    assert tokenizers == tmp_path / "tokenizers"
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="session")
def smoke_sd15() -> tuple[Path, Path]:
    """The real full-size build (≈20 s, 2 GB), into the cache `random:sd15` uses, so it is built once."""
    return basemodel.ensure_smoke_model("sd15")


@pytest.mark.slow
def test_full_sd15_smoke_model(smoke_sd15: tuple[Path, Path]) -> None:
    model, tokenizers = smoke_sd15
    info = basemodel.identify_base(model)
    assert (info["format"], info["family"], info["smoke"]) == ("diffusers", "sd15", True)
    assert 1.9e9 < info["size_bytes"] < 2.3e9  # fp16
    header = basemodel._safetensors_keys(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in header
    assert (tokenizers / "openai_clip-vit-large-patch14" / "vocab.json").is_file()
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet_file.stat().st_mtime_ns
    assert basemodel.ensure_smoke_model("sd15") == smoke_sd15
    assert unet_file.stat().st_mtime_ns == before  # reused, not rebuilt


# --- hashing -----------------------------------------------------------------------------------------------


def test_sha256_of_a_file(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert basemodel.sha256_path(file, cache_root=tmp_path / "cache") == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "sha256-cache.json").is_file()


def test_sha256_cache_hit_does_not_rehash(tmp_path: Path) -> None:
    """Same path, size and mtime: the cached hash comes back even though the bytes changed underneath,
    which proves the file was not read again. A new mtime invalidates the entry."""
    cache = tmp_path / "cache"
    file = tmp_path / "base.safetensors"
    file.write_bytes(b"A" * 1000)
    first = basemodel.sha256_path(file, cache_root=cache)
    stat = file.stat()
    file.write_bytes(b"B" * 1000)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert basemodel.sha256_path(file, cache_root=cache) == first
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert basemodel.sha256_path(file, cache_root=cache) == hashlib.sha256(b"B" * 1000).hexdigest()


def test_sha256_of_a_folder_covers_names_and_contents(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"weights")
    (folder / "model_index.json").write_text("{}")
    first = basemodel.sha256_path(folder, cache_root=cache)
    assert basemodel.sha256_path(folder, cache_root=tmp_path / "other-cache") == first
    (folder / "unet" / "w.safetensors").rename(folder / "unet" / "v.safetensors")
    renamed = basemodel.sha256_path(folder, cache_root=cache)
    assert renamed != first
    (folder / "model_index.json").write_text('{"x": 1}')
    assert basemodel.sha256_path(folder, cache_root=cache) not in (first, renamed)


def test_sha256_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match="not found"):
        basemodel.sha256_path(tmp_path / "nope.safetensors", cache_root=tmp_path)


def test_corrupt_hash_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "sha256-cache.json").write_text("{not json")
    file = tmp_path / "f.bin"
    file.write_bytes(b"x")
    assert basemodel.sha256_path(file, cache_root=tmp_path) == hashlib.sha256(b"x").hexdigest()


# --- identification ----------------------------------------------------------------------------------------


def _write_safetensors(path: Path, keys: list[str]) -> Path:
    """A valid safetensors file whose tensors have the given names (one float32 each)."""
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "sd15"),
        ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
        ("cond_stage_model.model.ln_final.weight", "sd2"),
    ],
)
def test_identify_single_file_family(tmp_path: Path, key: str, family: str) -> None:
    path = _write_safetensors(tmp_path / "base.safetensors", [key, "model.diffusion_model.out.2.weight"])
    info = basemodel.identify_base(path)
    assert (info["format"], info["family"], info["warning"], info["smoke"]) == ("safetensors", family, None, False)
    assert info["size_bytes"] == path.stat().st_size


def test_identify_rejects_a_lora(tmp_path: Path) -> None:
    path = _write_safetensors(tmp_path / "adapter.safetensors", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    with pytest.raises(DermkohyaError, match=r"adapter\.safetensors: a LoRA"):
        basemodel.identify_base(path)


def test_identify_names_a_renamed_ckpt(tmp_path: Path) -> None:
    path = tmp_path / "v1-5-pruned.safetensors"
    path.write_bytes(b"PK\x03\x04" + bytes(60))  # a torch.save zip with the wrong extension
    with pytest.raises(DermkohyaError, match=r"v1-5-pruned\.safetensors: .*a pickle .*\.ckpt name"):
        basemodel.identify_base(path)


def test_identify_rejects_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", 40) + b"{not json at all")
    with pytest.raises(DermkohyaError, match=r"broken\.safetensors: not a valid safetensors file"):
        basemodel.identify_base(path)


def test_identify_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match=r"missing\.safetensors: base model not found.*random:sd15"):
        basemodel.identify_base(tmp_path / "missing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(DermkohyaError, match=r"model\.onnx: unrecognised.*\.safetensors"):
        basemodel.identify_base(tmp_path / "model.onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DermkohyaError, match=r"folder: a folder without model_index\.json"):
        basemodel.identify_base(tmp_path / "folder")


def test_identify_ckpt_warns_and_reads_keys_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}}, path)
    info = basemodel.identify_base(path)
    assert (info["format"], info["family"]) == ("ckpt", "sd15")
    assert "weights_only=False" in info["warning"] and "v1-5.ckpt" in info["warning"]


# --- kohya on the smoke model --------------------------------------------------------------------------------


def _tiny_kohya_folder(root: Path) -> Path:
    from PIL import Image, ImageDraw

    concept = root / "1_lesion"
    concept.mkdir(parents=True)
    for i in range(3):
        image = Image.new("RGB", (64, 64), (205, 165, 140))
        ImageDraw.Draw(image).ellipse([10 + 8 * i, 12, 34 + 8 * i, 30], fill=(120, 60, 50))
        image.save(concept / f"img{i}.png")
        (concept / f"img{i}.txt").write_text("a dermatology photograph of a lesion, fitzpatrick skin type iii")
    return root


@pytest.mark.kohya
@pytest.mark.slow
def test_kohya_trains_two_steps_on_the_smoke_model(smoke_sd15: tuple[Path, Path], tmp_path: Path) -> None:
    model, tokenizers = smoke_sd15
    data = _tiny_kohya_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        str(kohya.find_python()), "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "2",
        "train_network.py",
        "--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(tokenizers),
        "--train_data_dir", str(data), "--resolution", "64", "--caption_extension", ".txt",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
        "--train_batch_size", "1", "--max_train_steps", "2", "--sdpa", "--mixed_precision", "no",
        "--output_dir", str(out), "--output_name", "smoke", "--save_model_as", "safetensors",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=kohya.find_sd_scripts(), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "load tokenizer from cache" in proc.stdout + proc.stderr
    lora = out / "smoke.safetensors"
    assert lora.is_file()
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) == 792  # 264 LoRA modules × (down, up, alpha)
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "16.0"
    assert meta["ss_steps"] == "2"
    assert meta["ss_sd_model_name"] == model.name


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_info_and_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from dermkohya.cli import main

    monkeypatch.setenv("DERMKOHYA_CACHE", str(tmp_path / "cache"))
    path = _write_safetensors(tmp_path / "base.safetensors", ["conditioner.embedders.1.model.ln_final.weight"])
    runner = CliRunner()
    result = runner.invoke(main, ["base", "info", str(path)])
    assert result.exit_code == 0, result.output
    assert "sdxl" in result.output and "safetensors" in result.output
    result = runner.invoke(main, ["base", "hash", str(path)])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(path.read_bytes()).hexdigest() in result.output
    result = runner.invoke(main, ["base", "info", str(tmp_path / "nope.ckpt")])
    assert result.exit_code == 1
    assert "base model not found" in result.output


def test_cli_base_group_lists_its_commands() -> None:
    from click.testing import CliRunner

    from dermkohya.cli import main

    out = CliRunner().invoke(main, ["base", "--help"]).output
    for command in ("random-sd15", "random-sdxl", "hash", "info"):
        assert command in out


def test_a_hard_linked_weights_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "xl" / "unet"
    folder.mkdir(parents=True)
    (folder / "w.safetensors").write_bytes(b"fp16 weights")
    os.link(folder / "w.safetensors", folder / "w.fp16.safetensors")  # what random:sdxl carries
    reads: list[str] = []
    real = basemodel._hash_file
    monkeypatch.setattr(basemodel, "_hash_file", lambda path: reads.append(path.name) or real(path))
    digest = basemodel.sha256_path(tmp_path / "xl", cache_root=tmp_path / "cache")
    assert len(reads) == 1
    assert digest == basemodel.cached_sha256(tmp_path / "xl", cache_root=tmp_path / "cache")
