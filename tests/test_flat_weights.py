"""A graph's LoRA weights as views into one buffer (dermkohya/networks/flat_weights.py): the same parameters and
values, one cast, and gradients handed out as views equal to the ones autograd gives each tensor."""

from __future__ import annotations

import pytest
import torch

from dermkohya.networks.flat_weights import FlatWeights, why_not


class _Net(torch.nn.Module):
    """Linear, 1x1 conv and linear-with-bias weights, like a LoRA's down, up and a conv LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 4, bias=False)
        self.b = torch.nn.Conv2d(4, 3, 1, bias=False)
        self.c = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)[:, :, None, None])[:, :, 0, 0]).float().pow(2).mean()


def _module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _Net()


def _loss(module: torch.nn.Module, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    return module(x) if params is None else torch.func.functional_call(module, params, (x,))


def test_parameters_become_views_of_one_buffer_with_their_values() -> None:
    module, reference = _module(), _module()
    params = list(module.parameters())
    flat = FlatWeights(module)
    assert list(module.parameters()) == params  # the same Parameter objects (the optimizer holds these)
    assert flat.flat.numel() == sum(p.numel() for p in params) and flat.flat.requires_grad and flat.flat.is_leaf
    for p, ref in zip(module.parameters(), reference.parameters()):
        assert torch.equal(p, ref) and p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
    with torch.no_grad():
        params[0].add_(1.0)  # an optimizer's in-place update is seen by the buffer (and so by a graph)
    assert torch.equal(flat.flat[: params[0].numel()].view_as(params[0]), params[0])
    assert flat.intact()
    params[-1].data = params[-1].data.clone()
    assert not flat.intact()


def test_weights_are_views_without_autocast_and_one_cast_under_it() -> None:
    module = _module()
    flat = FlatWeights(module)
    plain = flat.weights(flat.flat)
    assert [tuple(t.shape) for t in plain.values()] == [tuple(p.shape) for p in module.parameters()]
    assert all(t.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr() for t in plain.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = flat.weights(flat.flat)
    assert all(t.dtype == torch.bfloat16 for t in cast.values())
    assert len({t.untyped_storage().data_ptr() for t in cast.values()}) == 1  # one cast buffer, split
    assert all(torch.equal(c, p.to(torch.bfloat16)) for c, p in zip(cast.values(), module.parameters()))


@pytest.mark.parametrize("autocast", [False, True])
def test_the_buffers_gradient_is_handed_out_as_each_parameters_own(autocast: bool) -> None:
    reference = _module()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _loss(reference).backward()
    module = _module()
    flat = FlatWeights(module)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = _loss(module, flat.weights(flat.flat))
    loss.backward()
    assert flat.flat.grad is None  # handed out
    for p, ref in zip(module.parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert torch.equal(p.grad, ref.grad)  # the same values as autograd's per-tensor path
    assert len({p.grad.untyped_storage().data_ptr() for p in module.parameters()}) == 1
    first = [p.grad.clone() for p in module.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        again = _loss(module, flat.weights(flat.flat))
    again.backward()  # a gradient already set: summed, as autograd would
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(module.parameters(), first))


def test_parameters_that_cannot_share_a_buffer_are_named() -> None:
    assert why_not([]) == "no parameters"
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    assert "dtypes" in why_not(mixed)
    frozen = [torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    assert "frozen" in why_not(frozen)
    with pytest.raises(ValueError, match="flat weights: .*dtypes"):
        module = torch.nn.Module()
        module.a, module.b = mixed
        FlatWeights(module)
