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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermkohya import tensorfile
from dermkohya.errors import DermkohyaError
from dermkohya.files import sha256_file as _hash_file

from dermkohya.files import atomic_folder
# Re-exported: the smoke models, the architectures' configs and the offline tokenizer have modules of
# their own; callers keep reading them through basemodel, the one place that resolves a base.
from dermkohya.sd_configs import SD15_CONFIGS, SDXL_CONFIGS  # noqa: F401
from dermkohya.smoke import (  # noqa: F401
    SMOKE_BUILD_VERSION, SMOKE_INFO, SMOKE_KINDS, SMOKE_MARKER, _build_pipeline_folder, _model_index, _smoke_info,
    _text_encoders, _write_scheduler_and_tokenizers, build_random_sd15,
    build_random_sdxl, default_cache_root, ensure_smoke_model, smoke_model_paths,
)
from dermkohya.tokenizer import (  # noqa: F401
    _TOKENIZERS, CLIP_BIGG_TOKENIZER_ID, CLIP_L_TOKENIZER_ID, CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_tokenizer_cache,
)

CKPT_WARNING = (
    "{path}: a .ckpt file is a pickle, and kohya unpickles it with weights_only=False, which runs any code "
    "it holds; prefer a .safetensors copy of the same model"
)

_HASH_CACHE_FILE = "sha256-cache.json"



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
    return atomic_folder(dest, lambda tmp: _write_pipeline_config(tmp, family))


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
