"""The offline CLIP tokenizer kohya's `--tokenizer_cache_dir` reads, rebuilt from the BPE merges that
`open-clip-torch` ships, written as the files transformers' `save_pretrained` writes (without importing it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dermkohya import clip_bpe
from dermkohya.errors import DermkohyaError
from dermkohya.files import atomic_folder

CLIP_L_TOKENIZER_ID = "openai/clip-vit-large-patch14"
CLIP_BIGG_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77



def _clip_bpe_file() -> Path:
    """The gzipped CLIP BPE merges (the one lookup in dermkohya.clip_bpe), or an error naming the fix."""
    return clip_bpe.require_merges_file()


def _write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt in the layout transformers' CLIPTokenizer reads, derived from the BPE
    merges the way OpenAI's CLIP builds its vocabulary (byte symbols, their word-final forms, merges,
    then the two special tokens): 49408 entries, the ids every SD checkpoint was trained with."""
    merges = clip_bpe.read_merges(_clip_bpe_file())
    symbols = list(clip_bpe.bytes_to_unicode().values())
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
        atomic_folder(dest, lambda tmp, pad=pad_token: _save_clip_tokenizer(tmp, pad_token=pad))
    return cache_dir


