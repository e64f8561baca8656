"""Adam's state in one buffer per kind, so that kohya's epoch-end state saves copy it in a few pieces (issue #18).

kohya saves accelerate's state at every epoch end when `save_state` is on (dermkohya's default: what
`--resume` continues from). Its optimizer part is `torch.save` of Adam's state: for each of the ~530
LoRA tensors an `exp_avg`, an `exp_avg_sq` and (fused or capturable) a `step` tensor on the GPU, each
copied to the host on its own, a wait for the GPU each, and written as its own zip record. On an H200
that state save cost a 72-step run 16 % of its steps' time (`dermkohya-no-save-state` lever).

`pack(optimizer)` lays the state out as views into one buffer per kind (and per device and dtype): the
same values, shapes and dtypes, the same update kernels (fused, foreach or per tensor: they take a
list of tensors either way). `torch.save` writes a storage once however many tensors view it, so the
state file holds three records instead of ~1,600, and `torch.load` gives the views back. A state that
is already there (a resumed run's) is copied into the buffers; state made later, for a tensor that
had no gradient at the first step, is left as torch makes it.

`install(network)` packs the optimizer that steps the network's parameters, once, just before its first
step (a global optimizer step pre-hook, removed after it ran): kohya builds the optimizer itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

PACKED = "_dermkohya_flat_state"  # set on an optimizer once the hook has looked at it


def _scalar_dtype(fused: bool) -> torch.dtype | None:
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:  # a torch without it: leave the state as torch makes it
        return None
    return _get_scalar_dtype(is_fused=fused) if fused else _get_scalar_dtype()


def pack(optimizer: torch.optim.Optimizer) -> str | None:
    """Lay the state of every parameter that has a gradient out as views into shared buffers. Returns
    None when done, else why the state was left alone."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(optimizer).__name__} is not torch's Adam or AdamW"
    flags = {tuple(bool(group.get(key)) for key in ("fused", "capturable", "amsgrad", "differentiable"))
             for group in optimizer.param_groups}  # fmt: skip
    if len(flags) != 1:
        return "its parameter groups differ in fused/capturable/amsgrad"
    fused, capturable, amsgrad, differentiable = flags.pop()
    if differentiable:
        return "differentiable=True"
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return "no parameter has a gradient"
    if any(p.is_sparse or p.grad.is_sparse or torch.is_complex(p) or not p.is_contiguous() for p in params):
        return "sparse, complex or non-contiguous parameters"
    if len({(p.device, p.dtype) for p in params}) != 1:
        return "parameters on several devices or of several dtypes"
    step_dtype = _scalar_dtype(fused)
    if step_dtype is None:
        return "this torch has no optimizer._get_scalar_dtype"
    first = params[0]
    sizes = [p.numel() for p in params]
    states = [optimizer.state[p] for p in params]
    for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
        flat = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
        for p, state, view in zip(params, states, flat.split(sizes)):
            view = view.view_as(p)
            if key in state:
                view.copy_(state[key])
            state[key] = view
    if fused or capturable:  # steps on the device: one buffer too (CPU steps cost no device copy)
        steps = torch.zeros(len(params), dtype=step_dtype, device=first.device)
        for i, state in enumerate(states):
            if "step" in state:
                steps[i].copy_(state["step"])
            state["step"] = steps[i]
    else:
        for state in states:
            state.setdefault("step", torch.tensor(0.0, dtype=step_dtype))
    return None


def install(parameters: Callable[[], Any]) -> Any:
    """Pack the optimizer stepping any of `parameters()` just before its first step; the hook's handle."""
    handle: Any = None

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if getattr(optimizer, PACKED, False):
            return
        ours = {id(p) for p in parameters()}
        if not any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
            return
        why_not = pack(optimizer)
        setattr(optimizer, PACKED, True)
        handle.remove()
        if why_not is None:
            logger.info("dermkohya lora_fast: optimizer state in one buffer per kind (flat_state=on)")
        else:
            logger.info("dermkohya lora_fast: optimizer state left as torch makes it (%s)", why_not)

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(hook)
    return handle
