"""Adam's state packed into one buffer per kind (dermkohya/networks/flat_state.py): the same training, a
state file of a few records, and a resume that continues the same way."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dermkohya.networks import flat_state


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv1d(5, 4, 1), torch.nn.Linear(1, 3))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(2, 6, generator=g).to(next(model.parameters()).device)
    h = model[0](x).unsqueeze(-1)
    return model[2](model[1](h)).pow(2).mean()


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        optimizer.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


OPTIMIZERS = {
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True, foreach=False),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_packed_state_trains_exactly_like_torchs_own(kind: str) -> None:
    _same_training(OPTIMIZERS[kind], "cpu")


def _same_training(make: Any, device: str) -> None:
    plain, packed = _model().to(device), _model().to(device)
    plain_opt, packed_opt = make(plain.parameters()), make(packed.parameters())
    handle = flat_state.install(packed.parameters)
    try:
        losses = _train(plain, plain_opt, range(6)), _train(packed, packed_opt, range(6))
    finally:
        handle.remove()
    assert losses[0] == losses[1]
    for a, b in zip(plain.parameters(), packed.parameters()):
        assert torch.equal(a, b)
    assert getattr(packed_opt, flat_state.PACKED) and not hasattr(plain_opt, flat_state.PACKED)
    states = list(packed_opt.state.values())
    storages = {s["exp_avg"].untyped_storage().data_ptr() for s in states}
    assert len(states) == 6 and len(storages) == 1  # every parameter's exp_avg is a view of one buffer
    for state, ref in zip(states, plain_opt.state.values()):
        assert {k: (v.dtype, v.shape, v.device) for k, v in state.items()} == {k: (v.dtype, v.shape, v.device) for k, v in ref.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adamw-fused", "adamw-capturable"])
def test_packed_state_on_a_gpu_keeps_the_steps_in_one_buffer(kind: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    capturable = {"adamw-capturable": lambda params: torch.optim.AdamW(params, lr=1e-2, capturable=True, foreach=False)}
    _same_training((OPTIMIZERS | capturable)[kind], "cuda")


def test_the_saved_state_has_a_few_records_and_resumes_the_same(tmp_path: Path) -> None:
    model = _model()
    optimizer = OPTIMIZERS["adamw-fused"](model.parameters())
    handle = flat_state.install(model.parameters)
    _train(model, optimizer, range(3))
    handle.remove()
    packed_file, plain_file = tmp_path / "packed.bin", tmp_path / "plain.bin"
    torch.save(optimizer.state_dict(), packed_file)
    reference = _model()
    reference_opt = OPTIMIZERS["adamw-fused"](reference.parameters())
    _train(reference, reference_opt, range(3))
    torch.save(reference_opt.state_dict(), plain_file)

    def records(path: Path) -> int:
        with zipfile.ZipFile(path) as archive:
            return sum(1 for name in archive.namelist() if "/data/" in name)

    assert records(packed_file) == 3 and records(plain_file) == 6 * 3  # exp_avg, exp_avg_sq, steps

    # resume both from their files into fresh optimizers (the packed one re-packs what it loaded)
    finals = []
    for path, pack in ((packed_file, True), (plain_file, False)):
        resumed = _model()
        resumed.load_state_dict(model.state_dict())
        opt = OPTIMIZERS["adamw-fused"](resumed.parameters())
        opt.load_state_dict(torch.load(path, weights_only=True))
        hook = flat_state.install(resumed.parameters) if pack else None
        _train(resumed, opt, range(3, 6))
        if hook is not None:
            hook.remove()
            assert len({s["exp_avg_sq"].untyped_storage().data_ptr() for s in opt.state.values()}) == 1
        finals.append([p.detach().clone() for p in resumed.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_an_optimizer_it_does_not_know_is_left_alone() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = flat_state.install(model.parameters)
    _train(model, optimizer, range(2))
    assert getattr(optimizer, flat_state.PACKED)  # looked at once, then the hook is gone
    assert flat_state.pack(optimizer) == "SGD is not torch's Adam or AdamW"
    assert len({s["momentum_buffer"].untyped_storage().data_ptr() for s in optimizer.state.values()}) == 6
    handle.remove()


def test_an_optimizer_of_other_parameters_is_not_touched() -> None:
    ours, other = _model(), _model(1)
    handle = flat_state.install(ours.parameters)
    optimizer = OPTIMIZERS["adamw-fused"](other.parameters())
    _train(other, optimizer, range(2))
    handle.remove()
    assert not hasattr(optimizer, flat_state.PACKED)
    assert len({s["exp_avg"].untyped_storage().data_ptr() for s in optimizer.state.values()}) == 6
