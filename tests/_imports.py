"""Which heavy packages a piece of code imports, seen in a fresh interpreter (nothing a test ran before counts)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "transformers", "diffusers", "safetensors", "scipy")


def heavy_imports(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The top-level packages of `heavy` loaded after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(heavy)!r}))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
