"""Where dermkohya's own files live (templates, the vendored sd-scripts, kohya's environment)."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"  # package data: ships in the wheel
VENDORED_SD_SCRIPTS = PROJECT_ROOT / "vendor" / "sd-scripts"
DEFAULT_KOHYA_PYTHON = PROJECT_ROOT / ".venv-kohya" / "bin" / "python"


def cache_root() -> Path:
    """dermkohya's machine-local cache (hashes, kohya's option lists): $DERMKOHYA_CACHE or ~/.cache/dermkohya."""
    import os

    env = os.environ.get("DERMKOHYA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dermkohya"
