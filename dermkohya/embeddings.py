"""Textual-inversion embeddings: kohya's phase-1 files, the derived base that carries them into a LoRA
run (phase 2 of ti_then_lora), loading or describing them for generate and inspect, and filing them
(collect) from the run's ti-manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermkohya import basemodel, tensorfile
from dermkohya.errors import DermkohyaError
from dermkohya.manifests import TIManifest
from dermkohya.names import slug

CLIP_L_DIR = basemodel.CLIP_L_TOKENIZER_ID.replace("/", "_")
CLIP_BIGG_DIR = basemodel.CLIP_BIGG_TOKENIZER_ID.replace("/", "_")
# Each text encoder of a base: (its folder, its tokenizer's folder, kohya's tokenizer cache name, key in kohya's
# SDXL TI file). SD 1.5 has the first; SDXL both, with the same ids for the new tokens in each.
_ENCODERS = (("text_encoder", "tokenizer", CLIP_L_DIR, "clip_l"), ("text_encoder_2", "tokenizer_2", CLIP_BIGG_DIR, "clip_g"))


@dataclass(frozen=True)
class DerivedBase:
    base: Path  # a diffusers folder kohya loads as it loads any base
    tokenizer_cache_dir: Path  # kohya's --tokenizer_cache_dir: the CLIP tokenizer with the new tokens
    sha256: str  # of the new text encoder and tokenizer files (unet/vae are the base's own)
    token_ids: dict[str, list[int]]


def read_embedding(path: Path) -> dict[str, Any]:
    """kohya's TI file as vectors per text encoder: SD 1.5's `emb_params` [vectors, 768] (CLIP-L's), SDXL's
    `clip_l` [vectors, 768] and `clip_g` [vectors, 1280]."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    if "emb_params" in data:
        return {"clip_l": data["emb_params"]}
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    raise DermkohyaError(f"{path}: neither `emb_params` (SD 1.5) nor `clip_l` and `clip_g` (SDXL): not a kohya "
                         "textual-inversion file")


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link (no GBs copied), a copy where the base is on another file system."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_derived_base(base: Path, tokenizer_cache: Path, embeddings: list[tuple[list[str], Path]], dest: Path) -> DerivedBase:
    """The base with the learned tokens: new rows appended to each text encoder (SD 1.5: CLIP-L; SDXL: CLIP-L
    and bigG), and tokenizers that know them.

    `embeddings` lists (token strings as kohya added them, kohya's .safetensors) in order; ids follow the
    base vocabulary in that order, as kohya's phase-1 run gave them (each run alone adds its own at the end).
    """
    if not (base / "model_index.json").is_file():
        raise DermkohyaError(f"{base}: not a diffusers folder: the derived base is built from one "
                             "(diffusers_from_single_file makes one from a single-file checkpoint)")
    encoders = [e for e in _ENCODERS if (base / e[0]).is_dir()]
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "base").mkdir(parents=True)
    rewritten = {name for e in encoders for name in e[:2]}
    for item in base.iterdir():
        if item.name in rewritten:
            continue
        target = tmp / "base" / item.name
        if item.is_dir():
            shutil.copytree(item, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)
    vectors = [(strings, path, read_embedding(path)) for strings, path in embeddings]
    token_ids: dict[str, list[int]] | None = None
    for encoder in encoders:
        ids = _append_rows(base, tokenizer_cache, encoder, vectors, tmp)
        if token_ids is not None and ids != token_ids:
            raise DermkohyaError(f"{tokenizer_cache}: its CLIP-L and bigG tokenizers give the new tokens different ids "
                                 f"({token_ids} vs {ids}), so they hold different vocabularies: delete that folder and "
                                 "train again (it is rebuilt from dermkohya's own copy)")
        token_ids = ids
    digest = hashlib.sha256()
    written = [tmp / "base" / e[0] for e in encoders] + [tmp / "tokenizers" / e[2] for e in encoders]
    for folder in written:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(tmp).as_posix().encode() + b"\0" + path.read_bytes())
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return DerivedBase(dest / "base", dest / "tokenizers", digest.hexdigest(), token_ids or {})


def _append_rows(base: Path, tokenizer_cache: Path, encoder_entry: tuple[str, str, str, str],
                 vectors: list[tuple[list[str], Path, dict[str, Any]]], tmp: Path) -> dict[str, list[int]]:
    """One text encoder and its tokenizer with the tokens added and their rows set; saved under `tmp`."""
    import torch
    import transformers

    encoder_name, tokenizer_name, cache_name, key = encoder_entry
    encoder_dir = base / encoder_name
    architecture = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8")).get("architectures", ["CLIPTextModel"])[0]
    encoder = getattr(transformers, architecture).from_pretrained(str(encoder_dir))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_cache / cache_name))
    width = encoder.get_input_embeddings().weight.shape[1]
    token_ids: dict[str, list[int]] = {}
    rows = []
    for strings, path, by_encoder in vectors:
        if key not in by_encoder or by_encoder[key].shape[1] != width:
            raise DermkohyaError(f"{path}: no {width}-wide `{key}` vectors for {encoder_dir.name}: an embedding of "
                                 "another family than the base; train phase 1 on this base")
        if by_encoder[key].shape[0] != len(strings):
            raise DermkohyaError(f"{path}: {by_encoder[key].shape[0]} vectors for {len(strings)} token strings")
        if tokenizer.add_tokens(strings) != len(strings):
            raise DermkohyaError(f"{path}: token {strings[0]} is already in the tokenizer: choose another token_template")
        token_ids[strings[0]] = tokenizer.convert_tokens_to_ids(strings)
        rows.append(by_encoder[key])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # every new row is set below
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for ids, row in zip(token_ids.values(), rows):
            weight[ids] = row.to(weight.dtype)
    encoder.save_pretrained(str(tmp / "base" / encoder_name), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "base" / tokenizer_name))
    tokenizer.save_pretrained(str(tmp / "tokenizers" / cache_name))
    return token_ids


def diffusers_from_single_file(base: Path, family: str, models: Path) -> Path:
    """A single-file checkpoint as the diffusers folder phase 2's derived base is built from, offline:
    diffusers' `from_single_file` with the family's weightless config folder (as generate loads one), saved
    in the checkpoint's own precision (a conversion, not a cast). Built once per checkpoint (named by its
    sha256) into models/diffusers/; kohya then reads it as any diffusers base."""
    from dermkohya.files import atomic_folder

    dest = Path(models) / "diffusers" / f"{base.stem}-{basemodel.sha256_path(base)[:12]}"
    if (dest / "model_index.json").is_file():
        return dest
    return atomic_folder(dest, lambda tmp: _convert(base, family, Path(models), tmp))


def _convert(base: Path, family: str, models: Path, out: Path) -> None:
    import diffusers
    import torch

    config = basemodel.ensure_pipeline_config(family, models)
    index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    dtypes = [e.dtype for e in tensorfile.read_header(base).tensors.values()] if base.suffix == ".safetensors" else []
    common = max(set(dtypes), key=dtypes.count) if dtypes else "F32"  # a .ckpt: float32, exact for any of them
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(common, torch.float32)
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
        pipe = getattr(diffusers, index["_class_name"]).from_single_file(
            str(base), config=str(config), local_files_only=True, torch_dtype=dtype, **extra)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise DermkohyaError(f"{base}: diffusers cannot read this {family} checkpoint to build phase 2's base "
                             f"({str(exc).splitlines()[0]}); check that [model] base is a full checkpoint") from None
    pipe.save_pretrained(str(out), safe_serialization=True)


# ---- generate and inspect ---------------------------------------------------------------------------------


def embedding_files(path: Path, token: str | None = None) -> list[tuple[Path, str]]:
    """(file, token) for a plan's [[embedding]] entry: one file, or every .safetensors of a collected folder.
    The token is the entry's, else the file's `dermkohya.token`, else `<file stem>`."""
    from dermkohya import lora

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DermkohyaError(f"[[embedding]] path {path}: no textual-inversion .safetensors there: "
                             "give artifacts/<run>/<run>-embeddings or one of its files")
    if token is not None and len(files) > 1:
        raise DermkohyaError(f"[[embedding]] path {path}: `token` names one token but the folder holds {len(files)} files")
    return [(f, token or lora.read_header(f).metadata.get("dermkohya.token") or f"<{f.stem}>") for f in files]


def load_embeddings(pipe: Any, entries: list[Any]) -> list[str]:
    """diffusers' load_textual_inversion for each file; returns the tokens. kohya's SD 1.5 file (`emb_params`)
    loads as it is; its SDXL file (`clip_l`, `clip_g`) loads each part into its own text encoder and tokenizer,
    as diffusers documents for SDXL."""
    loaded = []
    for entry in entries:
        for path, token in embedding_files(Path(entry.path), entry.token):
            if "clip_g" not in tensorfile.read_header(path).tensors:  # kohya SD 1.5, A1111 or diffusers' own format
                pipe.load_textual_inversion(str(path), token=token)
                loaded.append(token)
                continue
            vectors = read_embedding(path)
            for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                            ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
                pipe.load_textual_inversion(vectors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
            loaded.append(token)
    return loaded


def describe_embedding(path: Path) -> dict[str, Any] | None:
    """What `inspect` shows for a textual-inversion file (kohya/A1111 `emb_params`, or diffusers' one
    key per token); None for anything else, e.g. a LoRA."""
    from dermkohya import lora

    sf = lora.read_header(path)
    tensors = {name: entry for name, entry in sf.tensors.items()}
    if not tensors or len(tensors) > 2 or not all(len(e.shape) in (1, 2) for e in tensors.values()):
        return None
    if not ("emb_params" in tensors or "clip_l" in tensors or len(tensors) == 1):
        return None
    return {
        "kind": "textual inversion embedding",
        "tensors": {name: {"shape": list(e.shape), "dtype": e.dtype} for name, e in tensors.items()},
        "vectors": next(iter(tensors.values())).shape[0] if len(next(iter(tensors.values())).shape) == 2 else 1,
        "token": sf.metadata.get("dermkohya.token"),
        "dermkohya": {k: v for k, v in sf.metadata.items() if k.startswith("dermkohya.")},
    }


# ---- collect --------------------------------------------------------------------------------------------


def read_ti_manifest(root: Path, name: str) -> TIManifest | None:
    """output/<run>/ti-manifest.json through its record (an old or foreign file is refused, naming the fix);
    None when the run has none (a LoRA run)."""
    path = root / "output" / name / "ti-manifest.json"
    return TIManifest.read(path) if path.exists() else None


def embeddings_only(root: Path, name: str) -> bool:
    """A `method = "textual_inversion"` run: collect files its embeddings and no LoRA."""
    manifest = read_ti_manifest(root, name)
    return manifest is not None and manifest.method == "textual_inversion"


def collect_embeddings(root: Path, name: str) -> Path:
    """File phase 1's embeddings as artifacts/<run>/<run>-embeddings/<token-slug>.safetensors.

    One file per token, in kohya's own format (SD 1.5: `emb_params` [vectors, 768]; SDXL: `clip_l` and
    `clip_g`): diffusers' `load_textual_inversion` (per text encoder for SDXL: load_embeddings) and A1111
    load such a file, while neither reads a bundle of several tokens.
    The header gains `dermkohya.*` keys (token, its cell, init word, phase hashes); the tensors are copied
    unchanged. A file already filed with the same bytes is kept; a different one is never replaced.
    """
    from dermkohya import lora

    manifest = read_ti_manifest(root, name)
    if manifest is None or manifest.returncode != 0 or not manifest.embeddings:
        raise DermkohyaError(f"{root / 'output' / name / 'ti-manifest.json'}: no finished textual inversion to collect; "
                             f"train the run first (`dermkohya train runs/{name}.toml`)")
    folder = root / "artifacts" / name / f"{name}-embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    cells = {t.token: t for t in manifest.tokens}
    derived = manifest.derived_base
    for token, entry in sorted(manifest.embeddings.items()):
        sf = lora.read_header(root / entry.path)
        metadata = {
            "dermkohya.run_name": name, "dermkohya.method": manifest.method, "dermkohya.token": token,
            "dermkohya.diagnosis": cells[token].diagnosis, "dermkohya.fst": cells[token].fst or "",
            "dermkohya.token_scope": str(manifest.textual_inversion["token_scope"]),
            "dermkohya.init_word": manifest.init_word or "",
            "dermkohya.num_vectors_per_token": str(manifest.textual_inversion["num_vectors_per_token"]),
            "dermkohya.phase1_sha256": entry.sha256,
            "dermkohya.derived_base_sha256": derived.text_encoder_tokenizer_sha256 if derived else "",
        }
        dest = folder / f"{slug(token) or 'token'}.safetensors"
        tmp = folder / f".{dest.name}.tmp-{os.getpid()}"
        lora.write_with_metadata(sf, {**sf.metadata, **metadata}, tmp)
        if dest.exists():
            same = dest.read_bytes() == tmp.read_bytes()
            tmp.unlink()
            if not same:
                raise DermkohyaError(f"{dest}: already holds a different embedding for {token}; it is never replaced: "
                                     f"move artifacts/{name} aside to collect this one")
            continue
        lora.publish(tmp, dest)
    return folder
