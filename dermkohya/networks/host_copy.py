"""A network's weights copied to the host in one transfer per dtype, for kohya's epoch-end saves (issue #18).

At every epoch end kohya saves the LoRA (`save_weights`: each of the ~1,060 tensors of an SD 1.5 LoRA
with its text encoder cloned and copied to the host on its own) and, with `save_state` (dermkohya's
default), accelerate's state, whose `model.safetensors` copies each tensor to the host again
(safetensors, tensor by tensor). Each copy is a device-to-host transfer the host waits for. `to_host`
makes the same copies with one `cat` on the device and one transfer per (device, dtype): the same
values, bit for bit, in the same order.

The transfer goes into pinned host memory (torch's caching host allocator keeps it for the next epoch's
copy): an SDXL epoch end copies ~750 MB, which pageable memory took most of a second to take in. Without
pinned memory (no CUDA, or its allocation fails) the copy goes to ordinary memory.

The copies are views of one host buffer per dtype; `own_storage=True` gives every tensor a storage of its
own (accelerate drops all but one of tensors that share a storage from an OrderedDict it saves as
safetensors; a plain dict, which `to_host` returns, it saves whole, and safetensors takes views that do not
overlap).

`install_state_hook(accelerator, network)` registers an accelerate save-state pre-hook (accelerate's own
extension point) that hands accelerate the network's weights already on the host, as a `HostCopy`: a dict
made for that save alone, which background_state.py writes as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class HostCopy(dict):
    """A host copy made for one save (nobody else holds it): written as it is, not copied again."""


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
        host = _host_buffer(torch.cat([p.reshape(-1) for p in parts]))  # a new buffer, on the host as on a device
        for name, part, view in zip(names, parts, host.split([p.numel() for p in parts])):
            view = view.view(part.shape)
            out[name] = view.clone() if own_storage else view
    return out


def _host_buffer(flat: torch.Tensor) -> torch.Tensor:
    """`flat` copied into a new host tensor: pinned when it comes from a CUDA device (one fast transfer)."""
    if flat.device.type == "cuda":
        try:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        except RuntimeError:  # no pinned memory to be had: ordinary memory
            return flat.cpu()
        host.copy_(flat)  # waits for the copy: the caller hands the buffer on at once
        return host
    return flat.cpu() if flat.device.type != "cpu" else flat


def install_state_hook(accelerator: Any, network: torch.nn.Module) -> Any:
    """Before accelerate's `save_state` writes the models' weights: the network's, copied by `to_host`.
    The handle, or None when this accelerate has no save-state hooks."""
    register = getattr(accelerator, "register_save_state_pre_hook", None)
    if not callable(register):
        return None

    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for i, model in enumerate(models):
            if i < len(weights) and accelerator.unwrap_model(model) is network and isinstance(weights[i], Mapping):
                weights[i] = HostCopy(to_host(weights[i], copy_host=True))  # a copy wherever the weights are

    return register(hook)
