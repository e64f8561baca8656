"""The diffusers pipeline a plan asks for: the base loaded offline (a diffusers folder as it is, a
single-file checkpoint with its family's weightless config), kohya LoRAs loaded by diffusers' own
converter, checked module by module and fused, the plan's scheduler and precision, and one batch call
whose images depend only on each slot's prompt and seed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya.errors import DermkohyaError
from dermkohya.generate import host_timesteps
from dermkohya.generate.job import Job, LoraInfo, prepare_job
from dermkohya.generate.output import read_record
from dermkohya.generate.plan import SCHEDULERS, image_seed
from dermkohya.networks.attention import sdpa_preference


def _dtype(precision: str, device: str) -> Any:
    import torch

    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def make_scheduler(name: str, config: Any, karras: bool = False) -> Any:
    import diffusers

    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
        )
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "pndm":
        return diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True)
    raise DermkohyaError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")


def applied_lora_modules(pipe: Any, adapter: str) -> dict[str, int]:
    """LoRA layers peft injected for one adapter, per pipeline component."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None:
            counts[component] = sum(
                1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})
            )
    return counts


def load_loras(pipe: Any, loras: tuple[LoraInfo, ...]) -> None:
    """Load kohya LoRAs with diffusers' own converter, check every module landed, then fuse them into
    the weights (weights as in the plan) and drop the adapter layers, so sampling costs what the base does."""
    from diffusers.utils import USE_PEFT_BACKEND

    if not loras:
        return
    if not USE_PEFT_BACKEND:
        raise DermkohyaError("loading LoRAs with diffusers needs `peft` in dermkohya's environment: pip install -e '.[ml]'")
    names = []
    for i, lora in enumerate(loras):
        name = f"lora{i}"
        path = Path(lora.path)
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise DermkohyaError(f"{path}: diffusers cannot load this LoRA into the base model ({str(exc).splitlines()[0]})") from None
        applied = applied_lora_modules(pipe, name)
        wrong = [f"{comp}: {applied.get(comp, 0)} of {want}" for comp, want in lora.modules.items() if applied.get(comp, 0) != want]
        if wrong:
            raise DermkohyaError(
                f"{path}: diffusers applied only some LoRA modules ({'; '.join(wrong)}); "
                "the LoRA was trained for a different base model or family than [model] base"
            )
        names.append(name)
    pipe.set_adapters(names, [lora.weight for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


class Classifier:
    """The plan's optional TorchScript classifier: (B, 3, S, S) in [0, 1] → logits over its labels."""

    def __init__(self, path: Path, labels: list[str], size: int, device: str) -> None:
        import torch

        self.labels, self.size, self.device = labels, size, device
        self.model = torch.jit.load(str(path), map_location=device).eval()

    def confidence(self, image: np.ndarray, label: str) -> float:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            probs = torch.softmax(self.model(x).float(), dim=-1)[0]
        return float(probs[self.labels.index(label)])


def load_pipeline(job: Job, dtype: Any) -> Any:
    """The base as a diffusers pipeline, offline: a diffusers folder as it is, a single-file checkpoint
    with the weightless config folder of its family (config, scheduler and tokenizer from disk)."""
    import diffusers

    config = job.config_dir
    if config is None:
        index = json.loads((job.model_dir / "model_index.json").read_text(encoding="utf-8"))
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        return diffusers.DiffusionPipeline.from_pretrained(str(job.model_dir), torch_dtype=dtype, local_files_only=True, **extra)
    index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    pipeline_class = getattr(diffusers, index["_class_name"])
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
        return pipeline_class.from_single_file(
            str(job.model_dir), config=str(config), local_files_only=True, torch_dtype=dtype, **extra
        )
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise DermkohyaError(
            f"{job.model_dir}: diffusers cannot load this {job.base.family} checkpoint with the config in {config} "
            f"({str(exc).splitlines()[0]}); check that [model] base is a full SD 1.5/SDXL checkpoint"
        ) from None


_EMBEDDING_ARGUMENTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


# [engine] conv1x1_as_mm: inductor lowers 1×1 convolutions (SD 1.5's attention blocks' proj_in/proj_out, the
# resnets' shortcuts) to matmuls, whose epilogues fuse. (Coordinate-descent tuning of inductor's kernels was
# tried too: its first batch had not compiled after 250 s on an H200, issue #18.)
_CONV1X1 = {"conv_1x1_as_mm": True}


def compile_pipeline(pipe: Any, mode: str, vae: bool, conv1x1_as_mm: bool = False) -> None:
    """torch.compile the U-Net in `mode` (and the VAE decoder, default mode: one call per batch), 1×1
    convolutions as matmuls if asked. Under CUDA graphs (reduce-overhead) a replay overwrites the
    previous output, which a scheduler may keep (its history of model outputs, or the output itself
    without guidance): the U-Net's outputs are cloned, a copy of a few MB per step."""
    import torch

    if conv1x1_as_mm:
        from torch._inductor import list_mode_options  # torch.compile takes a mode or options, not both

        pipe.unet = torch.compile(pipe.unet, fullgraph=True, options=list_mode_options(mode) | _CONV1X1)
    else:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, mode=mode)
    if mode == "reduce-overhead":
        replay = pipe.unet.forward

        def cloned(*args: Any, **kwargs: Any) -> Any:
            out = replay(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
            out.sample = out.sample.clone()
            return out

        pipe.unet.forward = cloned
    if vae:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, options=_CONV1X1 if conv1x1_as_mm else None)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A batch whose GPU work is queued: its uint8 (B, H, W, 3) pixels and NaN flags, still on the device."""

    pixels: Any
    nan: Any


class Engine:
    """The diffusers pipeline as the plan asks for it: base + fused LoRAs, scheduler, precision; on CUDA
    also channels-last, fused QKV projections (SDPA attention either way) and optionally torch.compile.
    Each distinct prompt is encoded once, alone (with the negative prompt), and kept: a batch's text
    embeddings are rows of that cache, so they never depend on the batch-mates."""

    def __init__(self, job: Job, device: str = "cpu") -> None:
        import torch
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.job, self.device = job, device
        plan = job.plan
        self.dtype = _dtype(plan.engine.precision, device)
        pipe = load_pipeline(job, self.dtype)
        pipe.scheduler = make_scheduler(plan.sampler.scheduler, pipe.scheduler.config, plan.sampler.karras)
        self.timesteps = host_timesteps.install(pipe.scheduler)  # PNDM/DDIM: no GPU wait inside each step
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        if plan.embedding:
            from dermkohya.embeddings import load_embeddings

            load_embeddings(pipe, plan.embedding)
        load_loras(pipe, job.loras)
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            if plan.engine.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
                pipe.fuse_qkv_projections()
            if plan.engine.channels_last:
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            if plan.engine.compile:
                compile_pipeline(pipe, plan.engine.compile_mode, plan.engine.compile_vae, plan.engine.conv1x1_as_mm)
        self.pipe = pipe
        self.started = False  # a batch's GPU work is queued and its images not yet fetched
        self.embeddings: dict[str, tuple[Any, ...]] = {}
        self.classifier = None
        if plan.filter.classifier:
            labels = plan.filter.classifier_labels or list(plan.classes.diagnoses)
            self.classifier = Classifier(Path(plan.filter.classifier), labels, plan.filter.classifier_size, device)

    def __call__(self, slots: list[tuple[str, int] | None]) -> tuple[np.ndarray, np.ndarray]:
        """Generate one batch of (prompt, seed) slots; uint8 (B, H, W, 3) images and a NaN flag per slot.
        A batch always has the plan's batch size (empty slots are filled with a copy of a used one) and
        image n always sits in slot n % batch size: the same shapes and position give the same pixels."""
        return self.finish(self.start(slots))

    def start(self, slots: list[tuple[str, int] | None]) -> Pending:
        """Queue one batch's GPU work and return without waiting for it (`finish` fetches the images): the
        caller's host work for the previous batch then runs while the GPU makes this one. On a CPU the
        work is done by the time this returns."""
        import torch

        plan = self.job.plan
        if len(slots) != plan.engine.batch_size:
            raise ValueError(f"a batch has {plan.engine.batch_size} slots, got {len(slots)}")
        if self.started:
            raise RuntimeError("a started batch was not finished: one batch at a time (the scheduler's host timesteps are per batch)")
        filler = next(slot for slot in slots if slot is not None)
        prompts, seeds = zip(*(slot or filler for slot in slots))
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with torch.inference_mode(), sdpa_preference(plan.engine.attention, self.device):
            images = self.pipe(
                **self.embed(list(prompts)),
                generator=generators,
                num_inference_steps=plan.sampler.steps,
                guidance_scale=plan.sampler.guidance,
                width=plan.sampler.width,
                height=plan.sampler.height,
                output_type="pt",
            ).images
            nan = torch.isnan(images).flatten(1).any(dim=1)
            pixels = (images.float().nan_to_num(0.0) * 255).round().clamp(0, 255).to(torch.uint8)
        self.started = True
        return Pending(pixels.permute(0, 2, 3, 1), nan)

    def finish(self, pending: Pending) -> tuple[np.ndarray, np.ndarray]:
        """The started batch's images and NaN flags on the host (waits for its GPU work)."""
        out = pending.pixels.cpu().numpy(), pending.nan.cpu().numpy()
        self.started = False
        if self.timesteps is not None:
            self.timesteps.check()
        return out

    def embed(self, prompts: list[str]) -> dict[str, Any]:
        """The pipeline's embedding arguments for a batch of prompts (and the plan's negative prompt), from
        the cache: each distinct prompt through the pipeline's own encode_prompt once, batch of one."""
        import torch

        for prompt in dict.fromkeys(prompts):
            if prompt not in self.embeddings:
                self.embeddings[prompt] = tuple(
                    self.pipe.encode_prompt(
                        prompt=prompt, device=torch.device(self.device), num_images_per_prompt=1,
                        do_classifier_free_guidance=True, negative_prompt=self.job.plan.prompt.negative,
                    )
                )  # fmt: skip
        rows = [self.embeddings[prompt] for prompt in prompts]
        return {name: torch.cat([row[i] for row in rows]) for i, name in enumerate(_EMBEDDING_ARGUMENTS[: len(rows[0])])}


def device_for(rank: int) -> str:
    import torch

    return f"cuda:{rank}" if torch.cuda.is_available() else "cpu"


def render_one(plan_path: Path, n: int, attempt: int | None = None, *, out: Path | None = None, device: str | None = None) -> np.ndarray:
    """Regenerate image n alone (the attempt recorded in its file, else 0): the proof that any image can
    be remade from the plan. Bit-identical to the file on the same device, precision and batch size."""
    job = prepare_job(plan_path, out, write=False)
    item = job.items[n]
    if attempt is None:
        final = job.out / item.path
        attempt = read_record(final)["attempt"] if final.is_file() else 0
    size = job.plan.engine.batch_size
    slots: list[tuple[str, int] | None] = [None] * size
    slots[n % size] = (item.prompt, image_seed(job.plan.sampler.seed, n, attempt))
    images, _ = Engine(job, device or device_for(0))(slots)
    return images[n % size]
