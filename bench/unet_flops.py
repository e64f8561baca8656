"""The work in one LoRA training step, counted: where bench/train_throughput.py's MFU constants come from.

Counts FLOPs with `torch.utils.flop_counter.FlopCounterMode` on the meta device (shapes only, no weights,
no compute; a second on a laptop) for the real SD 1.5 and SDXL architectures (diffusers'
UNet2DConditionModel / AutoencoderKL built from the configs in dermkohya.basemodel), per sample:

- U-Net forward at the family's resolution (77-token prompt);
- U-Net forward+backward as LoRA training runs it: every weight frozen, a rank-16 LoRA pair beside each
  Linear / 1×1 conv of the U-Net's transformer blocks (the layers kohya's networks.lora wraps by default),
  the text conditioning requiring grad (the text encoders' LoRA trains too). The backward then computes
  the activation gradients from the loss back to the first LoRA layer (none below it: the noisy latents
  do not require grad, in kohya's step either) and the LoRA weights' own gradients: ~2.1–2.2× the forward;
- the VAE encoder (what `--cache_latents` saves every step);
- the text encoders' forward (not in the MFU constants, for scale).

Attention is counted as two matmuls (the naive processor: FlopCounterMode has no formula for every SDPA
kernel on every device; flash / memory-efficient kernels do the same matmuls). Elementwise ops, norms
and softmax are not counted (FlopCounterMode counts matmuls and convolutions only), as is usual for MFU.

`python bench/unet_flops.py` prints the figures as JSON; bench/train_throughput.py records them as
constants (per batch-4 step, in TFLOP).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dermkohya.basemodel import SD15_CONFIGS, SDXL_CONFIGS  # noqa: E402

FAMILIES = {"sd15": (SD15_CONFIGS, 512), "sdxl": (SDXL_CONFIGS, 1024)}
TOKENS = 77
RANK = 16
BATCH = 4  # the card's batch: the constants are per batch-4 step


class _LoRA(torch.nn.Module):
    """A frozen layer plus a trainable rank-r pair beside it (the shape of kohya's LoRA, for counting only)."""

    def __init__(self, org: torch.nn.Module, rank: int) -> None:
        super().__init__()
        self.org = org
        if isinstance(org, torch.nn.Linear):
            self.down = torch.nn.Linear(org.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, org.out_features, bias=False)
        else:
            self.down = torch.nn.Conv2d(org.in_channels, rank, 1, bias=False)
            self.up = torch.nn.Conv2d(rank, org.out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.org(x) + self.up(self.down(x))


def add_lora(unet: torch.nn.Module, rank: int = RANK) -> int:
    """Wrap each Linear and 1×1 Conv2d inside the transformer blocks; freeze everything else."""
    unet.requires_grad_(False)
    targets = []
    for module in unet.modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear) or (isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)):
                targets.append((module, name))
    for module, name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, _LoRA(getattr(parent, attr), rank))
    return len(targets)


def _naive_attention(model: torch.nn.Module) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    model.set_attn_processor(AttnProcessor())


def _count(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(family: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs, resolution = FAMILIES[family]
    latent = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        _naive_attention(unet)
        sample = torch.randn(1, 4, latent, latent)
        timestep = torch.tensor([500])
        context = torch.randn(1, TOKENS, configs["unet"]["cross_attention_dim"])
        extra: dict[str, Any] = {}
        if family == "sdxl":  # pooled bigG embedding + 6 size/crop ids: kohya's 2816-wide `y` vector
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}}

        def forward() -> None:
            with torch.no_grad():
                unet(sample, timestep, context, **extra)

        fwd = _count(forward)
        wrapped = add_lora(unet)
        lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        context_grad = context.clone().requires_grad_(True)

        def train_step() -> None:
            unet(sample, timestep, context_grad, **extra).sample.float().pow(2).mean().backward()

        fwd_bwd = _count(train_step)
        vae = AutoencoderKL(**configs["vae"])
        _naive_attention(vae)
        image = torch.randn(1, 3, resolution, resolution)

        def encode() -> None:
            with torch.no_grad():
                vae.encode(image).latent_dist.sample()

        vae_encode = _count(encode)
    return {"resolution": resolution, "latent": [4, latent, latent], "unet_forward_gflop": fwd / 1e9,
            "unet_lora_forward_backward_gflop": fwd_bwd / 1e9, "forward_backward_over_forward": fwd_bwd / fwd,
            "lora_layers": wrapped, "lora_params_unet": lora_params, "vae_encode_gflop": vae_encode / 1e9,
            "text_encoders_forward_gflop": text_encoder_flops(family) / 1e9}


def text_encoder_flops(family: str) -> int:
    import transformers

    configs, _ = FAMILIES[family]
    names = {"text_encoder": "CLIPTextModel"} | ({"text_encoder_2": "CLIPTextModelWithProjection"} if family == "sdxl" else {})
    total = 0
    for name, class_name in names.items():
        config = transformers.CLIPTextConfig(**configs[name])
        with torch.device("meta"):
            model = getattr(transformers, class_name)(config)
            ids = torch.zeros(1, TOKENS, dtype=torch.long)

            def forward() -> None:
                with torch.no_grad():
                    model(ids)

            total += _count(forward)
    return total


def step_constants(figures: dict[str, Any], batch: int = BATCH) -> dict[str, float]:
    """Per batch-`batch` step, in TFLOP: U-Net forward+backward (latents cached), + the VAE encode."""
    return {"step_tflop_cached": batch * figures["unet_lora_forward_backward_gflop"] / 1e3,
            "step_tflop_vae": batch * figures["vae_encode_gflop"] / 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15,sdxl")
    args = parser.parse_args()
    out: dict[str, Any] = {"counted_with": f"torch {torch.__version__} FlopCounterMode, meta device, per sample; "
                           f"constants per batch-{BATCH} step", "families": {}}
    for family in args.families.split(","):
        figures = unet_flops(family)
        rounded = {k: round(v, 3 if k == "forward_backward_over_forward" else 1) if isinstance(v, float) else v
                   for k, v in figures.items()}
        out["families"][family] = rounded | {k: round(v, 2) for k, v in step_constants(figures).items()}
    fams = out["families"]
    if {"sd15", "sdxl"} <= set(fams):
        out["sdxl_over_sd15_step"] = round(fams["sdxl"]["step_tflop_cached"] / fams["sd15"]["step_tflop_cached"], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
