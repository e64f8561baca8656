"""Which SDPA kernels torch tries first: its own order ("auto"), or cuDNN's attention first ("cudnn").

Kohya-side (stdlib and torch only: copied into a project's kohya import folder with the rest of networks/).
Shared by generation (`[engine] attention`) and training (`lora_fast`'s `sdpa=` network argument). Where cuDNN
cannot run a shape (e.g. the VAE's one 512-wide head, or a head dim it does not take) the next kernel in the
order does, so "cudnn" never fails where "auto" runs. Only CUDA has a choice; elsewhere both are torch's own.
"""

from __future__ import annotations

import contextlib
from typing import Any

KINDS = ("auto", "cudnn")


def sdpa_preference(kind: str, device: str) -> Any:
    """A context manager that makes `F.scaled_dot_product_attention` prefer `kind`'s kernels on `device`."""
    if kind not in KINDS:
        raise ValueError(f"attention {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "auto" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
