"""The short name of the GPU a benchmark ran on, for its result files: `NVIDIA H200` → `h200`.

`python bench/gpu_name.py` prints it (bench/gpu_run.sh names its outputs with it); `slug()` is the same for
the harnesses. Asks nvidia-smi, then torch; `cpu` where neither sees a GPU. Only GPU 0 (the one a
single-GPU call uses, after CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# a model number as NVIDIA prints it: H200, H100, A100, L40S, B200, GH200, RTX 4090 → h200, h100, a100, l40s, …
_MODEL = re.compile(r"\b(?:RTX\s*)?([A-Z]{0,2}\d{2,4}[A-Z]?)\b", re.IGNORECASE)


def from_name(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` → `h100`; `NVIDIA GeForce RTX 4090` → `4090`; anything else → a slug of it."""
    text = name.replace("NVIDIA", " ").replace("GeForce", " ")
    for match in _MODEL.finditer(text):
        token = match.group(1)
        if re.search(r"\d", token) and not token.upper().endswith("GB"):
            return token.lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def visible_index() -> str:
    """The index nvidia-smi and NVML know the call's GPU by: CUDA_VISIBLE_DEVICES' first entry (a number), else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible if visible.isdigit() else "0"


def device_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible_index()],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def slug() -> str:
    name = device_name()
    return from_name(name) if name else "cpu"


if __name__ == "__main__":
    print(slug() if len(sys.argv) < 2 else from_name(" ".join(sys.argv[1:])))
