"""A network's weights copied to the host in one transfer per dtype (dermkohya/networks/host_copy.py): the same
values bit for bit, in the same order, and through accelerate's save-state hook the same state file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dermkohya.networks import host_copy


def _network(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(7, 3), "b": torch.nn.Conv2d(3, 5, 1), "c": torch.nn.Linear(5, 2)})
    net["c"].half()  # a second dtype: a second transfer
    net.register_buffer("alpha", torch.tensor(4.0))
    return net.to(device)


def test_host_tensors_pass_through_detached_in_order() -> None:
    net = _network()
    state = net.state_dict(keep_vars=True)
    out = host_copy.to_host(state)
    assert list(out) == list(state)
    for name, tensor in out.items():
        assert not tensor.requires_grad and tensor.data_ptr() == state[name].data_ptr()
    assert host_copy.to_host({"n": 3, "s": "x"}) == {"n": 3, "s": "x"}


def _accelerator_with_hook(tmp_path: Path, net: torch.nn.Module, other: torch.nn.Module, hook: bool) -> dict[str, Any]:
    """Save accelerate's state of (net, other) with or without the hook; what a later hook saw and the file."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=net.alpha.device.type == "cpu")
    net, other = accelerator.prepare(net, other)
    seen: dict[str, Any] = {}
    if hook:
        host_copy.install_state_hook(accelerator, accelerator.unwrap_model(net))

    def after(models: list[Any], weights: list[Any], output_dir: str) -> None:  # as kohya's, registered later
        seen["weights"] = list(weights)
        seen["originals"] = [m.state_dict() for m in models]

    accelerator.register_save_state_pre_hook(after)
    folder = tmp_path / ("hooked" if hook else "plain")
    accelerator.save_state(str(folder))
    seen["files"] = {p.name: load_file(str(p)) for p in sorted(folder.glob("model*.safetensors"))}
    seen["bytes"] = {p.name: p.read_bytes() for p in sorted(folder.glob("model*.safetensors"))}
    return seen


def test_the_save_state_hook_replaces_only_the_networks_weights(tmp_path: Path) -> None:
    seen = _accelerator_with_hook(tmp_path, _network(), torch.nn.Linear(2, 2), hook=True)
    net_weights, other_weights = seen["weights"]
    assert isinstance(net_weights, dict) and set(net_weights) == set(seen["originals"][0])
    assert all(torch.equal(net_weights[k], v) for k, v in seen["originals"][0].items())
    assert list(other_weights) == list(seen["originals"][1])  # the other model's state dict is accelerate's own
    plain = _accelerator_with_hook(tmp_path, _network(), torch.nn.Linear(2, 2), hook=False)
    assert seen["bytes"] == plain["bytes"]  # the same state files


@pytest.mark.gpu
def test_device_tensors_come_back_bit_for_bit_in_one_transfer_per_dtype() -> None:
    net = _network("cuda")
    state = net.state_dict()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        shared = host_copy.to_host(state)
        torch.cuda.synchronize()
    copies = [e for e in prof.events() if e.name.startswith("Memcpy DtoH")]
    assert len(copies) == 2  # fp32 and fp16; kohya's loop makes one per tensor (7 here)
    assert list(shared) == list(state)
    for name, tensor in shared.items():
        assert tensor.device.type == "cpu" and tensor.dtype == state[name].dtype and tensor.shape == state[name].shape
        assert torch.equal(tensor, state[name].cpu())
    by_dtype: dict[torch.dtype, set[int]] = {}
    for tensor in shared.values():
        by_dtype.setdefault(tensor.dtype, set()).add(tensor.untyped_storage().data_ptr())
    assert all(len(ptrs) == 1 for ptrs in by_dtype.values())  # views of one host buffer per dtype
    own = host_copy.to_host(state, own_storage=True)
    assert len({t.untyped_storage().data_ptr() for t in own.values()}) == len(own)
    assert all(torch.equal(own[k], shared[k]) for k in own)


@pytest.mark.gpu
def test_on_a_gpu_the_hooked_state_file_is_the_same_bytes(tmp_path: Path) -> None:
    hooked = _accelerator_with_hook(tmp_path, _network("cuda"), torch.nn.Linear(2, 2).cuda(), hook=True)
    plain = _accelerator_with_hook(tmp_path, _network("cuda"), torch.nn.Linear(2, 2).cuda(), hook=False)
    assert all(t.device.type == "cpu" for t in hooked["weights"][0].values())
    assert hooked["bytes"] == plain["bytes"] and set(hooked["files"]["model.safetensors"]) == set(_network().state_dict())
