"""Where dermkohya's own files live: its templates (package data) and its machine-local cache.

A project's files (run files, kohya's checkout and environment) are found from the project, at call
time: see `dermkohya.project`. Nothing here depends on where the package is installed but the templates.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"  # package data: ships in the wheel


def cache_root() -> Path:
    """dermkohya's machine-local cache (hashes, kohya's option lists): $DERMKOHYA_CACHE or ~/.cache/dermkohya."""
    import os

    env = os.environ.get("DERMKOHYA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dermkohya"
