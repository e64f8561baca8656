"""lora_fast `norms=half`: a U-Net's GroupNorm and LayerNorm in half precision under autocast (issue #18).

Under fp16/bf16 autocast torch runs `group_norm` and `layer_norm` in fp32: each one's half input is cast up
(a copy of the activation), normalised in fp32 and handed on in fp32 (SiLU then runs in fp32 too) until the
next convolution or linear layer casts it back down (another copy). The kernel profile of kohya's SD 1.5 step
on an H200 counted 542 fp32-to-fp16 cast kernels a step (1.7 ms), beside the fp32 norms themselves. With `install`, each norm layer runs with autocast off for
it, in its weights' precision when its input has that dtype: half in, half out. torch's half kernels keep the
mean and variance (and the backward's sums) in fp32; what changes is the rounding of the output, which the
next layer would have rounded to half anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def install(module: torch.nn.Module) -> int:
    """Make each GroupNorm and LayerNorm in `module` run in its weights' precision when autocast is on and its
    input has that dtype (fp16/bf16): the same call with autocast off for it, so no fp32 copy of the input and
    output. Any other input runs as before. Returns how many layers were changed."""
    count = 0
    for layer in module.modules():
        if not isinstance(layer, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or getattr(layer, "_dk_half_norm", False):
            continue
        inner = layer.forward

        def forward(x: torch.Tensor, inner: Callable[..., Any] = inner, layer: torch.nn.Module = layer) -> Any:
            weight = getattr(layer, "weight", None)
            if (x.dtype in (torch.float16, torch.bfloat16) and weight is not None and weight.dtype == x.dtype
                    and torch.is_autocast_enabled(x.device.type)):
                with torch.autocast(x.device.type, enabled=False):
                    return inner(x)
            return inner(x)

        layer.forward = forward
        layer._dk_half_norm = True
        count += 1
    return count
