"""The random-weight smoke models: a full-size SD 1.5 (or SDXL) architecture with random weights from a fixed
seed, in the diffusers layout kohya loads. kohya's U-Net has fixed SD sizes, so a smaller model cannot stand
in. They prove the pipeline, never the images; each folder says so in a marker file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dermkohya.errors import DermkohyaError
from dermkohya.files import atomic_folder
from dermkohya.paths import cache_root
from dermkohya.sd_configs import SD15_CONFIGS, SDXL_CONFIGS
from dermkohya.tokenizer import CLIP_BIGG_TOKENIZER_ID, CLIP_L_TOKENIZER_ID, _TOKENIZERS, _save_clip_tokenizer, build_tokenizer_cache

SMOKE_MARKER = "SMOKE_MODEL_RANDOM_WEIGHTS.txt"
SMOKE_INFO = "dermkohya_smoke.json"
SMOKE_KINDS = ("sd15", "sdxl")
# Bumped whenever the builder's output changes, so a cached smoke model from an older builder is not reused.
SMOKE_BUILD_VERSION = 1

# with "/" replaced by "_" (library/strategy_base.py::_load_tokenizer).

def default_cache_root() -> Path:
    """`$DERMKOHYA_CACHE`, else `~/.cache/dermkohya`: built smoke models, tokenizers and the hash cache."""
    return cache_root()




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
    return atomic_folder(out_dir, lambda tmp: _build_pipeline_folder(tmp, kind, seed, configs))


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


