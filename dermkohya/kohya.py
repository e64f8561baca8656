"""Find and verify sd-scripts and kohya's Python, build kohya's argv, launch it, follow its progress."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dermkohya.errors import DermkohyaError
from dermkohya.paths import DEFAULT_KOHYA_PYTHON, VENDORED_SD_SCRIPTS

PINNED_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"


def find_sd_scripts() -> Path:
    """SD_SCRIPTS_DIR if set, else the vendored submodule."""
    env = os.environ.get("SD_SCRIPTS_DIR")
    folder = Path(env) if env else VENDORED_SD_SCRIPTS
    if not (folder / "train_network.py").is_file():
        where = f"SD_SCRIPTS_DIR={env}" if env else str(folder)
        raise DermkohyaError(
            f"sd-scripts not found ({where} has no train_network.py): run `make setup` "
            "or set SD_SCRIPTS_DIR to a kohya-ss/sd-scripts checkout"
        )
    return folder.resolve()


def find_python() -> Path:
    """KOHYA_PYTHON if set, else the environment `make setup` builds."""
    env = os.environ.get("KOHYA_PYTHON")
    python = Path(env) if env else DEFAULT_KOHYA_PYTHON
    if not python.exists():
        where = f"KOHYA_PYTHON={env}" if env else str(python)
        raise DermkohyaError(
            f"kohya's Python not found ({where}): run `make setup` or set KOHYA_PYTHON "
            "to the python of an environment with sd-scripts' requirements"
        )
    return python


def sd_scripts_commit(folder: Path) -> str | None:
    """The checkout's commit, or None when it is not a git checkout (kohya then records none either)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None
