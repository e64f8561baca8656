"""The LoRA gradients' mean over processes: one collective per dtype instead of one per tensor.

kohya trains a network under DDP without ever calling the DDP wrapper's forward (the LoRA layers run
inside the U-Net and the text encoder), so DDP's reducer never arms its hooks and averages nothing.
kohya syncs after backward instead, in `NetworkTrainer.all_reduce_network`: for each parameter an
`accelerator.reduce` (clone, all_reduce, divide), ~530 of them for an SD 1.5 LoRA with its text
encoder, each with its Python and c10d cost: on 2 × H200 most of the 2-GPU step's extra time (issue #18).

`all_reduce_grads` computes the same mean, the sum over processes then one division (with 2 processes
bit for bit kohya's: a + b is exact in either order), for all gradients at once: concatenate, one
all_reduce, one divide, and each `.grad` becomes a view of the result. Like kohya's clone, that leaves
the CUDA graphs' static gradient buffers alone. With one process the mean is the gradient itself, and
nothing is done (kohya clones every gradient).

`install` puts it on the trainer in place of kohya's method, for a network of the given type only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

MARK = "dk_grad_sync"  # set on the installed function: installing twice keeps one


def all_reduce_grads(params: Iterable[torch.nn.Parameter], world_size: int) -> int:
    """Replace each set `.grad` by its mean over `world_size` processes; returns the collectives issued.

    Every process must hold gradients for the same parameters in the same order, as for kohya's loop."""
    if world_size <= 1:
        return 0
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for param in params:
        if param.grad is not None:
            groups.setdefault((param.grad.dtype, param.grad.device), []).append(param)
    for members in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for p in members:
            count = p.grad.numel()
            p.grad = flat[offset:offset + count].view(p.grad.shape)
            offset += count
    return len(groups)


def install(trainer: Any, network_type: type) -> bool:
    """Sync a `network_type` network's gradients with `all_reduce_grads` in the trainer's
    `all_reduce_network` (kohya calls it after backward when gradients sync); other networks keep kohya's."""
    kohya_sync: Callable[[Any, Any], None] | None = getattr(trainer, "all_reduce_network", None)
    if not callable(kohya_sync):
        return False
    if getattr(kohya_sync, MARK, False):
        return True

    def all_reduce_network(accelerator: Any, network: Any) -> None:
        if not isinstance(accelerator.unwrap_model(network), network_type):
            kohya_sync(accelerator, network)
            return
        all_reduce_grads(network.parameters(), accelerator.num_processes)

    setattr(all_reduce_network, MARK, True)
    trainer.all_reduce_network = all_reduce_network
    return True


def calling_trainer(depth: int = 2) -> Any | None:
    """The kohya trainer whose method called our caller: kohya's `NetworkTrainer.train(self, args)` calls
    `network.prepare_network(args)`, which calls this. None when the caller is not such a method."""
    try:
        candidate = sys._getframe(depth).f_locals.get("self")
    except ValueError:  # called from the top of the stack
        return None
    return candidate if callable(getattr(candidate, "all_reduce_network", None)) else None
