"""kohya's LoRA with less host work per step: `[network] module = "dermkohya.networks.lora_fast"`.

At batch 4 and 512 px an SD 1.5 LoRA step on a datacentre GPU is bound by the host, not the GPU:
thousands of small kernels a step (each of the 264 LoRA layers adds GEMMs, casts, scalar multiplies
and an add to the U-Net's own ops), each dispatched from Python. This module keeps everything that
defines the result kohya's own and changes only how a step is issued:

* The network is the object sd-scripts' `networks.lora.create_network` builds: the same layers,
  names, initialisation, optimizer groups and `save_weights` (kohya's `ss_*` metadata and hashes).
  The saved file is therefore a networks.lora file, and says so (`ss_network_module` is
  "networks.lora"; the module that trained it is recorded under `dermkohya.trained_with`).
* Each LoRA layer's forward is fused. Linear: `addmm(org, x·Wdownᵀ, Wupᵀ, alpha=multiplier·scale)`,
  one GEMM whose epilogue does the scale and the residual add (kohya: GEMM, two scalar multiplies,
  an add). Conv2d: one `add(org, up(down(x)), alpha=…)`. Dropout variants run kohya's own forward.
* The U-Net's training forward+backward, its LoRA layers included, is captured once per input
  signature as a pair of CUDA graphs (`torch.cuda.make_graphed_callables`) and replayed: a step
  launches two graphs instead of thousands of kernels. The text encoder's, when its LoRA trains (SD 1.x/2.x's
  one CLIP, one process), is captured the same way (`TextEncoderGraphs`). Whatever a graph cannot stand for runs
  kohya's eager path unchanged: no grad (sampling, validation), a signature beyond `max_graphs`,
  gradient checkpointing, gradient accumulation (graph gradients live in static buffers), kohya's
  torch_compile or deepspeed, no CUDA, or a failed capture (logged once, then eager for the rest of
  the run).
* The capture runs over alias leaves of the LoRA weights (`p.detach().requires_grad_()`: the same
  storage, autograd state of their own; with flat_weights, one alias of their shared buffer), passed to the
  graphed step as explicit inputs; a replay is called with the weights themselves (or their buffer), so
  autograd hands the graph's gradients to the real parameters.
  The parameters' own AccumulateGrad nodes never enter a capture: DDP keeps those alive from its
  construction, bound to the stream it was built on (the default stream), and a capture that reached
  them synchronised with the default stream and failed (issue #18, 2 × H200). A capture that fails
  anyway is undone (the current stream, the CUDA generator left in capture mode) before kohya's eager
  path takes over.
* Several processes (`[launch] processes`): each captures its own graphs; no collective runs inside
  them. kohya never calls the DDP wrapper's forward, so DDP's reducer averages nothing, and kohya
  averages the gradients after backward, tensor by tensor (`all_reduce_network`). With
  `grad_sync=bucket` (the default) the trainer does that in one collective instead (`grad_sync.py`).

Options, through `[network] args` (the first value is the default):

* `cuda_graph=auto|on|off`: auto graphs kohya's SD 1.x/2.x and SDXL U-Nets (the ones measured); on, any U-Net.
* `max_graphs=N` (2): one graph per bucket resolution, each holding its activations.
* `te_graph=on|off`: the text encoder's graphs.
* `flat_weights=on|off`: each graph's LoRA weights as views into one buffer, its one weight input: one cast and
  one gradient a step instead of one per tensor (flat_weights.py). One process, and not with save_copy=kohya.
* `grad_sync=bucket|kohya`: several processes' gradients in one collective, or kohya's per-tensor loop.
* `flat_state=on|off`: Adam's state as views into one buffer per kind, so kohya's epoch-end state saves copy it
  in three pieces, not ~1,600 (flat_state.py; the same values and updates).
* `save_copy=background|batched|kohya`: batched copies the weights to the host in one transfer per dtype for the
  epoch-end saves, kohya's LoRA file and accelerate's state (host_copy.py); background does that and writes the
  LoRA file and accelerate's state folder on a thread while training goes on, each moved into place when whole
  (background_save.py, background_state.py; in the caller when kohya uploads to the Hub, and the state too with
  several processes or kohya's save_last_n_*); kohya, its own copies tensor by tensor. The same bytes in every
  mode.
* `sdpa=auto|cudnn`: the U-Net's attention kernels, torch's order or cuDNN's first (kohya's `sdpa` attention).
* `conv_benchmark=off|on`: cuDNN times its convolution algorithms for the U-Net's shapes once
  (`torch.backends.cudnn.benchmark`) instead of its heuristic pick.
* `channels_last=off|on`: the U-Net's convolution weights, and so its activations, in channels-last layout
  (0.98x on an H200: cuDNN's transposes go, GroupNorm's copies come).
* `norms=half|autocast`: the U-Net's GroupNorm and LayerNorm in the weights' half precision (fp16 or bf16 in and
  out; torch's kernels still sum the mean and variance in fp32: half_norms.py), or as autocast runs them (in
  fp32: the fp16 input cast up, the output cast back by the next layer, kohya's way). Half changes rounding, not
  the math: 1.12x on an H200, kohya's loss within the bench's loss check.

sdpa, conv_benchmark and channels_last change kernels only, not the math: results agree within the precision's
rounding. Every other networks.lora argument (conv_dim, block_dims, dropouts, loraplus…) passes through to kohya.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dermkohya.networks import (background_save, background_state, flat_state, flat_weights, grad_sync, half_norms,
                                host_copy)
from dermkohya.networks.attention import KINDS as SDPA_MODES
from dermkohya.networks.attention import sdpa_preference
from networks import lora as kohya_lora  # sd-scripts' networks/lora.py: kohya runs with its folder first on sys.path

logger = logging.getLogger(__name__)

FILE_NETWORK_MODULE = "networks.lora"
TRAINED_WITH_KEY = "dermkohya.trained_with"
LOG_PREFIX = "dermkohya lora_fast:"
GRAPH_MODES = ("auto", "on", "off")
GRAD_SYNC_MODES = ("bucket", "kohya")
SAVE_COPY_MODES = ("background", "batched", "kohya")
NORM_MODES = ("half", "autocast")
SWITCH = {"on": True, "off": False, "true": True, "false": False}
# kohya's library/original_unet.py (SD 1.x/2.x) and library/sdxl_original_unet.py: graphs on in "auto".
# SDXL verified on an H100 (bench/results/train-throughput-sdxl-h100.json): captured in 4.1 s, losses within
# 8e-6 of networks.lora over 36 steps, same file layout.
VERIFIED_UNETS = ("UNet2DConditionModel", "SdxlUNet2DConditionModel")
VERIFIED_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")  # transformers' CLIP: SD 1.x/2.x, SDXL


class FusedLoRAModule(kohya_lora.LoRAModule):
    """kohya's LoRAModule (same parameters, buffers and initialisation) with a fused forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and (self.dropout is not None or self.rank_dropout is not None or self.module_dropout is not None):
            return super().forward(x)
        org = self.org_forward(x)
        scale = self.multiplier * self.scale
        down = self.lora_down
        if isinstance(down, torch.nn.Linear):
            lx = F.linear(x, down.weight)
            up_weight = self.lora_up.weight
            if torch.is_autocast_enabled(org.device.type) or org.dtype == lx.dtype == up_weight.dtype:
                out = torch.addmm(org.reshape(-1, org.shape[-1]), lx.reshape(-1, lx.shape[-1]), up_weight.t(), alpha=scale)
                return out.view(org.shape)
            return org + F.linear(lx, up_weight) * scale  # mixed dtypes without autocast: promote as kohya does
        return torch.add(org, self.lora_up(down(x)), alpha=scale)


class _UNetStep(torch.nn.Module):
    """What gets graphed: the U-Net's forward as a module whose parameters are exactly the U-Net's LoRA
    weights (the frozen U-Net is not registered), so `capture_over_aliases` makes exactly those the
    graphed step's weight inputs."""

    def __init__(self, graphs: UNetGraphs, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.loras = torch.nn.ModuleList(graphs.loras)
        object.__setattr__(self, "_graphs", graphs)
        object.__setattr__(self, "_kwargs", dict(kwargs or {}))

    def forward(self, *args: torch.Tensor) -> Any:
        out = self._graphs.eager(*args, **self._kwargs)
        self._graphs.output_type = type(out)
        return self._graphs.unpack(out)


_NOT_SEEN = object()


class UNetGraphs:
    """The U-Net's `forward` while training: replays a captured graph when it can, else runs eagerly."""

    label = "U-Net"

    def __init__(self, unet: torch.nn.Module, loras: list[torch.nn.Module], max_graphs: int,
                 flat_weights: bool = False) -> None:
        self.unet = unet  # the graphed module (a text encoder in TextEncoderGraphs)
        self.eager: Callable[..., Any] = unet.forward
        self.loras = list(loras)
        self.max_graphs = max_graphs
        self.use_flat = flat_weights  # the LoRA weights as one graph input (flat_weights.py), one process only
        self.flat: flat_weights.FlatWeights | None = None
        self.graphs: dict[tuple[Any, ...], Any] = {}
        self.off_reason: str | None = None
        self.output_type: type | None = None
        self.replays = 0
        self.eager_calls = 0
        self.capture_error: str | None = None  # the failed capture's full traceback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        graphed = self._graph_for(args, kwargs)
        if graphed is None:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        out = graphed(*args)  # the keyword arguments are the graph's own: part of its key
        self.replays += 1
        return self.repack(out)

    def accepts(self, kwargs: dict[str, Any]) -> bool:
        """Keyword arguments a graph can be captured for (the U-Net: return_dict=True only)."""
        return all(key == "return_dict" and value is True for key, value in kwargs.items())

    def unpack(self, out: Any) -> torch.Tensor:
        """The tensor a graph returns, from what the module's forward returns."""
        return out if isinstance(out, torch.Tensor) else out.sample

    def repack(self, out: torch.Tensor) -> Any:
        """What the module's forward returns, around the graph's tensor."""
        if self.output_type is None or issubclass(self.output_type, torch.Tensor):
            return out
        return self.output_type(sample=out)

    def _graph_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.off_reason is not None or not torch.is_grad_enabled():
            return None
        if self.flat is not None and not self.flat.intact():
            self._turn_off("the LoRA weights were moved out of their buffer (flat_weights)")
            return None
        if not self.accepts(kwargs):
            return None
        if not args or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return None
        if self.loras[0].lora_up.weight.grad is not None:
            # A graph's backward hands autograd its static gradient buffers, and the first accumulation
            # adopts one as `.grad`; zeroing that in place (set_to_none=False) and accumulating the next
            # replay onto it counts the gradient twice. kohya sets gradients to None before each forward.
            self._turn_off("gradients still set at the forward (zero_grad(set_to_none=False) or accumulation)")
            return None
        key = (
            self.unet.training,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            tuple(sorted({lora.multiplier for lora in self.loras})),
            self.loras[0].lora_up.weight.requires_grad,
            *((tuple(a.shape), a.dtype, a.requires_grad, a.device) for a in args),
            tuple(sorted(kwargs.items())),
        )
        graphed = self.graphs.get(key, _NOT_SEEN)
        if graphed is _NOT_SEEN:
            if len([g for g in self.graphs.values() if g is not None]) >= self.max_graphs:
                logger.info("%s input %s beyond max_graphs=%d: eager for it", LOG_PREFIX, _shapes(args), self.max_graphs)
                graphed = None
            else:
                graphed = self._capture(args, kwargs)
            if self.off_reason is None:
                self.graphs[key] = graphed
        return graphed

    def _capture(self, args: tuple[torch.Tensor, ...], kwargs: dict[str, Any]) -> Any:
        reason = self.why_not()
        if reason is not None:
            self._turn_off(reason)
            return None
        sample_args = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        stream = torch.cuda.current_stream()
        started = time.perf_counter()
        failure = None
        try:
            step = _UNetStep(self, kwargs)
            flat = self._flat(step)
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
                if flat is not None:
                    graphed = capture_over_flat(step, sample_args, flat, num_warmup_iters=3, allow_unused_input=True)
                else:
                    graphed = capture_over_aliases(step, sample_args, num_warmup_iters=3, allow_unused_input=True)
        except Exception as exc:  # any capture failure: kohya's eager path is always correct
            self.capture_error = traceback.format_exc()
            failure = f"capture failed, {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if failure is not None:  # out of the except block: its traceback no longer holds the failed graphs
            self._turn_off(failure)
            logger.warning("%s the failed capture, for a bug report:\n%s", LOG_PREFIX, self.capture_error)
            recover_from_failed_capture(stream)
            return None
        logger.info("%s %s forward+backward captured as CUDA graphs for %s in %.1f s",
                    LOG_PREFIX, self.label, _shapes(args), time.perf_counter() - started)
        return graphed

    def _flat(self, step: torch.nn.Module) -> flat_weights.FlatWeights | None:
        """The LoRA weights in one buffer, made at the first capture (later signatures share it), or None."""
        if self.flat is not None or not self.use_flat:
            return self.flat
        reason = None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            reason = "several processes"
        else:
            try:
                self.flat = flat_weights.FlatWeights(step)
            except ValueError as exc:  # parameters that cannot share a buffer: it says which
                reason = str(exc)
        if reason is None:
            logger.info("%s %s LoRA weights in one buffer: one cast, one gradient per step (flat_weights=on)",
                        LOG_PREFIX, self.label)
        else:
            logger.info("%s %s LoRA weights one input each (%s)", LOG_PREFIX, self.label, reason)
            self.use_flat = False
        return self.flat

    def why_not(self) -> str | None:
        return why_not_graph(self.unet)

    def _turn_off(self, reason: str) -> None:
        self.off_reason = reason
        self.graphs.clear()  # eager from now on, every signature: their memory pools go
        logger.warning("%s CUDA graphs off (%s): fused LoRA layers, eager %s", LOG_PREFIX, reason, self.label)


class TextEncoderGraphs(UNetGraphs):
    """A text encoder's `forward` while its LoRA trains, replayed as a pair of graphs like the U-Net's: a step then
    launches four graphs instead of the ~1,400 kernels of CLIP's twelve layers, their 72 LoRA layers and their
    backward (SDXL's two encoders, 12 and 32 layers, many more). One graph per call signature, keyword arguments included: SD 1.x/2.x's
    `text_encoder(tokens)`, SDXL's `text_encoder(tokens, output_hidden_states=True, return_dict=True)` (kohya
    reads `hidden_states[11]`, `hidden_states[-2]` and `last_hidden_state`). The graph returns transformers'
    whole output object, its tensors the graph's outputs (torch's graphs flatten and rebuild it); any other
    keyword argument runs eagerly. The outputs kohya does not read get a zero gradient, so the LoRA layers that
    feed only them (the first SDXL encoder's last layer) get a zero gradient where the eager path leaves none:
    their lora_up stays zero either way, and AdamW's weight decay shrinks their lora_down by lr x decay a step."""

    label = "text encoder"

    def accepts(self, kwargs: dict[str, Any]) -> bool:
        return all(key in ("return_dict", "output_hidden_states") and isinstance(value, bool)
                   for key, value in kwargs.items())

    def unpack(self, out: Any) -> Any:
        return out

    def repack(self, out: Any) -> Any:
        return out

    def why_not(self) -> str | None:
        lora_params = {id(p) for lora in self.loras for p in lora.parameters()}
        if any(p.requires_grad and id(p) not in lora_params for p in self.unet.parameters()):
            return "text encoder weights other than the LoRA train (gradient checkpointing's embeddings?)"
        return why_not_graph(self.unet)


def loras_of(module: torch.nn.Module, loras: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The LoRA layers applied to layers of `module` (kohya's LoRAModule keeps the layer's forward, bound to it)."""
    inside = {id(m) for m in module.modules()}
    return [lora for lora in loras if id(getattr(getattr(lora, "org_forward", None), "__self__", None)) in inside]


def capture_over_aliases(module: torch.nn.Module, sample_args: tuple[torch.Tensor, ...],
                         make_graphed: Callable[..., Any] | None = None, **options: Any) -> Callable[..., Any]:
    """`module`'s forward+backward as CUDA graphs (`torch.cuda.make_graphed_callables`), its parameters
    explicit inputs: captured over alias leaves, replayed with the parameters themselves.

    An alias (`p.detach().requires_grad_()`) shares p's storage, so the graphs read the weights the
    optimizer updates in place (should p's storage ever move, make_graphed_callables copies the input into
    the alias before a replay), but has autograd state of its own: the capture builds AccumulateGrad
    nodes of its own instead of reaching p's, which DDP holds from its construction on another stream.
    The replayed step is an autograd function of (inputs, parameters): its backward returns the graph's
    static gradient buffers for the parameters, and autograd accumulates them into `p.grad` as before."""
    names, params = zip(*module.named_parameters())
    aliases = tuple(p.detach().requires_grad_(p.requires_grad) for p in params)
    count = len(sample_args)

    def step(*inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(module, dict(zip(names, inputs[count:])), inputs[:count])

    graphed = (make_graphed or torch.cuda.make_graphed_callables)(step, tuple(sample_args) + aliases, **options)

    def replay(*args: torch.Tensor) -> Any:
        return graphed(*args, *params)

    return replay


def capture_over_flat(module: torch.nn.Module, sample_args: tuple[torch.Tensor, ...], flat: flat_weights.FlatWeights,
                      make_graphed: Callable[..., Any] | None = None, **options: Any) -> Callable[..., Any]:
    """`capture_over_aliases` with one weight input: the buffer `flat` holds the module's parameters (views), so
    the graphs take an alias of it and a replay the buffer itself, whose gradient flat_weights.py hands out."""
    alias = flat.flat.detach().requires_grad_()
    count = len(sample_args)

    def step(*inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(module, flat.weights(inputs[count]), inputs[:count])

    graphed = (make_graphed or torch.cuda.make_graphed_callables)(step, (*sample_args, alias), **options)

    def replay(*args: torch.Tensor) -> Any:
        return graphed(*args, flat.flat)

    return replay


def recover_from_failed_capture(stream: torch.cuda.Stream) -> None:
    """Undo what a CUDA-graph capture that raised leaves behind, so that eager CUDA work runs as before.

    When `capture_end` raises (cudaStreamEndCapture on an invalidated capture), torch.cuda.graph's exit
    neither restores the current stream nor takes the device's generator out of capture mode: the next
    random op fails ("Offset increment outside graph capture encountered unexpectedly"). The generator
    gets a fresh state of the same seed and offset; a last check raises naming the way out if the device
    is still not usable."""
    torch.cuda.set_stream(stream)
    gc.collect()  # the failed graphs and their private pool
    device = torch.cuda.current_device()
    generator = torch.cuda.default_generators[device]
    if hasattr(generator, "graphsafe_set_state"):  # torch ≥ 2.4; the probe below judges older ones
        generator.graphsafe_set_state(generator.clone_state())
    try:
        torch.cuda.synchronize()
        torch.empty(4, device=f"cuda:{device}").uniform_()
        torch.cuda.synchronize()
    except Exception as exc:
        raise RuntimeError(f"{LOG_PREFIX} a failed CUDA-graph capture left cuda:{device} unusable ({exc}); "
                           "train with [network] args cuda_graph=off") from exc
    torch.cuda.empty_cache()


def _shapes(args: tuple[Any, ...]) -> str:
    return ", ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor))


def why_not_graph(unet: torch.nn.Module) -> str | None:
    """Why this process cannot replay the U-Net as a graph, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if unet.training and any(getattr(m, "gradient_checkpointing", False) is True for m in unet.modules()):
        return "gradient checkpointing"
    return None


class FastLoRANetwork(kohya_lora.LoRANetwork):
    """kohya's LoRANetwork; `apply_to` also installs the U-Net graphs, `save_weights` labels the file."""

    # Class-level defaults: instances become this class by `_adopt`, after kohya built them.
    dk_cuda_graph: str = "auto"
    dk_max_graphs: int = 2
    dk_grad_sync: str = "bucket"
    dk_sdpa: str = "auto"
    dk_conv_benchmark: bool = False
    dk_off_reason: str | None = None
    dk_unet_graphs: UNetGraphs | None = None
    dk_te_graphs: TextEncoderGraphs | None = None  # the first text encoder's (SDXL: dk_te_graphs_all has both)
    dk_te_graphs_all: tuple[TextEncoderGraphs, ...] = ()
    dk_te_graph: bool = True
    dk_flat_state: bool = True
    dk_save_copy: str = "background"
    dk_saver: background_save.BackgroundSaver | None = None
    dk_flat_weights: bool = True
    dk_state_hook: bool = False  # host_copy's save-state hook is on accelerate: shared weight storage saves safely
    dk_channels_last: bool = False
    dk_norms: str = "half"

    def prepare_network(self, args: Any) -> None:
        """kohya calls this with its parsed arguments before `apply_to`: settings graphs cannot honour, the
        calling trainer's gradient sync, and the optimizer's state layout (flat_state.py)."""
        if self.dk_flat_state:
            flat_state.install(self.parameters)
        if self.dk_save_copy == "background" and getattr(args, "huggingface_repo_id", None):
            self.dk_save_copy = "batched"  # kohya uploads each file right after save_weights returns
            logger.info("%s save_copy=batched: kohya uploads each saved file to the Hub at once", LOG_PREFIX)
        if self.dk_save_copy != "kohya":
            accelerator = _calling_accelerator()
            if accelerator is not None:
                self.dk_state_hook = host_copy.install_state_hook(accelerator, self) is not None
            if accelerator is not None and self.dk_save_copy == "background":
                why = background_state.install(accelerator, self._saver(), args)
                if why is None:
                    logger.info("%s accelerate's state written on the writer thread, moved into place when whole",
                                LOG_PREFIX)
                else:
                    logger.info("%s accelerate's state written by accelerate in the caller: %s", LOG_PREFIX, why)
        if self.dk_grad_sync == "bucket":
            trainer = grad_sync.calling_trainer()
            if trainer is not None and grad_sync.install(trainer, FastLoRANetwork):
                logger.info("%s gradients averaged over processes in one collective per dtype (grad_sync=bucket)",
                            LOG_PREFIX)
            else:
                logger.warning("%s no kohya trainer called prepare_network: kohya's own gradient sync", LOG_PREFIX)
        if getattr(args, "gradient_accumulation_steps", 1) > 1:
            self.dk_off_reason = "gradient accumulation"
        elif getattr(args, "gradient_checkpointing", False):
            self.dk_off_reason = "gradient checkpointing"
        elif getattr(args, "deepspeed", False):
            self.dk_off_reason = "deepspeed"
        elif getattr(args, "torch_compile", False):
            self.dk_off_reason = "torch_compile"

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        super().apply_to(text_encoder, unet, apply_text_encoder, apply_unet)
        if not apply_unet or not self.unet_loras:
            return
        self._install_graphs(unet)
        self._install_kernel_choices(unet)
        if apply_text_encoder and self.text_encoder_loras and self.dk_unet_graphs is not None:
            self._install_text_encoder_graphs(text_encoder)

    def _install_text_encoder_graphs(self, text_encoder: Any) -> None:
        """Graphs for the text encoders too (`te_graph=on`, the default): SD 1.x/2.x's one CLIP, SDXL's two, each
        with its own LoRA layers, in one process only: with several, kohya hands the text encoders to DDP, whose
        hooks a capture must not reach."""
        encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        reason = None
        if not self.dk_te_graph:
            reason = "te_graph=off"
        elif any(type(e).__name__ not in VERIFIED_TEXT_ENCODERS for e in encoders):
            reason = f"{', '.join(type(e).__name__ for e in encoders)} is not verified with graphs"
        elif torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            reason = "several processes (DDP)"
        owned = [loras_of(encoder, self.text_encoder_loras) for encoder in encoders]
        if reason is None and sum(map(len, owned)) != len(self.text_encoder_loras):  # each LoRA in one graph
            reason = "LoRA layers not found in exactly one text encoder"
        if reason is not None:
            logger.info("%s text encoder eager (%s)", LOG_PREFIX, reason)
            return
        installed = []
        for index, (encoder, loras) in enumerate(zip(encoders, owned)):
            if not loras:
                continue
            graphs = TextEncoderGraphs(encoder, loras, self.dk_max_graphs, self._flat_weights())

            def forward(*args: Any, graphs: TextEncoderGraphs = graphs, **kwargs: Any) -> Any:
                return graphs(*args, **kwargs)

            encoder.forward = forward
            installed.append(graphs)
            logger.info("%s text encoder%s forward+backward as CUDA graphs too (captured at the first step)",
                        LOG_PREFIX, f" {index + 1}" if len(encoders) > 1 else "")
        self.dk_te_graphs_all = tuple(installed)
        self.dk_te_graphs = installed[0] if installed else None

    def _install_kernel_choices(self, unet: Any) -> None:
        """`channels_last`, `norms`, `conv_benchmark` and `sdpa`: which kernels the U-Net's steps (and their
        captures) use."""
        if not torch.cuda.is_available():
            return
        if self.dk_channels_last:
            unet.to(memory_format=torch.channels_last)  # 4-D weights; later .to(dtype/device) keeps the layout
            logger.info("%s channels_last=on: the U-Net's convolutions in channels-last layout", LOG_PREFIX)
        if self.dk_norms == "half":
            count = half_norms.install(unet)
            logger.info("%s norms=half: the U-Net's %d GroupNorm/LayerNorm layers in half precision under autocast",
                        LOG_PREFIX, count)
        if self.dk_conv_benchmark:
            torch.backends.cudnn.benchmark = True  # from here on: after kohya cached the latents
            logger.info("%s conv_benchmark=on: cuDNN times its convolution algorithms per shape", LOG_PREFIX)
        if self.dk_sdpa == "auto":
            return
        inner, kind = unet.forward, self.dk_sdpa

        def forward(*args: Any, **kwargs: Any) -> Any:
            with sdpa_preference(kind, "cuda"):
                return inner(*args, **kwargs)

        unet.forward = forward
        logger.info("%s sdpa=%s: the U-Net's attention tries cuDNN's kernel first", LOG_PREFIX, kind)

    def _install_graphs(self, unet: Any) -> None:
        reason = self.dk_off_reason
        if self.dk_cuda_graph == "off":
            reason = "cuda_graph=off"
        elif not torch.cuda.is_available():
            reason = "no CUDA device"
        elif self.dk_cuda_graph == "auto" and type(unet).__name__ not in VERIFIED_UNETS:
            reason = f"{type(unet).__name__} is not verified with graphs (network_args cuda_graph=on to try)"
        if reason is not None:
            logger.info("%s CUDA graphs off (%s): fused LoRA layers, eager U-Net", LOG_PREFIX, reason)
            return
        graphs = UNetGraphs(unet, self.unet_loras, self.dk_max_graphs, self._flat_weights())

        def forward(*args: Any, **kwargs: Any) -> Any:  # a plain function: accelerate wraps it like any forward
            return graphs(*args, **kwargs)

        unet.forward = forward
        self.dk_unet_graphs = graphs
        logger.info("%s fused LoRA layers; U-Net training step as CUDA graphs (captured at the first step)", LOG_PREFIX)

    def _flat_weights(self) -> bool:
        """flat_weights=on takes effect with the save-state hook on (save_copy not kohya): accelerate's safetensors save
        keeps one of several tensors sharing a storage, the hook hands it host copies of their own."""
        if self.dk_flat_weights and not self.dk_state_hook:
            logger.info("%s flat_weights off: it needs save_copy=background or batched, and kohya's accelerator", LOG_PREFIX)
        return self.dk_flat_weights and self.dk_state_hook

    def save_weights(self, file: str, dtype: Any, metadata: dict[str, str] | None) -> None:
        if metadata:
            metadata = dict(metadata)
            metadata[TRAINED_WITH_KEY] = metadata.get("ss_network_module", __name__)
            metadata["ss_network_module"] = FILE_NETWORK_MODULE
        if self.dk_save_copy == "kohya":
            super().save_weights(file, dtype, metadata)
            return
        # kohya's save_weights on a copy of the weights on the host (one transfer): it reads state_dict() once,
        # then casts, hashes and writes; the same file
        snapshot = _HostWeights(host_copy.to_host(self.state_dict()))
        if self.dk_save_copy == "batched":
            kohya_lora.LoRANetwork.save_weights(snapshot, file, dtype, metadata)  # type: ignore[arg-type]
            return
        self._saver().submit(lambda path: kohya_lora.LoRANetwork.save_weights(snapshot, path, dtype, metadata), file)

    def _saver(self) -> background_save.BackgroundSaver:
        if self.dk_saver is None:
            self.dk_saver = background_save.BackgroundSaver()
        return self.dk_saver

    def wait_for_saves(self) -> None:
        """Until the files being written in the background are in place (save_copy=background); raises a
        failure. kohya never needs to: the process waits for the writer before it ends."""
        if self.dk_saver is not None:
            self.dk_saver.wait()


class _HostWeights:
    """What kohya's `LoRANetwork.save_weights` reads of its network: `state_dict()`, here a host copy."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)  # kohya replaces its entries with cast copies


def _calling_accelerator(depth: int = 2) -> Any | None:
    """The accelerator of kohya's `NetworkTrainer.train`, which calls `network.prepare_network(args)` after
    making it (a local named `accelerator`), or None when the caller has none."""
    try:
        candidate = sys._getframe(depth).f_locals.get("accelerator")
    except ValueError:
        return None
    return candidate if callable(getattr(candidate, "register_save_state_pre_hook", None)) else None


def _choice(kwargs: dict[str, Any], name: str, default: str, allowed: tuple[str, ...]) -> str:
    """A network arg taken out of kohya's kwargs (values arrive as strings), one of `allowed`."""
    value = str(kwargs.pop(name, default)).lower()
    if value not in allowed:
        raise ValueError(f"network_args {name}={value!r}: use one of {', '.join(allowed)}")
    return value


def _switch(kwargs: dict[str, Any], name: str, default: str) -> bool:
    value = str(kwargs.pop(name, default)).lower()
    if value not in SWITCH:
        raise ValueError(f"network_args {name}={value!r}: use on or off")
    return SWITCH[value]


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take this module's own network_args out of kohya's kwargs (values arrive as strings)."""
    mode = _choice(kwargs, "cuda_graph", "auto", GRAPH_MODES)
    try:
        max_graphs = int(kwargs.pop("max_graphs", 2))
    except ValueError:
        raise ValueError("network_args max_graphs must be a whole number (e.g. max_graphs=2)") from None
    if max_graphs < 1:
        raise ValueError("network_args max_graphs must be at least 1")
    return {"cuda_graph": mode, "max_graphs": max_graphs, "grad_sync": _choice(kwargs, "grad_sync", "bucket", GRAD_SYNC_MODES),
            "sdpa": _choice(kwargs, "sdpa", "auto", SDPA_MODES), "conv_benchmark": _switch(kwargs, "conv_benchmark", "off"),
            "te_graph": _switch(kwargs, "te_graph", "on"), "flat_state": _switch(kwargs, "flat_state", "on"),
            "save_copy": _choice(kwargs, "save_copy", "background", SAVE_COPY_MODES),
            "channels_last": _switch(kwargs, "channels_last", "off"), "flat_weights": _switch(kwargs, "flat_weights", "on"),
            "norms": _choice(kwargs, "norms", "half", NORM_MODES)}


def _adopt(network: kohya_lora.LoRANetwork, options: dict[str, Any]) -> FastLoRANetwork:
    """Make kohya's freshly built network ours in place: the same object and state, only behaviour changes."""
    if type(network) is not kohya_lora.LoRANetwork:
        raise TypeError(f"expected networks.lora.LoRANetwork, got {type(network).__name__}")
    for lora in network.text_encoder_loras + network.unet_loras:
        if type(lora) is kohya_lora.LoRAModule:
            lora.__class__ = FusedLoRAModule
    network.__class__ = FastLoRANetwork
    network.dk_cuda_graph = options["cuda_graph"]
    network.dk_max_graphs = options["max_graphs"]
    network.dk_grad_sync = options["grad_sync"]
    network.dk_sdpa = options["sdpa"]
    network.dk_conv_benchmark = options["conv_benchmark"]
    network.dk_te_graph = options["te_graph"]
    network.dk_flat_state = options["flat_state"]
    network.dk_save_copy = options["save_copy"]
    network.dk_channels_last = options["channels_last"]
    network.dk_flat_weights = options["flat_weights"]
    network.dk_norms = options["norms"]
    return network  # type: ignore[return-value]


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: Any,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> FastLoRANetwork:
    """kohya's `networks.lora.create_network`, then adopted (see module docstring)."""
    options = _options(kwargs)
    network = kohya_lora.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                        neuron_dropout=neuron_dropout, **kwargs)
    return _adopt(network, options)


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoder: Any,
    unet: Any,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """kohya's own; a network for training (`--dim_from_weights`) is adopted, one for merging is not."""
    options = _options(kwargs)
    network, weights_sd = kohya_lora.create_network_from_weights(multiplier, file, vae, text_encoder, unet,
                                                                 weights_sd=weights_sd, for_inference=for_inference, **kwargs)
    if not for_inference:
        network = _adopt(network, options)
    return network, weights_sd
