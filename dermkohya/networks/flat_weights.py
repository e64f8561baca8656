"""A graphed step's LoRA weights as views into one buffer: one cast and one gradient per step, not one per tensor.

Measured inside kohya's process on an H200 (bench/step_profile.py, kernels mode; issue #18): of an SD 1.5
LoRA step's 60 ms of GPU time, ~8 ms went to ~2,400 tiny copy kernels, two or three per LoRA tensor: autocast
casting each fp32 weight to fp16 in the forward, the fp16 gradient cast back to fp32 in the backward; SDXL
(~2,000 LoRA tensors) launched ~8,300 of them a step, and the host spent more time on the per-tensor
bookkeeping around a replay (one graph input, one gradient, one AccumulateGrad per tensor) than the GPU
spent on the step.

`FlatWeights(module)` moves the module's parameters (the LoRA weights a graph is captured over) into one
buffer: each parameter stays the same object (optimizer, state dict and file names unchanged) with its
data a view of the buffer, and the buffer itself is the graph's one weight input. Inside the graph,
`weights(flat)` casts it once to the autocast dtype and splits it into the parameters' shapes; autograd
turns the split's backward into one concatenation and the cast's into one cast. After backward the buffer's
gradient is handed out as views, one per parameter (`p.grad`), before the optimizer runs.

The values are the same: autocast casts each weight to the same dtype for every op that reads it, and the
casts are elementwise. Several processes keep per-tensor inputs (DDP's own bookkeeping holds each tensor).
"""

from __future__ import annotations

import torch


def why_not(params: list[torch.nn.Parameter]) -> str | None:
    """Why these parameters cannot share one buffer, or None."""
    if not params:
        return "no parameters"
    if len({(p.device, p.dtype) for p in params}) != 1:
        return "parameters on several devices or of several dtypes"
    if any(not p.requires_grad or not p.is_contiguous() or p.is_sparse for p in params):
        return "frozen, non-contiguous or sparse parameters"
    return None


class FlatWeights:
    """The parameters of `module` as views into one buffer (see the module docstring)."""

    def __init__(self, module: torch.nn.Module) -> None:
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        reason = why_not(self.params)
        if reason is not None:
            raise ValueError(f"flat weights: {reason}")
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        first = self.params[0]
        flat = torch.empty(sum(self.sizes), dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for p, view in zip(self.params, flat.split(self.sizes)):
                view.copy_(p.reshape(-1))
                p.data = view.view(p.shape)  # the same Parameter; its storage is now the buffer's
        self.flat = flat.requires_grad_()  # a leaf of its own: the graphs' weight input
        self.flat.register_post_accumulate_grad_hook(self._hand_out)
        self._ends = (self.params[0].data_ptr(), self.params[-1].data_ptr())

    def intact(self) -> bool:
        """Whether the parameters still live in the buffer (a `.to(dtype)` or a load that replaced their data would
        leave the graphs reading the buffer's stale copy)."""
        return (self.params[0].data_ptr(), self.params[-1].data_ptr()) == self._ends

    def weights(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters by name, from `flat` (the buffer or an alias of it): cast once to the autocast dtype
        when autocast would cast each of them, then split (no copies)."""
        if torch.is_autocast_enabled(flat.device.type) and flat.dtype == torch.float32:
            flat = flat.to(torch.get_autocast_dtype(flat.device.type))
        return {name: part.view(shape) for name, part, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def _hand_out(self, flat: torch.Tensor) -> None:
        """After backward: the buffer's gradient as each parameter's `.grad` (views; summed into one already set)."""
        grad, flat.grad = flat.grad, None
        for p, part in zip(self.params, grad.split(self.sizes)):
            part = part.view(p.shape)
            if p.grad is None:
                p.grad = part
            else:
                p.grad.add_(part)
