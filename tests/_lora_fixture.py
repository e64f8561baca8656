"""A kohya-format SD 1.5 LoRA built with safetensors + numpy: a FIXTURE for verification logic only.

Key names and shapes follow kohya's `networks/lora.py` on an SD 1.5 text encoder and U-Net (72 + 192
modules); weights are random. `sshs_model_hash` is computed the way kohya does it (safetensors bytes of
the tensors with only the `ss_*` metadata, hashed after the header). The proof that real kohya files
work is the `kohya`-marked tests, which train with kohya itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save, save_file

# (U-Net location, channels): SD 1.5's 16 Transformer2D blocks
_UNET_ATTENTIONS = (
    [(f"down_blocks_{b}_attentions_{a}", c) for b, c in enumerate((320, 640, 1280)) for a in range(2)]
    + [("mid_block_attentions_0", 1280)]
    + [(f"up_blocks_{b}_attentions_{a}", c) for b, c in zip((1, 2, 3), (1280, 640, 320)) for a in range(3)]
)


def sd15_modules(*, text_encoder: bool = True) -> list[tuple[str, int, int, bool]]:
    """(kohya module name, in features, out features, is 1×1 conv) for every module kohya adapts."""
    modules: list[tuple[str, int, int, bool]] = []
    if text_encoder:
        for layer in range(12):
            p = f"lora_te_text_model_encoder_layers_{layer}"
            modules += [(f"{p}_self_attn_{x}_proj", 768, 768, False) for x in ("q", "k", "v", "out")]
            modules += [(f"{p}_mlp_fc1", 768, 3072, False), (f"{p}_mlp_fc2", 3072, 768, False)]
    for location, c in _UNET_ATTENTIONS:
        p = f"lora_unet_{location}"
        t = f"{p}_transformer_blocks_0"
        modules += [(f"{p}_proj_in", c, c, True), (f"{p}_proj_out", c, c, True)]
        modules += [(f"{t}_attn1_to_{x}", c, c, False) for x in ("q", "k", "v", "out_0")]
        modules += [(f"{t}_attn2_to_q", c, c, False), (f"{t}_attn2_to_k", 768, c, False), (f"{t}_attn2_to_v", 768, c, False)]
        modules += [(f"{t}_attn2_to_out_0", c, c, False), (f"{t}_ff_net_0_proj", c, 8 * c, False), (f"{t}_ff_net_2", 4 * c, c, False)]
    return modules


def kohya_tensors(*, rank: int = 4, alpha: float = 4.0, dtype: str = "float16", seed: int = 0,
                  text_encoder: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, fan_in, fan_out, conv in sd15_modules(text_encoder=text_encoder):
        down = rng.standard_normal((rank, fan_in), dtype=np.float32) * 0.01
        up = rng.standard_normal((fan_out, rank), dtype=np.float32) * 0.001
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"{name}.lora_down.weight"] = down.astype(dtype)
        tensors[f"{name}.lora_up.weight"] = up.astype(dtype)
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=dtype)
    return tensors


def kohya_metadata(*, rank: int, alpha: float, output_name: str = "demo") -> dict[str, str]:
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": output_name,
        "ss_sd_model_hash": "IsADirectory",
        "ss_learning_rate": "0.0001",
        "ss_steps": "2",
        "ss_num_train_images": "12",
        "ss_training_started_at": "1767225600.0",
        "ss_training_finished_at": "1767225660.0",
        "ss_dataset_dirs": json.dumps({"1_derm": {"n_repeats": 1, "img_count": 12}}),
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": output_name,
    }


def kohya_hash(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """kohya's precalculate_safetensors_hashes: serialise with the ss_* metadata, hash after the header."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n :]).hexdigest()


def write_kohya_lora(path: Path, *, rank: int = 4, alpha: float = 4.0, dtype: str = "float16", seed: int = 0,
                     output_name: str = "demo", tensors: dict[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    tensors = tensors if tensors is not None else kohya_tensors(rank=rank, alpha=alpha, dtype=dtype, seed=seed)
    metadata = kohya_metadata(rank=rank, alpha=alpha, output_name=output_name)
    metadata["sshs_model_hash"] = kohya_hash(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata)
    return path
