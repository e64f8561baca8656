"""lora_fast `norms=half` (dermkohya/networks/half_norms.py): under autocast a U-Net block's GroupNorm and
LayerNorm run in the weights' half precision, with the forward and the gradients close to autocast's fp32 norms;
any other input runs as before."""

from __future__ import annotations

import pytest
import torch

from dermkohya.networks.half_norms import install as half_norms


class _Block(torch.nn.Module):
    """ResnetBlock2D's and BasicTransformerBlock's shape in short: conv, GroupNorm, SiLU, conv; LayerNorm, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.norm = torch.nn.GroupNorm(8, 32, eps=1e-5)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.ln = torch.nn.LayerNorm(32)
        self.proj = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = self.conv2(torch.nn.functional.silu(self.norm(h))) + h
        tokens = h.flatten(2).transpose(1, 2)
        return self.proj(self.ln(tokens))


def _block(dtype: torch.dtype, device: str) -> _Block:
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        for layer in (block.norm, block.ln):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return block.to(device=device, dtype=dtype)


def test_only_norm_layers_change_and_only_once() -> None:
    block = _block(torch.float32, "cpu")
    assert half_norms(block) == 2 and half_norms(block) == 0
    x = torch.randn(2, 8, 6, 6)
    reference = _block(torch.float32, "cpu")
    assert torch.equal(block(x), reference(x))  # fp32, no autocast: exactly as before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_norms_under_autocast_match_autocasts_fp32_norms(dtype: torch.dtype) -> None:
    x = torch.randn(4, 8, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)
    outputs, grads, norm_dtypes = {}, {}, {}
    for mode in ("autocast", "half"):
        block = _block(dtype, "cuda")
        if mode == "half":
            half_norms(block)
        seen: list[torch.dtype] = []
        block.norm.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        block.ln.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype):
            out = block(inp)
        out.float().square().mean().backward()
        outputs[mode], norm_dtypes[mode] = out.float(), seen
        grads[mode] = [inp.grad.float(), block.norm.weight.grad.float(), block.ln.weight.grad.float(),
                       block.conv1.weight.grad.float()]
    assert norm_dtypes["autocast"] == [torch.float32, torch.float32]  # what autocast does to norms
    assert norm_dtypes["half"] == [dtype, dtype]
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    assert torch.allclose(outputs["half"], outputs["autocast"], rtol=tol, atol=tol)
    for a, b in zip(grads["half"], grads["autocast"]):
        assert (a - b).norm() <= tol * b.norm()
