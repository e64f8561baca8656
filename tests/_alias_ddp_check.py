"""Run by tests/test_networks.py under torchrun (2 gloo processes) with kohya's Python, from sd-scripts.

lora_fast captures the U-Net step over alias leaves of the LoRA weights (`capture_over_aliases`) so
that the capture never reaches the parameters' AccumulateGrad nodes, which DDP holds (issue #18). CUDA
graphs need a GPU; here `make_graphed_callables`' contract is kept by an eager stand-in (a static input
surface, user inputs copied in when their storage differs, backward = autograd.grad of the outputs with
respect to that surface), and the rest is real: kohya's LoRA network adopted by lora_fast, accelerate's
DDP around it as kohya prepares it, the replay called with the real parameters, backward, the bucketed
sync. Rank 0 prints one JSON object: per step, the alias path's synced gradients against the current
eager path's, and which leaves the "capture" reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path.cwd()))  # the sd-scripts folder, first, as when kohya runs a script from it
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _networks_check import TinyTextEncoder, TinyUNet  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from dermkohya.networks import grad_sync, lora_fast  # noqa: E402

STEPS = 3


def leaves_reached(outputs: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose AccumulateGrad nodes an autograd graph reaches."""
    seen, stack, leaves = set(), [outputs.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


class EagerGraphs:
    """make_graphed_callables' contract on a CPU: forward runs the callable on the static input surface
    (the sample args), backward returns its gradients with respect to that surface."""

    def __init__(self) -> None:
        self.reached: list[torch.Tensor] = []
        self.surface: tuple[torch.Tensor, ...] = ()

    def __call__(self, fn: Any, sample_args: tuple[torch.Tensor, ...], num_warmup_iters: int = 0,
                 allow_unused_input: bool = False) -> Any:
        static = self.surface = tuple(sample_args)
        self.reached = leaves_reached(fn(*static))  # what the capture's autograd graph holds

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *inputs: torch.Tensor) -> torch.Tensor:
                for s, i in zip(static, inputs):
                    if s.data_ptr() != i.data_ptr():
                        s.copy_(i)
                with torch.enable_grad():
                    ctx.out = fn(*static)
                return ctx.out.detach()

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                wanted = [s for s in static if s.requires_grad]
                grads = iter(torch.autograd.grad(ctx.out, wanted, grad, allow_unused=allow_unused_input))
                return tuple(next(grads) if s.requires_grad else None for s in static)

        return lambda *inputs: Graphed.apply(*inputs)


def train(path: str, accelerator: Accelerator) -> dict[str, Any]:
    torch.manual_seed(0)
    te, unet = TinyTextEncoder(), TinyUNet()
    te.requires_grad_(False)
    unet.requires_grad_(False)
    torch.manual_seed(1)
    network = lora_fast.create_network(1.0, 4, 2.0, None, te, unet, cuda_graph="off")
    network.apply_to(te, unet, True, True)
    with torch.no_grad():  # kohya's up weights start at zero: move them so every gradient is non-zero
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    wrapped, optimizer = accelerator.prepare(network, optimizer)  # DDP: holds the AccumulateGrad nodes
    graphs = lora_fast.UNetGraphs(unet, network.unet_loras, max_graphs=1)
    standin = EagerGraphs()
    replay = None
    out: dict[str, Any] = {"ddp_type": type(wrapped).__name__, "grads": [], "losses": []}
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 * step + accelerator.process_index)
        tokens, latents = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 8, 6, 6, generator=gen)
        cond = te(tokens)
        if path == "aliases":
            if replay is None:
                sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in (latents, cond))  # as _capture
                replay = lora_fast.capture_over_aliases(lora_fast._UNetStep(graphs), sample, make_graphed=standin)
            pred = replay(latents, cond)
        else:
            pred = unet(latents, cond)
        loss = pred.float().pow(2).mean()
        accelerator.backward(loss)
        grad_sync.all_reduce_grads(network.parameters(), accelerator.num_processes)
        out["grads"].append(torch.cat([p.grad.reshape(-1) for p in network.parameters()]))
        out["losses"].append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = list(network.parameters())
    unet_params = [p for lora in network.unet_loras for p in lora.parameters()]
    out["weights"] = torch.cat([p.detach().reshape(-1) for p in params])
    if path == "aliases":
        reached = standin.reached
        out["reached"] = len(reached)
        out["reached_a_parameter"] = any(r is p for r in reached for p in params)
        out["reached_aliases"] = sum(any(r is s for s in standin.surface) for r in reached)
        out["aliases_share_storage"] = all(
            s.data_ptr() == p.data_ptr() for s, p in zip(standin.surface[2:], unet_params))
        out["unet_params"] = len(unet_params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    eager, aliases = train("eager", accelerator), train("aliases", accelerator)
    result = {
        "world_size": accelerator.num_processes,
        "ddp_type": aliases["ddp_type"],
        "grads_equal": [torch.equal(a, b) for a, b in zip(aliases["grads"], eager["grads"])],
        "grad_max_diff": max(float((a - b).abs().max()) for a, b in zip(aliases["grads"], eager["grads"])),
        "losses_equal": aliases["losses"] == eager["losses"],
        "weights_equal": torch.equal(aliases["weights"], eager["weights"]),
        **{k: aliases[k] for k in ("reached", "reached_a_parameter", "reached_aliases", "aliases_share_storage",
                                   "unet_params")},
    }
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
