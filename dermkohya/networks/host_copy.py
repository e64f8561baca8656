"""A network's weights copied to the host in one transfer per dtype, for kohya's epoch-end saves (issue #18).

At every epoch end kohya saves the LoRA (`save_weights`: each of the ~1,060 tensors of an SD 1.5 LoRA
with its text encoder cloned and copied to the host on its own) and, with `save_state` (dermkohya's
default), accelerate's state, whose `model.safetensors` copies each tensor to the host again
(safetensors, tensor by tensor). Each copy is a device-to-host transfer the host waits for. `to_host`
makes the same copies with one `cat` on the device and one transfer per (device, dtype): the same
values, bit for bit, in the same order.

`own_storage=True` gives every tensor a storage of its own: accelerate's safetensors save treats tensors
that share a storage as aliases and keeps only one of them.

`install_state_hook(accelerator, network)` registers an accelerate save-state pre-hook (accelerate's own
extension point) that hands accelerate the network's weights already on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_host(tensors: Mapping[str, torch.Tensor], own_storage: bool = False,
            copy_host: bool = False) -> dict[str, torch.Tensor]:
    """`tensors` on the host, detached, in the same order; one device-to-host copy per (device, dtype) group
    of device tensors. Host tensors are detached as they are (kohya and accelerate copy or write them), or with
    `copy_host` copied the same way: one copy per dtype."""
    out: dict[str, Any] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or (tensor.device.type == "cpu" and not copy_host):
            out[name] = tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
        else:
            groups.setdefault((tensor.device, tensor.dtype), []).append(name)
            out[name] = None  # keeps the order; filled below
    for names in groups.values():
        parts = [tensors[name].detach() for name in names]
        host = torch.cat([p.reshape(-1) for p in parts]).cpu()  # a new buffer, on the host as on a device
        for name, part, view in zip(names, parts, host.split([p.numel() for p in parts])):
            view = view.view(part.shape)
            out[name] = view.clone() if own_storage else view
    return out


def install_state_hook(accelerator: Any, network: torch.nn.Module) -> Any:
    """Before accelerate's `save_state` writes the models' weights: the network's, copied by `to_host`.
    The handle, or None when this accelerate has no save-state hooks."""
    register = getattr(accelerator, "register_save_state_pre_hook", None)
    if not callable(register):
        return None

    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for i, model in enumerate(models):
            if i < len(weights) and accelerator.unwrap_model(model) is network and isinstance(weights[i], Mapping):
                weights[i] = to_host(weights[i], own_storage=True)

    return register(hook)
