"""The Fitzpatrick skin-type vocabulary every stage shares (checker, prepare, generate, evaluate).

Types are the Roman numerals I–VI. Datasets that only record groups (DDI's 12/34/56) keep the group
("I-II", "III-IV", "V-VI"): a group is never split into invented single types.
"""

from __future__ import annotations

import re

FST_TYPES: tuple[str, ...] = ("I", "II", "III", "IV", "V", "VI")
FST_GROUPS: tuple[str, ...] = ("I-II", "III-IV", "V-VI")
UNKNOWN = "unknown"

_ROMAN = {str(i + 1): t for i, t in enumerate(FST_TYPES)}
_GROUP_DIGITS = {"12": "I-II", "34": "III-IV", "56": "V-VI"}
_NUMERAL = r"(?:VI|IV|V|I{1,3}|[1-6])"
_CAPTION_RE = re.compile(
    rf"fitzpatrick(?:\s+skin)?(?:\s+type)?\s*(?:fst\s*)?({_NUMERAL}(?:\s*[-–/]\s*{_NUMERAL})?)(?![\w-])", re.IGNORECASE
)


def parse_fst(value: object) -> str | None:
    """Normalise a skin-type code ("3", 3, "III", "FST3", "type iii", "34", "III-IV", -1) to the vocabulary.

    Returns UNKNOWN for the codes datasets use for 'not recorded' (-1, 0, "", "unknown", "nan") and None
    for anything unrecognised, so the caller can name the bad value and row.
    """
    text = str(value).strip()
    lowered = text.lower()
    if lowered in {"", "-1", "0", "unknown", "nan", "none", "na", "n/a"}:
        return UNKNOWN
    lowered = re.sub(r"^(fst|type|fitzpatrick)\s*", "", lowered).strip()
    if lowered.endswith(".0"):
        lowered = lowered[:-2]
    if lowered in _ROMAN:
        return _ROMAN[lowered]
    if lowered.upper() in FST_TYPES:
        return lowered.upper()
    if lowered in _GROUP_DIGITS:
        return _GROUP_DIGITS[lowered]
    if lowered.upper() in FST_GROUPS:
        return lowered.upper()
    return None


def fst_from_caption(caption: str) -> str | None:
    """The skin type a caption states ("... Fitzpatrick skin type IV ..."), if it states one."""
    match = _CAPTION_RE.search(caption)
    if not match:
        return None
    parts = re.split(r"\s*[-–/]\s*", match.group(1))
    return parse_fst(parts[0]) if len(parts) == 1 else parse_fst("-".join(parse_fst(p) or p for p in parts))
