"""Base models: resolve, identify and hash the user's, and build the offline smoke model.

kohya needs a base model and a CLIP tokenizer, and both normally come from the Hugging Face hub. Nothing
here downloads: a real base is a local file or folder that we identify (format, family) and hash once
(cached by path, size and mtime), and the smoke model used by the demo, the tests and the benchmarks is
a full-size SD 1.5 (or SDXL) architecture with random weights from a fixed seed. kohya's U-Net has fixed
SD sizes, so a smaller "tiny" model cannot stand in. The tokenizer is rebuilt from the CLIP BPE merges
that `open-clip-torch` ships, in the folder layout kohya's `--tokenizer_cache_dir` reads, and every run
gets it. `resolve_base` is the one reading of `[model] base` for train, generate and merge; a single-file
checkpoint is generated from with a weightless config folder written from the architectures' configs
below (`ensure_pipeline_config`), so it loads offline too.

torch, diffusers and transformers are imported only by the builders: identifying and hashing need none.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermkohya import clip_bpe
from dermkohya import tensorfile
from dermkohya.errors import DermkohyaError
from dermkohya.paths import cache_root
from dermkohya.files import sha256_file as _hash_file

SMOKE_MARKER = "SMOKE_MODEL_RANDOM_WEIGHTS.txt"
SMOKE_INFO = "dermkohya_smoke.json"
SMOKE_KINDS = ("sd15", "sdxl")
# Bumped whenever the builder's output changes, so a cached smoke model from an older builder is not reused.
SMOKE_BUILD_VERSION = 1

# The tokenizer ids kohya asks for (library/strategy_sd.py, strategy_sdxl.py); its cache folder is the id
# with "/" replaced by "_" (library/strategy_base.py::_load_tokenizer).
CLIP_L_TOKENIZER_ID = "openai/clip-vit-large-patch14"
CLIP_BIGG_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77

CKPT_WARNING = (
    "{path}: a .ckpt file is a pickle, and kohya unpickles it with weights_only=False, which runs any code "
    "it holds; prefer a .safetensors copy of the same model"
)

_HASH_CACHE_FILE = "sha256-cache.json"

# --- the real architectures' configs (from the public model repos), so no hub access is needed -----------

_SD_SCHEDULER_COMMON: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

_SD_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
}

_SD_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# The CLIP ViT-L/14 text tower used by SD 1.5 and as SDXL's first encoder (ids 0/2/1 as in those repos).
_CLIP_L_TEXT: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB_SIZE,
}

SD15_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {
        **_SD_UNET_COMMON,
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {**_SD_VAE, "sample_size": 512},
    "text_encoder": _CLIP_L_TEXT,
    "scheduler": _SD_SCHEDULER_COMMON,
}

SDXL_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {
        **_SD_UNET_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
    "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": _CLIP_L_TEXT,
    # OpenCLIP ViT-bigG/14's text tower, with the projection SDXL pools from
    "text_encoder_2": _CLIP_L_TEXT
    | {
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
    },
    "scheduler": {
        **_SD_SCHEDULER_COMMON,
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
}


def default_cache_root() -> Path:
    """`$DERMKOHYA_CACHE`, else `~/.cache/dermkohya`: built smoke models, tokenizers and the hash cache."""
    return cache_root()


# --- the tokenizer -----------------------------------------------------------------------------------------


def _clip_bpe_file() -> Path:
    """The gzipped CLIP BPE merges (the one lookup in dermkohya.clip_bpe), or an error naming the fix."""
    return clip_bpe.require_merges_file()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode symbols (the vocabulary's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt in the layout transformers' CLIPTokenizer reads, derived from the BPE
    merges the way OpenAI's CLIP builds its vocabulary (byte symbols, their word-final forms, merges,
    then the two special tokens): 49408 entries, the ids every SD checkpoint was trained with."""
    merges = clip_bpe.read_merges(_clip_bpe_file())
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise DermkohyaError(f"{_clip_bpe_file()}: gives {len(vocab)} tokens, not {CLIP_VOCAB_SIZE}; reinstall open-clip-torch")
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    ids = {tok: i for i, tok in enumerate(vocab)}
    vocab_file.write_text(json.dumps(ids, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def _added_token(content: str, *, normalized: bool = True, special: bool | None = None) -> dict[str, Any]:
    token: dict[str, Any] = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                             "single_word": False}
    return token if special is None else token | {"special": special}


def _save_clip_tokenizer(dest: Path, *, pad_token: str) -> None:
    """The files `CLIPTokenizer.save_pretrained` writes for the hub copy (kohya loads the slow class), written
    directly: importing transformers costs seconds on a user's first run, before kohya may start.
    model_max_length matters: kohya takes its token length from it when max_token_length is unset.
    tests/test_basemodel.py compares these files with transformers' own save_pretrained."""
    _write_clip_vocab(dest)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    decoder = {str(CLIP_VOCAB_SIZE - 2): _added_token(bos, special=True), str(CLIP_VOCAB_SIZE - 1): _added_token(eos, special=True)}
    if pad_token not in (bos, eos):  # SDXL's second tokenizer pads with "!", id 0, registered as a special token
        decoder = {"0": _added_token(pad_token, normalized=False, special=True), **decoder}
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": eos,
    }
    special = {"bos_token": _added_token(bos), "eos_token": _added_token(eos),
               "pad_token": pad_token, "unk_token": _added_token(eos)}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (dest / name).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# Each tokenizer id kohya may ask for, with the pad token of its hub copy.
_TOKENIZERS = {CLIP_L_TOKENIZER_ID: "<|endoftext|>", CLIP_BIGG_TOKENIZER_ID: "!"}


def build_tokenizer_cache(cache_dir: Path) -> Path:
    """The folder to pass as kohya's `--tokenizer_cache_dir`: one saved tokenizer per id kohya loads
    (SD 1.5's CLIP-L and SDXL's second, bigG one; both use the same BPE vocabulary). Existing entries are kept."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for model_id, pad_token in _TOKENIZERS.items():
        dest = cache_dir / model_id.replace("/", "_")
        if (dest / "vocab.json").is_file():
            continue
        _atomic_build(dest, lambda tmp, pad=pad_token: _save_clip_tokenizer(tmp, pad_token=pad))
    return cache_dir


# --- the random-weight smoke models -----------------------------------------------------------------------


def _atomic_build(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build into a sibling temp folder and rename it into place, so a half-built model is never seen
    and two concurrent builders end with one complete copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():
                raise  # another builder did not win the race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _smoke_text(kind: str, seed: int) -> str:
    return (
        f"THIS IS A SMOKE-TEST MODEL WITH RANDOM WEIGHTS (dermkohya random:{kind}, seed {seed}).\n"
        "It has the full Stable Diffusion architecture so kohya's training runs end to end offline, but it was\n"
        "never trained: anything it generates is noise, and a LoRA trained on it is useless for images.\n"
        "Use it to test the pipeline, never to produce or evaluate synthetic images.\n"
    )


def _seed_component(seed: int, index: int) -> None:
    """Each component gets its own seed, so its bytes do not depend on the order of the build."""
    import torch

    torch.manual_seed(seed * 1000 + index)


def _save_diffusers_model(model: Any, dest: Path) -> None:
    model.to(dtype=_torch_float16())
    model.save_pretrained(str(dest), safe_serialization=True)


def _torch_float16() -> Any:
    import torch

    return torch.float16


def _build_pipeline_folder(out: Path, kind: str, seed: int, configs: dict[str, dict[str, Any]]) -> None:
    """Build one component at a time (random init, cast to fp16, save, free) to keep memory near one U-Net."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out.mkdir(parents=True)
    (out / SMOKE_MARKER).write_text(_smoke_text(kind, seed), encoding="utf-8")

    _seed_component(seed, 0)
    _save_diffusers_model(UNet2DConditionModel(**configs["unet"]), out / "unet")
    _seed_component(seed, 1)
    _save_diffusers_model(AutoencoderKL(**configs["vae"]), out / "vae")

    for index, (name, class_name) in enumerate(_text_encoders(kind).items(), start=2):
        _seed_component(seed, index)
        config = transformers.CLIPTextConfig(**configs[name])
        model = getattr(transformers, class_name)(config)
        _save_diffusers_model(model, out / name)

    _write_scheduler_and_tokenizers(out, kind, configs)
    index = _model_index(kind)
    index["_dermkohya_smoke_model"] = f"RANDOM WEIGHTS, NOT A TRAINED MODEL (random:{kind}, seed {seed}); see {SMOKE_MARKER}"
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    info = {
        "smoke_model": True,
        "random_weights": True,
        "kind": kind,
        "seed": seed,
        "dtype": "float16",
        "builder_version": SMOKE_BUILD_VERSION,
    }
    (out / SMOKE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if kind == "sdxl":
        _link_fp16_variant(out)


def _text_encoders(kind: str) -> dict[str, str]:
    encoders = {"text_encoder": "CLIPTextModel"}
    if kind == "sdxl":
        encoders["text_encoder_2"] = "CLIPTextModelWithProjection"
    return encoders


def _scheduler_class(kind: str) -> str:
    return "EulerDiscreteScheduler" if kind == "sdxl" else "PNDMScheduler"


def _write_scheduler_and_tokenizers(out: Path, kind: str, configs: dict[str, dict[str, Any]]) -> None:
    """The parts a smoke model and a weightless config folder share: scheduler config and tokenizer(s)."""
    import diffusers

    # Written as the model repos have it (PNDMScheduler ignores clip_sample there, and so it does here).
    scheduler = {"_class_name": _scheduler_class(kind), "_diffusers_version": diffusers.__version__, **configs["scheduler"]}
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n", encoding="utf-8")
    tokenizers = {"tokenizer": _TOKENIZERS[CLIP_L_TOKENIZER_ID]}
    if kind == "sdxl":
        tokenizers["tokenizer_2"] = _TOKENIZERS[CLIP_BIGG_TOKENIZER_ID]
    for name, pad_token in tokenizers.items():
        _save_clip_tokenizer(out / name, pad_token=pad_token)


def _model_index(kind: str) -> dict[str, Any]:
    """model_index.json as the public SD 1.5 / SDXL repos have it (no safety checker)."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", _scheduler_class(kind)],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if kind == "sdxl":
        index |= {
            "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    else:
        index |= {"feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False}
    return index


def _link_fp16_variant(folder: Path) -> None:
    """Give each weights file its `variant="fp16"` name too (a hard link: no extra bytes).

    kohya's SDXL loader asks diffusers for `variant="fp16"` under fp16 mixed precision and falls back
    only on an OSError, while diffusers 0.32 raises a ValueError when the variant files are missing.
    The smoke weights are fp16, so the variant names are true.
    """
    for weights in sorted(folder.glob("*/*.safetensors")):
        if weights.name.endswith(".fp16.safetensors"):
            continue
        variant = weights.with_name(weights.name.removesuffix(".safetensors") + ".fp16.safetensors")
        if not variant.exists():
            try:
                os.link(weights, variant)
            except OSError:
                shutil.copyfile(weights, variant)


def _build_random(kind: str, out_dir: Path, seed: int) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        info = _smoke_info(out_dir)
        if info and info.get("kind") == kind and info.get("seed") == seed and (out_dir / "model_index.json").is_file():
            if kind == "sdxl":
                _link_fp16_variant(out_dir)  # a folder built before the variant names were added
            return out_dir
        if out_dir.is_file() or any(out_dir.iterdir()):
            raise DermkohyaError(
                f"{out_dir}: exists and is not a random:{kind} smoke model with seed {seed}; "
                "choose an empty or new folder (dermkohya never overwrites it)"
            )
        out_dir.rmdir()
    configs = SDXL_CONFIGS if kind == "sdxl" else SD15_CONFIGS
    return _atomic_build(out_dir, lambda tmp: _build_pipeline_folder(tmp, kind, seed, configs))


def build_random_sd15(out_dir: Path, *, seed: int = 0) -> Path:
    """A full-size SD 1.5-architecture diffusers folder with random fp16 weights (≈2 GB): same seed and
    same torch, same tensor bytes. An existing smoke model of the same kind and seed is returned as is."""
    return _build_random("sd15", out_dir, seed)


def build_random_sdxl(out_dir: Path, *, seed: int = 0) -> Path:
    """As build_random_sd15, for SDXL (two text encoders; ≈7 GB, and ≈14 GB of memory while building)."""
    return _build_random("sdxl", out_dir, seed)


def smoke_model_paths(kind: str = "sd15", *, seed: int = 0, cache_root: Path | None = None) -> tuple[Path, Path]:
    """Where `random:<kind>` lives (model folder, tokenizer cache), without building anything: rendering
    needs the paths, only training needs the files."""
    if kind not in SMOKE_KINDS:
        raise DermkohyaError(f"random:{kind}: unknown smoke model; use one of " + ", ".join(f"random:{k}" for k in SMOKE_KINDS))
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "smoke" / f"random-{kind}-seed{seed}-v{SMOKE_BUILD_VERSION}", root / "tokenizers"


def ensure_smoke_model(kind: str = "sd15", *, seed: int = 0, cache_root: Path | None = None) -> tuple[Path, Path]:
    """(model folder, tokenizer cache) for `random:<kind>`, built once into the cache and reused."""
    model, tokenizers = smoke_model_paths(kind, seed=seed, cache_root=cache_root)
    build_tokenizer_cache(tokenizers)
    return _build_random(kind, model, seed), tokenizers


def _smoke_info(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SMOKE_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- hashing -----------------------------------------------------------------------------------------------


class _HashCache:
    """sha256 per file, keyed by absolute path and valid while size and mtime_ns are unchanged."""

    def __init__(self, root: Path) -> None:
        self.file = root / _HASH_CACHE_FILE
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False
        self._by_inode: dict[tuple[int, int, int, int], str] = {}

    def known(self, path: Path) -> str | None:
        """The cached digest while the file's size and mtime are unchanged, else None (nothing is read)."""
        return self._lookup(str(path.resolve()), path.stat())

    def _lookup(self, key: str, stat: os.stat_result) -> str | None:
        entry = self.entries.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        return None

    def sha256(self, path: Path) -> str:
        key, stat = str(path.resolve()), path.stat()
        if (digest := self._lookup(key, stat)) is not None:
            return digest
        inode = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        digest = self._by_inode.get(inode) or _hash_file(path)  # a hard link (SDXL's fp16 names) is read once
        self._by_inode[inode] = digest
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        """Written atomically; when two processes race, one's new entries are lost and merely recomputed."""
        if not self.dirty:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only cache only costs time


def _path_digest(path: Path, file_digest: Callable[[Path], str | None]) -> str | None:
    """A file's digest, or a folder's: each file's relative path and digest, in sorted order."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        if (known := file_digest(file)) is None:
            return None
        digest.update(f"{file.relative_to(path).as_posix()}\0{known}\n".encode())
    return digest.hexdigest()


def sha256_path(path: Path, *, cache_root: Path | None = None) -> str:
    """SHA-256 of a file, or of a folder (each file's relative path and hash, in sorted order), so a
    diffusers folder has one identity. File hashes are cached: a 4 GB checkpoint is read once."""
    path = Path(path)
    if not path.exists():
        raise DermkohyaError(f"{path}: not found; cannot hash a base model that is not there")
    cache = _HashCache(Path(cache_root) if cache_root is not None else default_cache_root())
    try:
        digest = _path_digest(path, cache.sha256)
        assert digest is not None
        return digest
    finally:
        cache.save()


def cached_sha256(path: Path, *, cache_root: Path | None = None) -> str | None:
    """`sha256_path`'s answer when every file of `path` is in the hash cache (a stat per file), else None."""
    path = Path(path)
    if not path.exists():
        return None
    return _path_digest(path, _HashCache(Path(cache_root) if cache_root is not None else default_cache_root()).known)


# --- identification ---------------------------------------------------------------------------------------


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from the header alone: no torch, no reading the weights."""
    return list(tensorfile.read_header(path, fix="re-download or re-export it").tensors)


def _ckpt_keys(path: Path) -> list[str]:
    """String constants of the checkpoint's pickle, read with pickletools, which never executes it."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            data = zf.read(name) if name else b""
    except (OSError, zipfile.BadZipFile):
        return []
    keys = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "." in arg and opcode.name.endswith("UNICODE"):
                keys.append(arg)
    except Exception:  # a malformed pickle: family stays unknown; kohya will say more
        return keys
    return keys


def _family_from_keys(keys: list[str]) -> str | None:
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    return None


def _family_from_diffusers(path: Path) -> str | None:
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DermkohyaError(f"{path / 'model_index.json'}: unreadable ({exc}); re-export the diffusers folder") from exc
    pipeline = index.get("_class_name", "")
    if "XL" in pipeline:
        return "sdxl"
    try:
        unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "sd15" if pipeline == "StableDiffusionPipeline" else None
    return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(unet.get("cross_attention_dim"))


def identify_base(path: Path) -> dict[str, Any]:
    """What a base model is, read from its header or configs without loading weights: format
    (safetensors / ckpt / diffusers), family guess (sd15 / sdxl / sd2 / None), size, smoke flag, warning."""
    path = Path(path)
    if not path.exists():
        raise DermkohyaError(
            f"{path}: base model not found; set [model] base to a local SD 1.5/SDXL .safetensors file or "
            "diffusers folder, or to random:sd15 for the offline smoke model"
        )
    warning = None
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DermkohyaError(
                f"{path}: a folder without model_index.json is not a diffusers model; point [model] base at "
                "the diffusers folder itself or at a single .safetensors checkpoint"
            )
        fmt, family = "diffusers", _family_from_diffusers(path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        suffix = path.suffix.lower()
        size = path.stat().st_size
        if suffix == ".safetensors":
            keys = _safetensors_keys(path)
            fmt, family = "safetensors", _family_from_keys(keys)
            if family is None:
                what = "a LoRA or other adapter" if any(k.startswith(("lora_", "lora_unet")) or ".lora" in k for k in keys) else "not a Stable Diffusion checkpoint"
                raise DermkohyaError(
                    f"{path}: {what} (no U-Net/text-encoder keys of SD 1.5 or SDXL); "
                    "[model] base must be a full base checkpoint"
                )
        elif suffix in _CKPT_SUFFIXES:
            fmt, family = "ckpt", _family_from_keys(_ckpt_keys(path))
            warning = CKPT_WARNING.format(path=path)
        else:
            raise DermkohyaError(
                f"{path}: unrecognised base model format {suffix or '(no extension)'}; use a .safetensors "
                "checkpoint or a diffusers folder"
            )
    smoke = path.is_dir() and (path / SMOKE_MARKER).is_file()
    return {"path": str(path), "format": fmt, "family": family, "size_bytes": size, "smoke": smoke, "warning": warning}


# --- one resolver for every stage -------------------------------------------------------------------------

MODELS_DIR = "models"  # the project's git-ignored folder: smoke models, tokenizer cache, pipeline configs
SMOKE_SEED = 0
SUPPORTED_FAMILIES = ("sd15", "sdxl")
FAMILY_LABELS = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd2": "SD 2.x"}
# Bumped whenever the config folder's contents change, so an older one is not reused.
PIPELINE_CONFIG_VERSION = 1


@dataclass(frozen=True)
class ResolvedBase:
    """A `[model] base` as every stage sees it: where it is, what it is, and what to say about it.

    `random:*` resolves to the project's smoke model folder without building it (rendering needs the
    path only); a file or folder is identified from its header or configs, never by loading weights.
    """

    spec: str
    path: Path
    format: str  # safetensors | ckpt | diffusers
    family: str | None  # sd15 | sdxl | sd2 | None (a .ckpt whose keys could not be read)
    smoke: bool
    warning: str | None = None
    found: bool = True

    @property
    def single_file(self) -> bool:
        return self.format in ("safetensors", "ckpt")


def models_dir(project_root: Path) -> Path:
    """The project's `models/`: what dermkohya builds there is never committed (.gitignore)."""
    return Path(project_root) / MODELS_DIR


def tokenizer_cache_dir(project_root: Path) -> Path:
    """kohya's `--tokenizer_cache_dir` for every base: the CLIP tokenizer is the same for all SD 1.5
    models (SDXL adds bigG with the same BPE), so one offline copy serves every run of the project."""
    return models_dir(project_root) / "tokenizers"


def project_smoke_model(kind: str, project_root: Path) -> Path:
    """Where `random:<kind>` lives for train and generate alike: the project's `models/smoke/`."""
    return smoke_model_paths(kind, seed=SMOKE_SEED, cache_root=models_dir(project_root))[0]


def resolve_base(spec: str, project_root: Path, *, must_exist: bool = True) -> ResolvedBase:
    """The one reading of `[model] base` for train, generate, evaluate and merge: a single-file
    `.safetensors` (SD 1.5 / SDXL), a `.ckpt` (warned: a pickle), a diffusers folder, or `random:*`.
    A relative path is relative to the project root. With must_exist=False a missing file is
    returned unidentified (found=False), so rendering works before the checkpoint is downloaded."""
    if spec.startswith("random:"):
        kind = spec.removeprefix("random:")
        return ResolvedBase(spec, project_smoke_model(kind, project_root), "diffusers", kind, smoke=True)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else Path(project_root) / path
    if not path.exists() and not must_exist:
        fmt = "ckpt" if path.suffix.lower() in _CKPT_SUFFIXES else "safetensors" if path.suffix else "diffusers"
        warning = CKPT_WARNING.format(path=path) if fmt == "ckpt" else None
        return ResolvedBase(spec, path, fmt, None, smoke=False, warning=warning, found=False)
    info = identify_base(path)
    return ResolvedBase(spec, path, info["format"], info["family"], info["smoke"], info["warning"])


def check_family(base: ResolvedBase, family: str, where: Path | str, key: str = "[model] family") -> None:
    """Refuse a base whose tensors say another family than the run or plan does, before anything
    launches: kohya would fail minutes later with a shape error that does not name the cause."""
    if base.family is None:
        return  # a .ckpt whose keys could not be read: kohya will say more
    found = FAMILY_LABELS.get(base.family, base.family)
    if base.family not in SUPPORTED_FAMILIES:
        raise DermkohyaError(
            f"{where}: [model] base {base.spec} is an {found} checkpoint (read from its tensor names); dermkohya "
            "trains and generates SD 1.5 and SDXL only: point [model] base at an SD 1.5 or SDXL checkpoint"
        )
    if base.family != family:
        raise DermkohyaError(
            f"{where}: {key} = \"{family}\", but [model] base {base.spec} is an {found} checkpoint (read from its "
            f"tensor names): set {key} = \"{base.family}\" in {where}, or point base at an "
            f"{FAMILY_LABELS.get(family, family)} checkpoint"
        )


_CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def ensure_pipeline_config(family: str, models: Path) -> Path:
    """A diffusers folder without weights (model_index.json, each component's config, scheduler,
    tokenizer(s)) for loading a single-file checkpoint offline: diffusers' `from_single_file(path,
    config=<this folder>, local_files_only=True)` then needs nothing from the hub. Built once into
    `models/configs/` from the architectures' configs above."""
    if family not in SUPPORTED_FAMILIES:
        raise DermkohyaError(f"family {family!r}: dermkohya has pipeline configs for SD 1.5 and SDXL only")
    dest = Path(models) / "configs" / f"{family}-v{PIPELINE_CONFIG_VERSION}"
    if (dest / "model_index.json").is_file():
        return dest
    return _atomic_build(dest, lambda tmp: _write_pipeline_config(tmp, family))


def _write_pipeline_config(out: Path, family: str) -> None:
    import diffusers
    import transformers

    configs = SDXL_CONFIGS if family == "sdxl" else SD15_CONFIGS
    out.mkdir(parents=True)
    for name, class_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (out / name).mkdir()
        config = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **configs[name]}
        (out / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in _text_encoders(family):
        transformers.CLIPTextConfig(**configs[name]).save_pretrained(str(out / name))
    _write_scheduler_and_tokenizers(out, family, configs)
    index = _model_index(family)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
