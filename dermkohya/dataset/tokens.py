"""How many CLIP tokens a caption makes: kohya cuts a caption after 75 unless --max_token_length says more.

Exact with the BPE merges of an installed open_clip_torch (found through dermkohya.clip_bpe, the same
file kohya's offline tokenizer is built from), approximate without them.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from pathlib import Path

from dermkohya import clip_bpe

CLIP_CHUNK_TOKENS = 75  # CLIP's 77 positions minus the start and end tokens

# CLIP's pre-tokenizer with \p{L} / \p{N} spelt for the standard library's `re`.
_CLIP_PIECES = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class ClipTokenCounter:
    """Counts the tokens CLIP's tokenizer makes of a caption (without start/end tokens).

    With the BPE merges it is exact; without them it approximates: one token per pre-tokenizer piece
    plus one for every further 6 characters of a long piece (rare words split into several BPE tokens).
    On English and dermatology text it lands within -10 %/+20 % of the exact count (median +4 %): it
    over-counts slightly rather than missing a cut.
    """

    def __init__(self, merges_file: Path | None = None) -> None:
        self._ranks: dict[tuple[str, str], int] | None = None
        self._cache: dict[str, int] = {}
        if merges_file is not None:
            merges = [tuple(line.split()) for line in clip_bpe.read_merges(merges_file)]
            self._ranks = {pair: i for i, pair in enumerate(merges) if len(pair) == 2}  # type: ignore[misc]
            self._byte_chars = clip_bpe.bytes_to_unicode()
        self.exact = self._ranks is not None
        self.name = "CLIP BPE (open_clip vocabulary)" if self.exact else "approximate (open_clip_torch not installed)"

    def count(self, text: str) -> int:
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        return sum(self._piece_tokens(piece) for piece in _CLIP_PIECES.findall(text))

    def _piece_tokens(self, piece: str) -> int:
        cached = self._cache.get(piece)
        if cached is None:
            cached = self._bpe_length(piece) if self._ranks is not None else 1 + max(0, len(piece) - 1) // 6
            self._cache[piece] = cached
        return cached

    def _bpe_length(self, piece: str) -> int:
        assert self._ranks is not None
        word = [self._byte_chars[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self._ranks.get(pair, 1 << 30))  # type: ignore[union-attr]
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return len(word)


@lru_cache(maxsize=1)
def clip_token_counter() -> ClipTokenCounter:
    """The best counter this environment offers (loading the merges takes ~0.1 s, so it is kept)."""
    return ClipTokenCounter(clip_bpe.merges_file())
