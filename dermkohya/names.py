"""Folder-safe names, the one rule every stage uses for a diagnosis in a path (prepare, generate)."""

from __future__ import annotations

import re


def slug(text: str) -> str:
    """Lower case, runs of anything but letters and digits → '-' ("Melanoma, NOS" → "melanoma-nos");
    "" when nothing is left, so a caller can refuse or name it."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
