"""Which SDPA kernel runs SD 1.5's attention fastest on this GPU: flash, memory-efficient, cuDNN, or torch's own
choice, at the shapes the training step (batch 4, forward+backward) and the generation batch (16 images with
CFG = 32 rows, forward only) really have at 512 px.

Each attention shape of kohya's SD 1.5 U-Net (head dim 40/80/160, self-attention over 4096/1024/256/64 tokens,
cross-attention over 77) is timed with CUDA events per backend, then weighted by how often it occurs in one
U-Net pass, giving attention milliseconds per U-Net call per backend: what `[network] args sdpa=cudnn`
(lora_fast) and the generation plan's `engine.attention = "cudnn"` would change. Outputs and gradients of every
backend are compared with the math kernel in float32, so a fast kernel that is wrong is visible.

    python bench/sdpa_kernels.py --out bench/results/sdpa-kernels-h200.json     # on a GPU, ~30 s
    python bench/sdpa_kernels.py --smoke --out sdpa-cpu.json                    # CPU, tiny shapes, math only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_name  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # query length
    context: int  # key/value length
    head_dim: int
    per_unet: int  # occurrences in one SD 1.5 U-Net call


# SD 1.5 at 512 px (64×64 latents), 8 heads: transformer blocks per resolution, each with self- and cross-attention
# (down 2+2+2, mid 1, up 3+3+3 → 5 at 64², 5 at 32², 5 at 16², 1 at 8²).
SD15 = (
    Shape("self-64x64", 4096, 4096, 40, 5), Shape("cross-64x64", 4096, 77, 40, 5),
    Shape("self-32x32", 1024, 1024, 80, 5), Shape("cross-32x32", 1024, 77, 80, 5),
    Shape("self-16x16", 256, 256, 160, 5), Shape("cross-16x16", 256, 77, 160, 5),
    Shape("self-8x8", 64, 64, 160, 1), Shape("cross-8x8", 64, 77, 160, 1),
)
HEADS = 8
BACKENDS: dict[str, list[SDPBackend] | None] = {
    "auto": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "cudnn-first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH],
}


def backend_context(name: str) -> Any:
    order = BACKENDS[name]
    if order is None:
        return contextlib.nullcontext()  # torch's own order
    return sdpa_kernel(order, set_priority=True) if name == "cudnn-first" else sdpa_kernel(order)


def inputs(batch: int, shape: Shape, dtype: torch.dtype, device: str, grad: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, HEADS, shape.tokens, shape.head_dim, generator=g)
    k = torch.randn(batch, HEADS, shape.context, shape.head_dim, generator=g)
    v = torch.randn(batch, HEADS, shape.context, shape.head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v))


def run_once(qkv: tuple[torch.Tensor, ...], grad_out: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    out = F.scaled_dot_product_attention(*qkv)
    if grad_out is None:
        return (out,)
    grads = torch.autograd.grad(out, qkv, grad_out)
    return (out, *grads)


def time_ms(fn: Any, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - began) * 1000 / iters


def measure(batch: int, shape: Shape, backend: str, training: bool, dtype: torch.dtype, device: str,
            warmup: int, iters: int) -> dict[str, Any]:
    """One backend at one shape: ms per call (None where the backend cannot run it) and its error vs math."""
    qkv = inputs(batch, shape, dtype, device, training)
    grad_out = torch.randn_like(qkv[0]) if training else None
    with torch.no_grad() if not training else torch.enable_grad():
        reference_inputs = tuple(t.detach().float().requires_grad_(training) for t in qkv)
        with sdpa_kernel([SDPBackend.MATH]):
            reference = run_once(reference_inputs, grad_out.float() if grad_out is not None else None)
        try:
            with backend_context(backend):
                got = run_once(qkv, grad_out)
                ms = time_ms(lambda: run_once(qkv, grad_out), device, warmup, iters)
        except RuntimeError as exc:  # "No available kernel": this backend does not take this shape
            return {"ms": None, "unsupported": str(exc).splitlines()[0][:200]}
    error = max(float((a.detach().float() - b.detach()).abs().max() / (b.detach().abs().max() + 1e-6))
                for a, b in zip(got, reference))
    return {"ms": round(ms, 4), "max_rel_error_vs_math": round(error, 5)}


def suite(batch: int, training: bool, backends: list[str], dtype: torch.dtype, device: str,
          warmup: int, iters: int, shapes: tuple[Shape, ...]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        table[shape.name] = {b: measure(batch, shape, b, training, dtype, device, warmup, iters) for b in backends}
        table[shape.name]["per_unet"] = shape.per_unet
    per_unet = {}
    for b in backends:
        times = [table[s.name][b]["ms"] for s in shapes]
        if all(t is not None for t in times):
            per_unet[b] = round(sum(t * s.per_unet for t, s in zip(times, shapes)), 3)
    best = min(per_unet, key=per_unet.__getitem__) if per_unet else None
    summary: dict[str, Any] = {"attention_ms_per_unet_call": per_unet, "fastest": best}
    if best and "auto" in per_unet:
        summary["fastest_vs_auto"] = round(per_unet["auto"] / per_unet[best], 3)
    if "cudnn-first" in per_unet and "auto" in per_unet:
        summary["cudnn_first_vs_auto"] = round(per_unet["auto"] / per_unet["cudnn-first"], 3)
    return {"batch": batch, "forward_and_backward": training, "shapes": table, **summary}


# The U-Net's 3×3 convolutions, roughly (same-channel convs per resolution in SD 1.5's resnets; the in/out-channel
# changing ones are counted as same-channel): cuDNN's heuristic choice vs its benchmarked one (cudnn.benchmark).
CONVS = ((64, 320, 10), (32, 640, 10), (16, 1280, 10), (8, 1280, 8))


def conv_suite(batch: int, training: bool, dtype: torch.dtype, device: str, warmup: int, iters: int,
               convs: tuple[tuple[int, int, int], ...]) -> dict[str, Any]:
    """ms per 3×3 convolution (forward, or forward+backward) with torch.backends.cudnn.benchmark off and on."""
    table: dict[str, Any] = {}
    totals = {"heuristic": 0.0, "benchmark": 0.0}
    for size, channels, count in convs:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device=device, dtype=dtype)
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=training)

        def call() -> None:
            out = conv(x)
            if training:
                torch.autograd.grad(out, (x, conv.weight), torch.ones_like(out))

        row: dict[str, Any] = {"per_unet": count}
        for mode, flag in (("heuristic", False), ("benchmark", True)):
            torch.backends.cudnn.benchmark = flag
            with torch.enable_grad() if training else torch.no_grad():
                row[mode] = round(time_ms(call, device, warmup, iters), 4)
            totals[mode] += row[mode] * count
        table[f"{channels}ch-{size}x{size}"] = row
    torch.backends.cudnn.benchmark = False
    return {"batch": batch, "forward_and_backward": training, "shapes": table,
            "conv_ms_per_unet_call": {k: round(v, 3) for k, v in totals.items()},
            "benchmark_vs_heuristic": round(totals["heuristic"] / totals["benchmark"], 3) if totals["benchmark"] else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the math kernel only (tests)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        shapes = tuple(Shape(s.name, max(4, s.tokens // 256), max(4, s.context // 64), 8, s.per_unet) for s in SD15[:4])
        backends, dtype, train_batch, gen_batch, warmup, iters = ["auto"], torch.float32, 1, 2, 1, 2
        convs = ((8, 8, 2), (4, 16, 2))
    else:
        shapes, backends, dtype, train_batch, gen_batch, warmup, iters = SD15, list(BACKENDS), torch.float16, 4, 32, 3, args.iters
        convs = CONVS
    report: dict[str, Any] = {
        "benchmark": "sdpa_kernels",
        "harness": "bench/sdpa_kernels.py",
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "gpu": gpu_name.slug() if device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "dtype": str(dtype).removeprefix("torch."),
        "heads": HEADS,
        "note": "ms per SDPA call (CUDA events, mean of the timed iterations); attention_ms_per_unet_call weights each "
                "shape by its occurrences in one SD 1.5 U-Net call at 512 px",
        "training": suite(train_batch, True, backends, dtype, device, warmup, iters, shapes),
        "generation": suite(gen_batch, False, backends, dtype, device, warmup, iters, shapes),
        "conv_note": "3x3 convolutions at the U-Net's resolutions and widths, counts approximate (resnets' convs per "
                     "resolution); cudnn.benchmark off (heuristic) vs on",
        "conv_training": conv_suite(train_batch, True, dtype, device, warmup, iters, convs),
        "conv_generation": conv_suite(gen_batch, False, dtype, device, warmup, iters, convs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for part in ("training", "generation", "conv_training", "conv_generation"):
        print(part, json.dumps({k: v for k, v in report[part].items() if k != "shapes"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
