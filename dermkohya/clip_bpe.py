"""The CLIP BPE merges: where they are and how to read them, for every module that needs them.

Two things need CLIP's byte-pair merges offline: the tokenizer cache kohya is given (basemodel) and the
caption token counts the checker reports (dataset). Both read the same gzipped file that
open-clip-torch (or OpenAI's clip package) ships, and both must find the same one.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from dermkohya.errors import DermkohyaError

MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
# The merges CLIP uses: the file's lines after its header, up to vocabulary size 49152 - 256 bytes - 2 specials.
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)

# Where the merges live in the packages that ship them: (distribution, import name).
_SOURCES = (("open_clip_torch", "open_clip"), ("openai-clip", "clip"))


@lru_cache(maxsize=1)
def merges_file() -> Path | None:
    """The gzipped merges, found without importing the package (open-clip-torch is installed with
    --no-deps and would not import without torchvision/timm): through the installed distribution's
    files first, then through the import system for a package on the path without metadata."""
    for dist_name, package in _SOURCES:
        try:
            candidate = Path(str(metadata.distribution(dist_name).locate_file(f"{package}/{MERGES_NAME}")))
        except metadata.PackageNotFoundError:
            candidate = None
        if candidate is not None and candidate.is_file():
            return candidate
    for _, package in _SOURCES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / MERGES_NAME
            if candidate.is_file():
                return candidate
    return None


def require_merges_file() -> Path:
    """The merges, or an error saying how to install them (for what cannot work without them)."""
    found = merges_file()
    if found is None:
        raise DermkohyaError(
            f"the CLIP BPE merges ({MERGES_NAME}) are needed to build kohya's tokenizer offline: "
            "run `make env`, or `pip install --no-deps open-clip-torch` in dermkohya's environment"
        )
    return found


def read_merges(path: Path) -> list[str]:
    """The merges CLIP uses, one "a b" pair per entry, in rank order."""
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    return lines[_MERGE_LINES]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character map applied before BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
