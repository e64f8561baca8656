"""GPU training throughput: the card's kohya command as typed vs dermkohya's rendered default, back to back.

One call on one GPU machine trains every variant on the same synthetic 512×512 dataset (the demo
generator, 72 images) and the same random-weight full-size SD 1.5 (`random:sd15`), one after the
other, and writes one JSON: per variant the steady-state it/s and images/s (warm-up steps skipped,
taken from kohya's own progress lines as they arrive), peak GPU memory and utilisation (sampled
through NVML), final loss and loss curve, MFU, where start-up goes (`milestones`, `startup_phases`: kohya's
own lines, time-stamped as they arrive), what each epoch end costs beyond a step (`epoch_boundary_s`, `save_s`,
`steady_excluding_epoch_ends_it_per_s`), and success or the error; then `speedup_default_vs_card_raw`. A failed variant records its error and the run goes on.

- card-raw: `train_network.py` as a practitioner types the card: rank 16, alpha 16, lr 1e-4,
  batch 4, fp16, 512, no attention flag, no latent cache (launched like the card, from sd-scripts).
- dermkohya-*: a copy of runs/derm-sd15.toml pointed at the random model and the bench dataset,
  trained by `dermkohya.train.train` — exactly what `dermkohya train` runs (render, checks, launch).
  Sampling is switched off ([sample] every_n_epochs removed): it is not training throughput.

`--family sdxl` measures the same card on SDXL: `sdxl_train_network.py` at 1024 px on a random-weight
full-size SDXL (`random:sdxl`, built on the machine, its build time in the JSON), the same generator's 72
images at 1024 px, the card typed by hand (`sdxl-card-raw`) vs runs/derm-sdxl.toml (`sdxl-dermkohya-*`,
its fp16-fix `vae` path dropped: the random model's VAE is the random SD 1.5 one, used in fp16 by every SD
1.5 variant, so no `no_half_vae` either), with fewer steps and its own names, budget and output file
(train-throughput-sdxl-h100.json). The SD 1.5 run and its JSON are unchanged.

Speed does not depend on weight values, so random weights measure the real thing. On the device:
`bash bench/gpu_run.sh [--family sdxl]` (after `make bench-gpu` here). `--smoke` runs the plumbing on a
CPU at 64 px.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_name  # noqa: E402
import step_profile  # noqa: E402
from dermkohya import kohya, render  # noqa: E402
from plot_train_throughput import failure_cause  # noqa: E402

# Work per batch-4 step at 512 px (issue #6): U-Net forward 803 GFLOP per sample, forward+backward with
# frozen weights 1,726 GFLOP per sample (6.9 TFLOP a step); encoding the latents adds 4.5 TFLOP a step.
# Re-counted by bench/unet_flops.py (FlopCounterMode, meta device, diffusers' UNet2DConditionModel /
# AutoencoderKL from dermkohya.basemodel's configs, rank-16 LoRA on the transformer blocks' layers):
# forward 803.3 GFLOP, forward+backward 1,750.1 GFLOP (2.18×) → 7.0 TFLOP a step, VAE encode 1,116.7 GFLOP
# per sample → 4.47 TFLOP a step. The SD 1.5 constants stay the issue's, so its results stay comparable.
STEP_TFLOP_CACHED = 6.9
STEP_TFLOP_VAE = 4.5
# SDXL at 1024 px, same count (bench/unet_flops.py): U-Net forward 6,761.2 GFLOP per sample (77 tokens, the
# 2816-wide `y` vector), forward+backward 14,400.3 GFLOP (2.13×, 722 LoRA layers) → 57.6 TFLOP a batch-4
# step; VAE encode 4,879.0 GFLOP per sample → 19.5 TFLOP a step. 8.2× an SD 1.5 step.
SDXL_STEP_TFLOP_CACHED = 57.6
SDXL_STEP_TFLOP_VAE = 19.5
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense fp16/bf16
WARMUP_STEPS = 10
CARD = {"network_dim": 16, "network_alpha": 16, "learning_rate": 1e-4, "batch_size": 4, "mixed_precision": "fp16",
        "resolution": 512}
LORA_LOG = "dermkohya lora_fast:"


@dataclass
class Variant:
    name: str
    kind: str  # "raw" (typed by hand) or "dermkohya" (a run file through dermkohya.train)
    about: str
    raw_flags: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    only_if_failed: str | None = None  # run only when this variant ran and failed (a fallback reference)


VARIANTS: list[Variant] = [
    Variant("card-raw", "raw", "the card typed by hand: no attention flag, no latent cache, kohya's defaults"),
    Variant("dermkohya-default", "dermkohya", "dermkohya render of runs/derm-sd15.toml, launched by dermkohya train"),
    Variant("dermkohya-networks.lora", "dermkohya", "the default with kohya's own networks.lora: flags only, the loss reference",
            overrides={"network": {"module": "networks.lora", "args": []}}),
    Variant("raw+sdpa", "raw", "the card + --sdpa", raw_flags=["--sdpa"]),
    Variant("raw+sdpa+cache_latents", "raw", "the card + --sdpa --cache_latents", raw_flags=["--sdpa", "--cache_latents"]),
    Variant("dermkohya-lora_fast-eager", "dermkohya", "the default with network_args cuda_graph=off: fused LoRA layers only",
            overrides={"network": {"args": ["cuda_graph=off"]}}),
    Variant("dermkohya-memory-saver", "dermkohya", "the default + gradient_checkpointing = true (12–16 GB cards)",
            overrides={"train": {"gradient_checkpointing": True}}),
    Variant("dermkohya-bf16", "dermkohya", "the default in bf16 (not the card's precision)",
            overrides={"train": {"mixed_precision": "bf16", "save_precision": "bf16"}}),
    Variant("dermkohya-batch8", "dermkohya", "the default at batch 8 (not the card's batch), same number of steps",
            overrides={"train": {"batch_size": 8, "epochs": 8}}),
    Variant("dermkohya-eager-2gpu", "dermkohya", "lora_fast-eager on 2 GPUs ([launch] processes = 2; batch 4 per GPU); "
            "scaling vs dermkohya-lora_fast-eager (cuda_graph=off: eager fused layers, the pre-#18 multi-GPU path)",
            overrides={"network": {"args": ["cuda_graph=off"]}, "launch": {"processes": 2}}),
    Variant("raw+sdpa+cache_latents+compile", "raw", "the card + --sdpa --cache_latents --torch_compile --dynamo_backend "
            "inductor: compile time (start-up minus the same flags without compile) and the compiled step rate",
            raw_flags=["--sdpa", "--cache_latents", "--torch_compile", "--dynamo_backend", "inductor"]),
    # levers that need no change to lora_fast (issue #18): each is the default with one change, its it/s
    # against the default's in the same call (`levers` in the report)
    Variant("dermkohya-adamw-foreach", "dermkohya", "the default without optimizer_args fused=True (torch AdamW's "
            "own choice, foreach on CUDA: the default before issue #18): what the fused kernel gains",
            overrides={"train": {"optimizer_args": []}}),
    Variant("dermkohya-unet-only", "dermkohya", "the default + network_train_unet_only (what training the text "
            "encoder's LoRA costs; not the card's training)", overrides={"network": {"train_unet_only": True}}),
    Variant("dermkohya-no-clip", "dermkohya", "the default + max_grad_norm = 0 (what gradient clipping costs; not "
            "the card's training)", overrides={"kohya": {"max_grad_norm": 0.0}}),
    Variant("dermkohya-no-save-state", "dermkohya", "the default + save_state = false (no optimizer state at each "
            "epoch end: what --resume's state costs)", overrides={"train": {"save_state": False}}),
    Variant("dermkohya-workers-0", "dermkohya", "the default with data_loader_workers = 0 (captions and cached "
            "latents read in the training process)", overrides={"train": {"data_loader_workers": 0,
                                                                          "persistent_data_loader_workers": False}}),
    Variant("dermkohya-workers-8", "dermkohya", "the default with data_loader_workers = 8",
            overrides={"train": {"data_loader_workers": 8}}),
    Variant("dermkohya-lowram", "dermkohya", "the default + kohya's --lowram (models loaded onto the GPU directly)",
            overrides={"kohya": {"lowram": True}}),
    Variant("dermkohya-no-highvram", "dermkohya", "the default without kohya's --highvram (a gc.collect() and CUDA "
            "cache release after every latent batch: start-up)", overrides={"kohya": {"highvram": False}}),
    Variant("dermkohya-vae-batch-1", "dermkohya", "the default with vae_batch_size = 1 (kohya's default: latent caching "
            "reads and encodes one image at a time; the default caches 8 at a time): start-up",
            overrides={"kohya": {"vae_batch_size": 1}}),
    Variant("dermkohya-vae-batch-16", "dermkohya", "the default with vae_batch_size = 16 (latent caching in batches of "
            "16: start-up)", overrides={"kohya": {"vae_batch_size": 16}}),
    # lora_fast's own levers (network args; each variant states its whole args list, so it means the same
    # whatever runs/derm-sd15.toml holds)
    Variant("dermkohya-te-eager", "dermkohya", "lora_fast with te_graph=off (the text encoder's forward+backward "
            "eager, only the U-Net's as CUDA graphs: the default before this lever)",
            overrides={"network": {"args": ["te_graph=off"]}}),
    Variant("dermkohya-conv-benchmark", "dermkohya", "lora_fast with conv_benchmark=on (cuDNN times its "
            "convolution algorithms per shape at the first step instead of its heuristic pick)",
            overrides={"network": {"args": ["conv_benchmark=on"]}}),
    Variant("dermkohya-sdpa-cudnn", "dermkohya", "lora_fast with sdpa=cudnn (the U-Net's attention tries cuDNN's "
            "kernel first)", overrides={"network": {"args": ["sdpa=cudnn"]}}),
    Variant("dermkohya-flat-state-off", "dermkohya", "lora_fast with flat_state=off (Adam's state as torch makes "
            "it: each epoch-end state save copies ~1,600 tensors to the host one by one)",
            overrides={"network": {"args": ["flat_state=off"]}}),
    Variant("dermkohya-save-copy-kohya", "dermkohya", "lora_fast with save_copy=kohya (each epoch end's LoRA file and "
            "state copy the weights to the host tensor by tensor, as kohya does, not in one transfer per dtype; "
            "flat_weights then off)", overrides={"network": {"args": ["save_copy=kohya"]}}),
    Variant("dermkohya-save-copy-batched", "dermkohya", "lora_fast with save_copy=batched (each epoch end's LoRA file "
            "and accelerate's state written before training goes on, not on the writer thread)",
            overrides={"network": {"args": ["save_copy=batched"]}}),
    Variant("dermkohya-channels-last", "dermkohya", "lora_fast with channels_last=on (the U-Net's convolutions in "
            "channels-last memory layout)", overrides={"network": {"args": ["channels_last=on"]}}),
    Variant("dermkohya-norms-autocast", "dermkohya", "lora_fast with norms=autocast (the U-Net's GroupNorm and "
            "LayerNorm in fp32 as autocast runs them: the default before norms=half)",
            overrides={"network": {"args": ["norms=autocast"]}}),
    Variant("dermkohya-flat-weights-off", "dermkohya", "lora_fast with flat_weights=off (each LoRA tensor its own "
            "graph input: autocast casts each weight, and each gradient is cast back, one kernel per tensor)",
            overrides={"network": {"args": ["flat_weights=off"]}}),
    Variant("card-raw-repeat", "raw", "card-raw again, after everything else (drift check)"),
    Variant("dermkohya-default-repeat", "dermkohya", "dermkohya-default again (drift check)"),
]
LEVERS = ("dermkohya-norms-autocast", "dermkohya-flat-weights-off", "dermkohya-save-copy-batched", "dermkohya-save-copy-kohya", "dermkohya-channels-last", "dermkohya-flat-state-off", "dermkohya-te-eager", "dermkohya-conv-benchmark", "dermkohya-sdpa-cudnn", "dermkohya-adamw-foreach", "dermkohya-unet-only", "dermkohya-no-clip", "dermkohya-no-save-state",
          "dermkohya-workers-0", "dermkohya-workers-8", "dermkohya-lowram", "dermkohya-no-highvram", "dermkohya-vae-batch-1",
          "dermkohya-vae-batch-16")

# SDXL: few variants, each ~1 min of kohya start-up (7 GB model) before its first step. The card as typed has
# kohya's naive attention: at 1024 px and batch 4 its saved attention maps alone are ~66 GiB (fp32 softmax +
# fp16 copy; bench/unet_flops.py's shapes), so it may not fit 80 GB: then the card + --sdpa (the first fix a
# practitioner makes) runs as the raw reference. lora_fast needs gradient checkpointing off (graphs) and
# cuda_graph=on (kohya's SdxlUNet2DConditionModel is not on its verified list); networks.lora with the same
# flags is its loss and speed reference and shows what checkpointing costs.
SDXL_VARIANTS: list[Variant] = [
    Variant("sdxl-card-raw", "raw", "the card typed by hand on SDXL: sdxl_train_network.py, no attention flag, "
            "no latent cache, kohya's defaults"),
    Variant("sdxl-raw+sdpa", "raw", "the card + --sdpa: run only if sdxl-card-raw failed (the raw reference then)",
            raw_flags=["--sdpa"], only_if_failed="sdxl-card-raw"),
    Variant("sdxl-dermkohya-default", "dermkohya", "dermkohya render of runs/derm-sdxl.toml (the fast settings: "
            "lora_fast with CUDA graphs, no gradient checkpointing), launched by dermkohya train"),
    # Every override below states both settings, so each variant means the same whatever runs/derm-sdxl.toml holds.
    Variant("sdxl-dermkohya-lora_fast", "dermkohya", "without gradient checkpointing, with "
            "dermkohya.networks.lora_fast and network_args cuda_graph=on (U-Net step as CUDA graphs): "
            "runs/derm-sdxl.toml's own settings since issue #18",
            overrides={"train": {"gradient_checkpointing": False},
                       "network": {"module": "dermkohya.networks.lora_fast", "args": ["cuda_graph=on"]}}),
    Variant("sdxl-dermkohya-lora_fast-gc", "dermkohya", "gradient checkpointing with "
            "dermkohya.networks.lora_fast: fused LoRA layers, eager U-Net (graphs stay off with checkpointing)",
            overrides={"train": {"gradient_checkpointing": True},
                       "network": {"module": "dermkohya.networks.lora_fast", "args": []}}),
    Variant("sdxl-dermkohya-no-gc", "dermkohya", "without gradient checkpointing, kohya's networks.lora: "
            "the loss and speed reference of lora_fast",
            overrides={"train": {"gradient_checkpointing": False}, "network": {"module": "networks.lora", "args": []}}),
    Variant("sdxl-dermkohya-24gb", "dermkohya", "runs/derm-sdxl-24gb.toml's settings (gradient checkpointing, "
            "kohya's networks.lora): the memory saver for 24 GB cards",
            overrides={"train": {"gradient_checkpointing": True}, "network": {"module": "networks.lora", "args": []}}),
    Variant("sdxl-dermkohya-norms-autocast", "dermkohya", "runs/derm-sdxl.toml + norms=autocast (the U-Net's "
            "GroupNorm and LayerNorm in fp32 as autocast runs them: the default before norms=half)",
            overrides={"train": {"gradient_checkpointing": False},
                       "network": {"module": "dermkohya.networks.lora_fast", "args": ["cuda_graph=on", "norms=autocast"]}}),
    Variant("sdxl-dermkohya-te-eager", "dermkohya", "runs/derm-sdxl.toml + te_graph=off (SDXL's two text encoders "
            "eager: the default before their graphs)",
            overrides={"train": {"gradient_checkpointing": False},
                       "network": {"module": "dermkohya.networks.lora_fast", "args": ["cuda_graph=on", "te_graph=off"]}}),
    Variant("sdxl-dermkohya-save-copy-batched", "dermkohya", "runs/derm-sdxl.toml + save_copy=batched (each epoch "
            "end's LoRA file and accelerate's state written before training goes on, not on the writer thread)",
            overrides={"train": {"gradient_checkpointing": False},
                       "network": {"module": "dermkohya.networks.lora_fast", "args": ["cuda_graph=on", "save_copy=batched"]}}),
    Variant("sdxl-dermkohya-channels-last", "dermkohya", "runs/derm-sdxl.toml + channels_last=on (the U-Net's "
            "convolutions in channels-last memory layout)",
            overrides={"train": {"gradient_checkpointing": False},
                       "network": {"module": "dermkohya.networks.lora_fast", "args": ["cuda_graph=on", "channels_last=on"]}}),
]


@dataclass(frozen=True)
class Preset:
    """A named call: which variants in which order, profiled or not, and the run's size."""

    name: str
    variants: tuple[str, ...] = ()
    profile: bool = False
    images: int | None = None  # None: the bench's 72
    epochs: int | None = None
    variant_timeout: float | None = None


PRESETS: dict[str, Preset] = {
    "none": Preset(""),
    # the pairs first (back to back), then levers while the budget lasts (~85 s each on an H200)
    "pairs": Preset("pairs", ("card-raw", "dermkohya-default", "card-raw-repeat", "dermkohya-default-repeat",
                              "dermkohya-no-save-state", "dermkohya-unet-only"), profile=True),
    # the default first: if card-raw then runs out of time, its time so far is still a lower bound of the ratio
    "wall-1000": Preset("wall-1000", ("dermkohya-default", "card-raw"), images=1000, epochs=3, variant_timeout=520),
}
WALL_HEADLINE = "speedup_wall_3_epochs_1000_images"  # issue #18's headline field name
WALL_TARGET = 2.0  # issue #18: a whole 3-epoch run on 1,000 images, start-up included, in half card-raw's time


@dataclass(frozen=True)
class FamilySetup:
    """What differs between the SD 1.5 and the SDXL run: script, model, run file, work per step, defaults."""

    family: str
    label: str
    script: str
    run_file: str
    card: dict[str, Any]
    step_tflop_cached: float
    step_tflop_vae: float
    variants: list[Variant]
    raw: str  # the card typed by hand
    default: str  # dermkohya's rendered default
    equivalence: tuple[str, str]  # (lora_fast, networks.lora with the same flags)
    epochs: int
    budget: float
    variant_timeout: float
    min_slot: float  # a variant is started only with this many seconds left
    warmup: int
    out_stem: str  # bench/results/<out_stem>-<gpu>.json, -kohya.log, .png


FAMILIES: dict[str, FamilySetup] = {
    "sd15": FamilySetup("sd15", "SD 1.5", "train_network.py", "derm-sd15.toml", CARD, STEP_TFLOP_CACHED, STEP_TFLOP_VAE,
                        VARIANTS, "card-raw", "dermkohya-default", ("dermkohya-default", "dermkohya-networks.lora"),
                        epochs=4, budget=540, variant_timeout=170, min_slot=90, warmup=WARMUP_STEPS,
                        out_stem="train-throughput"),
    # 2 epochs of 18 steps: ~30 timed steps a variant, so 3–4 variants and the model build fit one 600 s call
    "sdxl": FamilySetup("sdxl", "SDXL", "sdxl_train_network.py", "derm-sdxl.toml", CARD | {"resolution": 1024},
                        SDXL_STEP_TFLOP_CACHED, SDXL_STEP_TFLOP_VAE, SDXL_VARIANTS, "sdxl-card-raw",
                        "sdxl-dermkohya-default", ("sdxl-dermkohya-lora_fast", "sdxl-dermkohya-no-gc"),
                        epochs=2, budget=540, variant_timeout=200, min_slot=110, warmup=6,
                        out_stem="train-throughput-sdxl"),
}


def results_path(family: str, suffix: str = ".json", folder: Path | None = None, gpu: str | None = None,
                 mode: str = "") -> Path:
    """bench/results/train-throughput-<gpu>.json for SD 1.5, train-throughput-sdxl-<gpu>.json for SDXL, where
    <gpu> is the short name of the GPU it ran on (`h200`, `h100`: bench/gpu_name.py); `mode` `wall-1000` gives
    train-wall-1000-<gpu>.json. The files of earlier GPUs stay beside them as history."""
    stem = "train-wall-1000" if mode == "wall-1000" else FAMILIES[family].out_stem
    name = f"{stem}-{gpu or gpu_name.slug()}" + ("-kohya.log" if suffix == ".log" else suffix)
    return (folder or ROOT / "bench" / "results") / name


# --- measuring one launch -----------------------------------------------------------------------------


class GpuSampler:
    """Peak memory used and mean utilisation of the GPU the call trains on (CUDA_VISIBLE_DEVICES' first, else 0),
    sampled every 0.1 s through NVML while a variant runs."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            # NVML counts every GPU; the one this call trains on is CUDA_VISIBLE_DEVICES' first, if it is set
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu_name.visible_index()))
        except Exception:
            self.nvml = None
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.samples, self._stop = [], threading.Event()
        if self.handle is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            except Exception:
                continue
            self.samples.append((time.monotonic(), mem, util))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    def peak_gib(self) -> float | None:
        return round(max(s[1] for s in self.samples) / 2**30, 2) if self.samples else None

    def mean_util(self, start: float | None, end: float | None) -> float | None:
        window = [s[2] for s in self.samples if start is not None and end is not None and start <= s[0] <= end]
        return round(statistics.fmean(window), 1) if window else None


# kohya's start-up, in the order sd-scripts (48d368fa) prints it; the first line holding any of a milestone's
# substrings marks it (plain prints and rich log lines alike: each substring fits in rich's message column)
MILESTONES: dict[str, tuple[str, ...]] = {
    "kohya_running": ("Loading settings from", "Using v1 tokenizer", "Using v2 tokenizer", "prepare images."),
    "preparing_accelerator": ("preparing accelerator",),
    "loading_model": ("loading model for process",),
    "caching_latents": ("caching latents",),
    "network": ("import network module",),
    "optimizer": ("prepare optimizer, data loader etc.",),
    "running_training": ("running training",),
    "graphs_captured": ("captured as CUDA graphs",),
}
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)$")
SAVE_LOG = "saving checkpoint:"


class Progress:
    """kohya's progress lines, time-stamped as they arrive: (step, seconds since launch, avr_loss); also the first
    arrival of each start-up milestone, each `epoch N/M` line and each `saving checkpoint:` line, with the last step
    seen before it (kohya runs unbuffered into one pipe, so arrival order is print order)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.points: dict[int, tuple[float, float | None]] = {}
        self.total: int | None = None
        self.graph_log: list[str] = []
        self.last_loss: float | None = None
        self.milestones: dict[str, float] = {}
        self.epoch_starts: list[tuple[int, int, float]] = []  # (epoch, last step before it, arrival)
        self.saves: list[tuple[int, float]] = []  # (last step before it, arrival)

    def __call__(self, line: str) -> None:
        now = self.clock()
        if LORA_LOG in line:
            self.graph_log.append(line[line.index(LORA_LOG):].strip()[:300])
        self._mark(line, now)
        progress = kohya.parse_progress(line)
        if progress is None:
            return
        self.total = progress.total
        if progress.loss is not None:
            self.last_loss = progress.loss
        if progress.step >= 1 and progress.step not in self.points:
            self.points[progress.step] = (now, progress.loss)
        elif progress.step in self.points and self.points[progress.step][1] is None and progress.loss is not None:
            self.points[progress.step] = (self.points[progress.step][0], progress.loss)

    def _mark(self, line: str, now: float) -> None:
        last = max(self.points, default=0)
        for name, needles in MILESTONES.items():
            if name not in self.milestones and any(n in line for n in needles):
                self.milestones[name] = now
        epoch = _EPOCH.match(line.strip())
        if epoch:
            self.epoch_starts.append((int(epoch.group(1)), last, now))
        if SAVE_LOG in line:
            self.saves.append((last, now))


def step_gaps(points: dict[int, tuple[float, float | None]], warmup: int) -> list[float]:
    """Seconds between consecutive steps from `warmup` on (pairs with a step missing between them left out)."""
    steps = sorted(s for s in points if s >= warmup)
    return [points[b][0] - points[a][0] for a, b in zip(steps, steps[1:]) if b == a + 1]


def steady_state(points: dict[int, tuple[float, float | None]], warmup: int) -> dict[str, Any]:
    """it/s over the steps after `warmup` (epoch-end saves included), and the median step time."""
    steps = sorted(s for s in points if s >= warmup)
    if len(steps) < 2:
        return {"it_per_s": None, "it_per_s_median_step": None, "window": None}
    first, last = steps[0], steps[-1]
    rate = (last - first) / (points[last][0] - points[first][0])
    gaps = step_gaps(points, warmup)
    median = 1 / statistics.median(gaps) if gaps and statistics.median(gaps) > 0 else None
    return {"it_per_s": round(rate, 3), "it_per_s_median_step": round(median, 3) if median else None,
            "window": [first, last]}


def startup_timeline(progress: Progress) -> dict[str, Any]:
    """Where start-up goes: each milestone seen (seconds since launch) and, in arrival order, the time from launch
    to the first, between consecutive ones, and from the last to the first step (`a->b`). Unseen ones are absent,
    so a phase spans whatever ran between the two it names (card-raw has no latent cache and no capture)."""
    seen = sorted(progress.milestones.items(), key=lambda kv: kv[1])
    first_step = progress.points[min(progress.points)][0] if progress.points else None
    marks = [("launch", progress.start), *seen] + ([("first_step", first_step)] if first_step is not None else [])
    phases = {f"{a}->{b}": round(tb - ta, 2) for (a, ta), (b, tb) in zip(marks, marks[1:])}
    return {"milestones": {name: round(t - progress.start, 2) for name, t in seen}, "startup_phases": phases}


def epoch_boundaries(progress: Progress, warmup: int, window: list[int] | None) -> dict[str, Any]:
    """What each epoch end costs beyond a step: the time from epoch k's last step to epoch k+1's first, less the
    median step time (`epoch_boundary_s`, after the steps in `epoch_boundary_after_step`); the time from each
    `saving checkpoint:` line to the next step (`save_s`); and the window's rate without those excesses
    (`steady_excluding_epoch_ends_it_per_s`; `it_per_s` keeps them, by design)."""
    points = progress.points
    gaps = step_gaps(points, warmup) or step_gaps(points, 1)
    median = statistics.median(gaps) if gaps else None
    after = [s for n, s, _ in progress.epoch_starts if n > 1 and s in points and s + 1 in points]
    excess = [points[s + 1][0] - points[s][0] - median for s in after] if median is not None else []
    saves = [min((t for s, (t, _) in points.items() if s > last), default=None) for last, _ in progress.saves]
    save_s = [round(nxt - at, 3) for (_, at), nxt in zip(progress.saves, saves) if nxt is not None]
    out: dict[str, Any] = {"epoch_boundary_after_step": after[:len(excess)],
                           "epoch_boundary_s": [round(e, 3) for e in excess],
                           "epoch_boundary_s_mean": round(statistics.fmean(excess), 3) if excess else None,
                           "save_s": save_s, "steady_excluding_epoch_ends_it_per_s": None}
    if window:
        first, last = window
        inside = sum(e for s, e in zip(after, excess) if first <= s and s + 1 <= last)
        span = points[last][0] - points[first][0] - inside
        out["steady_excluding_epoch_ends_it_per_s"] = round((last - first) / span, 3) if span > 0 else None
    return out


def mfu_pct(it_per_s: float | None, batch: int, cached_latents: bool, family: str = "sd15") -> float | None:
    if not it_per_s:
        return None
    setup = FAMILIES[family]
    tflop = (setup.step_tflop_cached + (0 if cached_latents else setup.step_tflop_vae)) * batch / 4
    return round(100 * it_per_s * tflop / PEAK_TFLOPS, 2)


def _children() -> list[int]:
    mine = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == mine:
                pids.append(int(entry.name))
    return pids


class Watchdog:
    """Stops a variant that runs past its time: SIGINT to each child's process group, then SIGKILL."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 0)):
            for pid in _children():
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(grace)


def safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def layout_digest(header: dict[str, Any]) -> str:
    """One hash of every tensor's name, dtype and shape: equal digests, same file layout."""
    layout = {k: [v["dtype"], v["shape"]] for k, v in sorted(header.items()) if k != "__metadata__"}
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def tensorboard_losses(log_dir: Path) -> list[list[float]] | None:
    """Per-step `loss/current` that kohya logs to tensorboard (exact, unlike the 3-digit progress bar)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except Exception:
        return None
    runs = sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")})
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss/current" in acc.Tags().get("scalars", []):
            return [[e.step, round(e.value, 6)] for e in acc.Scalars("loss/current")]
    return None


# --- profiling kohya's process --------------------------------------------------------------------------


PROFILE_SITE = ROOT / "bench" / "profile_site"  # its sitecustomize.py starts bench/step_profile.py in kohya


@dataclass(frozen=True)
class Profiling:
    """Which variants run with bench/step_profile.py in kohya's process, its window, and where files go."""

    folder: Path
    stem: str  # <stem>-profile-<variant>.json and .collapsed.txt in folder; bundled beside the report
    names: frozenset[str]
    steps: str = "20:60"
    interval_ms: float = 5.0
    kind: str = "stacks"  # or "kernels": torch's profiler over the window (step_profile.py)

    def path(self, variant: str) -> Path | None:
        return self.folder / f"{self.stem}-profile-{variant}.json" if variant in self.names else None

    def bundle(self, dest: Path) -> list[Path]:
        """Every profile written so far, as two files beside the report (the device returns at most 8 files):
        <stem>-profile.json ({variant: its whole profile}) and <stem>-profile.collapsed.txt.gz (each line
        `variant;phase;frame;… count`)."""
        found = {p.name.removeprefix(f"{self.stem}-profile-").removesuffix(".json"): p
                 for p in sorted(self.folder.glob(f"{self.stem}-profile-*.json"))}
        if not found:
            return []
        profiles = {name: json.loads(p.read_text(encoding="utf-8")) for name, p in found.items()}
        bundle = dest / f"{self.stem}-profile.json"
        bundle.write_text(json.dumps(profiles, indent=1) + "\n", encoding="utf-8")
        stacks = dest / f"{self.stem}-profile.collapsed.txt.gz"
        with gzip.open(stacks, "wt", encoding="utf-8") as out:
            for name, path in found.items():
                collapsed = path.with_suffix(".collapsed.txt")
                if collapsed.is_file():
                    for line in collapsed.read_text(encoding="utf-8").splitlines():
                        out.write(f"{name};{line}\n")
        return [bundle, stacks]


class profiling:  # noqa: N801 — a context manager, read as a clause
    """While a profiled variant runs: the env that bench/profile_site/sitecustomize.py reads, the folder first on
    PYTHONPATH (kohya's launches copy os.environ, dermkohya's train_command.sh keeps PYTHONPATH); undone after."""

    def __init__(self, path: Path | None, setup: Profiling | None) -> None:
        self.path, self.setup = path, setup
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> profiling:
        if self.path is None or self.setup is None:
            return self
        self.path.unlink(missing_ok=True)
        env = {step_profile.ENV_OUT: str(self.path), step_profile.ENV_STEPS: self.setup.steps,
               step_profile.ENV_MS: str(self.setup.interval_ms),
               step_profile.ENV_KERNELS: "1" if self.setup.kind == "kernels" else "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROFILE_SITE), os.environ.get("PYTHONPATH")]))}
        for key, value in env.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- the variants -----------------------------------------------------------------------------------


@dataclass
class Bench:
    root: Path
    work: Path
    data_dir: Path
    model_dir: Path
    tokenizers: Path
    epochs: int
    smoke: bool
    sampler: GpuSampler
    log: Path
    warmup: int = WARMUP_STEPS
    family: str = "sd15"
    profile: Profiling | None = None

    @property
    def setup(self) -> FamilySetup:
        return FAMILIES[self.family]

    def raw_argv(self, variant: Variant, out_dir: Path) -> list[str]:
        card = self.setup.card
        precision = "no" if self.smoke else card["mixed_precision"]
        resolution = 64 if self.smoke else card["resolution"]
        return [
            str(kohya.find_python()), "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
            self.setup.script,
            "--pretrained_model_name_or_path", str(self.model_dir), "--tokenizer_cache_dir", str(self.tokenizers),
            "--train_data_dir", str(self.data_dir), "--caption_extension", ".txt",
            "--output_dir", str(out_dir), "--output_name", "card", "--save_model_as", "safetensors",
            "--resolution", f"{resolution},{resolution}",
            "--network_module", "networks.lora", "--network_dim", str(card["network_dim"]),
            "--network_alpha", str(card["network_alpha"]), "--learning_rate", str(card["learning_rate"]),
            "--train_batch_size", str(card["batch_size"]), "--max_train_epochs", str(self.epochs),
            "--mixed_precision", precision, "--save_precision", "fp16", "--seed", "42",
            *variant.raw_flags,
        ]

    def run_file(self, variant: Variant) -> Path:
        data = bench_run_data(self.root / "runs" / self.setup.run_file, self.family, self.data_dir, self.smoke)
        data["name"] = "bench-" + re.sub(r"[^A-Za-z0-9._-]", "-", variant.name) + lane_suffix()
        data["train"]["epochs"] = self.epochs
        data.setdefault("sample", {}).pop("every_n_epochs", None)
        data["sample"].pop("every_n_steps", None)
        for section, values in variant.overrides.items():
            data.setdefault(section, {}).update(values)
        return write_run_file(self.work, data)

    def measure(self, variant: Variant, timeout: float) -> dict[str, Any]:
        from dermkohya import train

        result: dict[str, Any] = {"name": variant.name, "kind": variant.kind, "about": variant.about, "ok": False}
        progress = Progress()
        profile_path = self.profile.path(variant.name) if self.profile else None
        self.sampler.start()
        started = time.monotonic()
        try:
            with Watchdog(timeout) as watchdog, profiling(profile_path, self.profile):
                if variant.kind == "raw":
                    out_dir = self.work / "output" / variant.name
                    shutil.rmtree(out_dir, ignore_errors=True)
                    argv = self.raw_argv(variant, out_dir)
                    result["command"] = argv[1:]
                    launched = kohya.launch(argv, cwd=kohya.find_sd_scripts(), log_path=self.log, env=kohya.kohya_env(),
                                            on_line=progress)
                    returncode, tail = launched.returncode, launched.tail
                    lora = out_dir / "card.safetensors"
                    batch, cached = self.setup.card["batch_size"], "--cache_latents" in variant.raw_flags
                    tb_dir = None
                else:
                    run_file = self.run_file(variant)
                    trained = train.train(run_file, project_root=self.root, new=True, on_line=progress)
                    returncode, tail = trained.returncode, trained.tail
                    lora = trained.lora or Path("/nonexistent")
                    manifest = json.loads(trained.manifest_path.read_text(encoding="utf-8"))
                    result["command"] = manifest.get("command", [])[1:]
                    result["dermkohya_overhead_s"] = round(trained.overhead_seconds, 3)
                    result["dermkohya_timing"] = manifest.get("timing")
                    result["checked_while_kohya_starts"] = trained.overlapped_checks
                    result["warnings"] = trained.warnings
                    with self.log.open("a", encoding="utf-8") as combined:
                        combined.write(trained.log_path.read_text(encoding="utf-8", errors="replace"))
                    config = run_file.with_suffix("") / "config.toml"
                    result["rendered_config"] = config.read_text(encoding="utf-8") if config.is_file() else None
                    spec = tomllib.loads(run_file.read_text(encoding="utf-8"))
                    batch = spec.get("train", {}).get("batch_size", 4) * spec.get("launch", {}).get("processes", 1)
                    cached = spec.get("train", {}).get("cache_latents", True)
                    tb_dir = trained.manifest_path.parent / "logs"
                    if trained.hint:
                        result["hint"] = trained.hint
        except Exception as exc:  # a harness-side failure of one variant must not stop the others
            self.sampler.stop()
            result |= {"error": f"{type(exc).__name__}: {exc}", "wall_s": round(time.monotonic() - started, 1)}
            return result
        self.sampler.stop()
        wall = time.monotonic() - started
        points = {s: (t - progress.start, loss) for s, (t, loss) in progress.points.items()}
        steady = steady_state(progress.points, self.warmup)
        first_step = min(points) if points else None
        window = steady["window"]
        util = self.sampler.mean_util(progress.points[window[0]][0], progress.points[window[1]][0]) if window else None
        result |= {
            "ok": returncode == 0 and lora.is_file() and not watchdog.fired,
            "returncode": returncode,
            "timed_out": watchdog.fired,
            "wall_s": round(wall, 1),
            "startup_s": round(points[first_step][0], 1) if first_step else None,
            "steps": max(points) if points else 0,
            "total_steps": progress.total,
            "batch_size": batch,
            "cached_latents": cached,
            **steady,
            "images_per_s": round(steady["it_per_s"] * batch, 2) if steady["it_per_s"] else None,
            "mfu_pct": mfu_pct(steady["it_per_s"], batch, cached, self.family),
            "peak_gpu_mem_gib": self.sampler.peak_gib(),
            "gpu_util_mean_pct": util,
            "final_loss": progress.last_loss,
            "loss_curve": [[s, points[s][1]] for s in sorted(points)],
            "graph_log": progress.graph_log,
            **startup_timeline(progress),
            **epoch_boundaries(progress, self.warmup, window),
        }
        if tb_dir is not None and tb_dir.is_dir():
            result["losses_tensorboard"] = tensorboard_losses(tb_dir)
        if lora.is_file():
            header = safetensors_header(lora)
            meta = header.pop("__metadata__", {})
            result["lora_file"] = {"path": str(lora), "bytes": lora.stat().st_size, "tensors": len(header),
                                   "ss_network_module": meta.get("ss_network_module"),
                                   "trained_with": meta.get("dermkohya.trained_with"), "metadata_keys": sorted(meta),
                                   "layout_sha256": layout_digest(header)}
        if not result["ok"]:
            result["error"] = "timed out" if watchdog.fired else "\n".join(tail[-15:])
        if profile_path is not None:
            result["profiled"] = True
            result["step_profile"] = step_profile.summarise(profile_path) or {
                "error": f"no profile written ({profile_path.name}): kohya's process did not start the sampler"}
            result["step_profile_files"] = [f"{self.profile.stem}-profile.json ({variant.name})",
                                            f"{self.profile.stem}-profile.collapsed.txt.gz (lines {variant.name};…)"]
        return result


def bench_run_data(source: Path, family: str, data_dir: Path, smoke: bool) -> dict[str, Any]:
    """A shipped run file's data on the random model and the bench data (64 px, fp32 for a CPU `smoke`)."""
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    # the random model only: a run file's vae (SDXL's fp16-fix file) is not on the bench machine
    data["model"] = {"base": f"random:{family}", "family": family}
    data["dataset"] = {k: v for k, v in data.get("dataset", {}).items() if k != "prepared"}
    data["dataset"]["train_data_dir"] = str(data_dir)
    data.setdefault("train", {})
    if smoke:
        data["train"] |= {"resolution": 64, "mixed_precision": "no", "data_loader_workers": 0,
                          "persistent_data_loader_workers": False}
        data["dataset"] |= {"min_bucket_reso": 64, "max_bucket_reso": 128}
    return data


def write_run_file(work: Path, data: dict[str, Any]) -> Path:
    """`data` as work/runs/<its name>.toml."""
    path = work / "runs" / f"{data['name']}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def replicate_dataset(source: Path, dest: Path, count: int) -> Path:
    """`count` images (with captions) in dest/<the same concept folder>, the source's copied round in order:
    kohya reads and caches each as its own image, so the work per image is the source's."""
    concept = next(p for p in sorted(source.iterdir()) if p.is_dir())
    images = sorted(concept.glob("*.png"))
    if not images:
        raise FileNotFoundError(f"{concept}: no .png images to copy (bench/train_throughput.py --images)")
    folder = dest / concept.name
    shutil.rmtree(dest, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(count):
        image = images[i % len(images)]
        shutil.copyfile(image, folder / f"img_{i:05d}.png")
        shutil.copyfile(image.with_suffix(".txt"), folder / f"img_{i:05d}.txt")
    return dest


# --- the summary ---------------------------------------------------------------------------------------


def wall_summary(wall: dict[str, Any], by: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whole runs, launch to exit: card-raw's wall time over the default's (and any other variant's). When card-raw
    ran out of time the ratio is a lower bound, said so."""
    out = {k: v for k, v in wall.items() if k in ("what", "images", "epochs", "target")}
    raw = by.get("card-raw")
    runs = {}
    for name, v in by.items():
        runs[name] = {"wall_s": v.get("wall_s"), "finished": bool(v.get("ok")), "steps": v.get("steps"),
                      "total_steps": v.get("total_steps"), "startup_s": v.get("startup_s"), "it_per_s": v.get("it_per_s")}
    out["runs"] = runs
    if not raw or not raw.get("wall_s"):
        return out
    ratios = {}
    for name, v in by.items():
        if name == "card-raw" or not v.get("ok") or not v.get("wall_s"):
            continue
        ratio = round(raw["wall_s"] / v["wall_s"], 2)
        ratios[name] = {"speedup_wall": ratio} if raw.get("ok") else {
            "speedup_wall_at_least": ratio,
            "why": f"card-raw had not finished after {raw['wall_s']} s ({raw.get('steps')} of {raw.get('total_steps')} "
                   "steps): its whole run is longer, so the ratio is at least this"}
    out["vs_card_raw"] = ratios
    default = ratios.get("dermkohya-default", {})
    got = default.get("speedup_wall", default.get("speedup_wall_at_least"))
    if got is not None:
        out["meets_target"] = got >= WALL_TARGET
    return out




def _by_name(variants: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in variants}


def loss_equivalence(fast: dict[str, Any] | None, ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """lora_fast (graphs) against kohya's networks.lora on the same seed, data and settings."""
    if not fast or not ref:
        return None
    out: dict[str, Any] = {"fast": fast["name"], "reference": ref["name"]}
    a, b = fast.get("losses_tensorboard"), ref.get("losses_tensorboard")
    if a and b:
        pairs = [(x[1], y[1]) for x, y in zip(a, b) if x[0] == y[0]]
        diffs = [abs(x - y) for x, y in pairs]
        mean_ref = statistics.fmean(abs(y) for _, y in pairs)
        out |= {"source": "tensorboard loss/current", "steps_compared": len(pairs),
                "max_abs_diff": round(max(diffs), 6), "mean_abs_diff": round(statistics.fmean(diffs), 6),
                "mean_loss_reference": round(mean_ref, 6),
                "mean_loss_fast": round(statistics.fmean(x for x, _ in pairs), 6)}
    fa, fb = fast.get("final_loss"), ref.get("final_loss")
    if fa is not None and fb is not None:
        out |= {"final_avr_loss_fast": fa, "final_avr_loss_reference": fb}
    files_a, files_b = fast.get("lora_file"), ref.get("lora_file")
    if files_a and files_b:
        out["same_tensor_names_shapes_dtypes"] = files_a["layout_sha256"] == files_b["layout_sha256"]
        out["metadata_keys_only_in_fast"] = sorted(set(files_a["metadata_keys"]) - set(files_b["metadata_keys"]))
        out["metadata_keys_only_in_reference"] = sorted(set(files_b["metadata_keys"]) - set(files_a["metadata_keys"]))
        out["ss_network_module"] = [files_a["ss_network_module"], files_b["ss_network_module"]]
    return out


def torch_compile_summary(compiled: dict[str, Any], eager: dict[str, Any] | None,
                          default: dict[str, Any] | None) -> dict[str, Any]:
    """kohya's --torch_compile against the same flags without it: what the compile costs, what a step gains."""
    out: dict[str, Any] = {"measured": True, "variant": compiled["name"], "ok": compiled.get("ok"),
                           "it_per_s": compiled.get("it_per_s"), "startup_s": compiled.get("startup_s")}
    if not compiled.get("ok"):
        out["error"] = str(compiled.get("error", ""))[-400:]
    if eager and eager.get("startup_s") is not None and compiled.get("startup_s") is not None:
        compile_s = compiled["startup_s"] - eager["startup_s"]
        out["compile_s"] = round(compile_s, 1)
        if eager.get("it_per_s") and compiled.get("it_per_s"):
            out["speedup_vs_same_flags_eager"] = round(compiled["it_per_s"] / eager["it_per_s"], 2)
            steps = 3 * -(-1000 // CARD["batch_size"])  # a 3-epoch run on 1,000 images
            out["three_epochs_1000_images_s"] = {
                "eager": round(eager["startup_s"] + steps / eager["it_per_s"], 1),
                "compiled": round(compiled["startup_s"] + steps / compiled["it_per_s"], 1)}
    if default and default.get("it_per_s") and compiled.get("it_per_s"):
        out["dermkohya_default_vs_compiled"] = round(default["it_per_s"] / compiled["it_per_s"], 2)
    return out


PAIRS = (("card-raw", "dermkohya-default"), ("card-raw-repeat", "dermkohya-default-repeat"))
PAIR_TARGET = 4.0  # issue #18: the default at ≥ 4× card-raw's it/s, the lower of two back-to-back pairs
DEFAULTS = ("dermkohya-default", "dermkohya-default-repeat")
SDXL_LEVERS = ("sdxl-dermkohya-norms-autocast", "sdxl-dermkohya-te-eager", "sdxl-dermkohya-save-copy-batched", "sdxl-dermkohya-channels-last")
SDXL_DEFAULTS = ("sdxl-dermkohya-default",)


def pairs_summary(by: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """card-raw then the default, twice in one call: each pair's ratio, and the lower one (the one that counts)."""
    pairs = []
    for raw_name, default_name in PAIRS:
        raw, default = by.get(raw_name, {}), by.get(default_name, {})
        if raw.get("it_per_s") and default.get("it_per_s"):
            pairs.append({"card_raw": raw_name, "default": default_name, "card_raw_it_per_s": raw["it_per_s"],
                          "default_it_per_s": default["it_per_s"],
                          "speedup": round(default["it_per_s"] / raw["it_per_s"], 2),
                          "profiled": bool(raw.get("profiled") or default.get("profiled"))})
    if not pairs:
        return None
    lower = min(p["speedup"] for p in pairs)
    return {"what": "it/s of the default over card-raw's, each pair launched back to back in this call; the lower "
                    "pair counts", "pairs": pairs, "speedup_lower": lower, "target": PAIR_TARGET,
            "meets_target": lower >= PAIR_TARGET and len(pairs) == len(PAIRS)}


def levers_summary(report: dict[str, Any], by: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Each lever variant (the default with one change) against the default measured the same way (profiled or
    not) in the same call: it/s ratio and start-up difference."""
    out: dict[str, Any] = {}
    for variant in report["variants"]:
        if variant["name"] not in LEVERS + SDXL_LEVERS or not variant.get("it_per_s"):
            continue
        defaults = SDXL_DEFAULTS if variant["name"] in SDXL_LEVERS else DEFAULTS
        refs = [by[n] for n in defaults if by.get(n, {}).get("it_per_s")]
        same = [r for r in refs if bool(r.get("profiled")) == bool(variant.get("profiled"))] or refs
        if not same:
            continue
        ref_rate = statistics.fmean(r["it_per_s"] for r in same)
        entry: dict[str, Any] = {"it_per_s": variant["it_per_s"], "default_it_per_s": round(ref_rate, 3),
                                 "ratio_vs_default": round(variant["it_per_s"] / ref_rate, 3),
                                 "reference": [r["name"] for r in same]}
        starts = [r["startup_s"] for r in same if r.get("startup_s") is not None]
        if variant.get("startup_s") is not None and starts:
            entry["startup_s"] = variant["startup_s"]
            entry["startup_s_minus_default"] = round(variant["startup_s"] - statistics.fmean(starts), 1)
        ends = [r["epoch_boundary_s_mean"] for r in same if r.get("epoch_boundary_s_mean") is not None]
        if variant.get("epoch_boundary_s_mean") is not None and ends:  # what an epoch end costs beyond a step
            entry["epoch_boundary_s_mean"] = variant["epoch_boundary_s_mean"]
            entry["default_epoch_boundary_s_mean"] = round(statistics.fmean(ends), 3)
        step = (variant.get("step_profile") or {}).get("step_timing", {})
        if step.get("step_ms_median") is not None:
            entry["step_ms_median_profiled"] = step["step_ms_median"]
        out[variant["name"]] = entry
    return out or None


def summarise(report: dict[str, Any]) -> None:
    setup = FAMILIES[report.get("family", "sd15")]
    by = _by_name(report["variants"])
    report["levers"] = levers_summary(report, by)
    if setup.family == "sd15":
        report["pairs"] = pairs_summary(by)
        if report.get("wall_1000"):
            report["wall_1000"] = wall_summary(report["wall_1000"], by)
            default_wall = report["wall_1000"].get("vs_card_raw", {}).get("dermkohya-default", {})
            report[WALL_HEADLINE] = default_wall.get("speedup_wall", default_wall.get("speedup_wall_at_least"))
    raw, default = by.get(setup.raw), by.get(setup.default)
    if raw and default and raw.get("it_per_s") and default.get("it_per_s"):
        report["speedup_default_vs_card_raw"] = round(default["it_per_s"] / raw["it_per_s"], 2)
        if raw.get("wall_s") and default.get("wall_s"):
            report["speedup_default_vs_card_raw_wall"] = round(raw["wall_s"] / default["wall_s"], 2)
    else:
        report["speedup_default_vs_card_raw"] = None
    if report.get("pairs") and len(report["pairs"]["pairs"]) == len(PAIRS):  # issue #18's headline: the lower pair
        report["speedup_default_vs_card_raw"] = report["pairs"]["speedup_lower"]
    report["mfu_default_pct"] = default.get("mfu_pct") if default else None
    for name in ("card-raw-repeat", "dermkohya-default-repeat"):
        if by.get(name, {}).get("it_per_s") and by.get(name.removesuffix("-repeat"), {}).get("it_per_s"):
            report.setdefault("drift", {})[name] = round(by[name]["it_per_s"] / by[name.removesuffix("-repeat")]["it_per_s"], 3)
    fast, reference = setup.equivalence
    report["loss_equivalence"] = loss_equivalence(by.get(fast), by.get(reference))
    compiled, eager = by.get("raw+sdpa+cache_latents+compile"), by.get("raw+sdpa+cache_latents")
    if compiled:
        report["torch_compile"] = torch_compile_summary(compiled, eager, default)
    if setup.family != "sd15":
        _summarise_more(report, setup, by)
    if default and default.get("dermkohya_overhead_s") is not None and default.get("it_per_s"):
        images = report["setup"]["dataset"]["images"]
        per_epoch = -(-images // default["batch_size"])
        three_epochs = (default.get("startup_s") or 0) + 3 * per_epoch / default["it_per_s"]
        per_epoch_1000 = -(-1000 // default["batch_size"])
        three_epochs_1000 = (default.get("startup_s") or 0) + 3 * per_epoch_1000 / default["it_per_s"]
        timed = [v["dermkohya_overhead_s"] for v in report["variants"] if v.get("dermkohya_overhead_s") is not None]
        report["overhead"] = {
            "what": "dermkohya train's own time: render, dataset scan, env checks, manifest before the launch, plus any "
                    "time the checks it runs beside kohya's start-up (first run: base-model hash, kohya's option list) "
                    "outlasted that start-up (held kohya back)",
            "first_run_s": default["dermkohya_overhead_s"],
            "first_run_timing": default.get("dermkohya_timing"),
            "first_run_checked_while_kohya_starts": default.get("checked_while_kohya_starts"),
            "later_runs_s": timed[1:],
            "three_epoch_run_bench_dataset_s": round(three_epochs, 1),
            "fraction_of_three_epochs_bench_dataset": round(default["dermkohya_overhead_s"] / three_epochs, 4),
            "three_epoch_run_1000_images_s": round(three_epochs_1000, 1),
            "fraction_of_three_epochs_1000_images": round(default["dermkohya_overhead_s"] / three_epochs_1000, 4),
        }


def _summarise_more(report: dict[str, Any], setup: FamilySetup, by: dict[str, dict[str, Any]]) -> None:
    """SDXL's extras: every variant's it/s against the card's, and the fallback reference if the card failed."""
    raw, default = by.get(setup.raw), by.get(setup.default)
    if raw and raw.get("it_per_s"):
        report["speedup_vs_card_raw"] = {v["name"]: round(v["it_per_s"] / raw["it_per_s"], 2) for v in report["variants"]
                                         if v.get("ok") and v.get("it_per_s") and v["name"] != setup.raw}
    elif raw and not raw.get("ok"):
        report["card_raw_failed"] = "timed out" if raw.get("timed_out") else failure_cause(raw.get("error"))
    for variant in setup.variants:
        fallback = by.get(variant.name)
        if variant.only_if_failed == setup.raw and fallback and fallback.get("it_per_s"):
            ratios = {v["name"]: round(v["it_per_s"] / fallback["it_per_s"], 2) for v in report["variants"]
                      if v.get("ok") and v.get("it_per_s") and v["kind"] == "dermkohya"}
            report[f"speedup_vs_{variant.name}"] = ratios
            if default and default["name"] in ratios:
                report[f"speedup_default_vs_{variant.name}"] = ratios[default["name"]]


def multi_gpu_render(root: Path, bench: Bench) -> dict[str, Any]:
    """What `[launch] processes = 2` renders (no GPU needed); the scaling run itself needs nvidia-h200-x2."""
    path = bench.run_file(Variant("multi-gpu-render", "dermkohya", "", overrides={"launch": {"processes": 2}}))
    rendered = render.render(path, project_root=root, check_keys=False)
    return {"launch_args_processes_2": rendered.launch_args}


# --- setup --------------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("torch", "accelerate", "diffusers", "transformers", "huggingface-hub", "tokenizers", "safetensors",
                 "numpy", "tqdm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        pass
    return out


def machine(sampler: GpuSampler) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    if sampler.nvml is not None and sampler.handle is not None:
        nvml = sampler.nvml
        name = nvml.nvmlDeviceGetName(sampler.handle)
        out |= {"gpu": name.decode() if isinstance(name, bytes) else name,
                "gpu_count": nvml.nvmlDeviceGetCount(),
                "gpu_memory_gib": round(nvml.nvmlDeviceGetMemoryInfo(sampler.handle).total / 2**30, 1),
                "driver": nvml.nvmlSystemGetDriverVersion()}
    return out


def _commit(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15",
                        help="sd15 (train_network.py, 512 px) or sdxl (sdxl_train_network.py, 1024 px)")
    parser.add_argument("--out", type=Path, help="default bench/results/train-throughput-h100.json (SD 1.5), "
                        "train-throughput-sdxl-h100.json (SDXL)")
    parser.add_argument("--log", type=Path, help="kohya's combined output of every variant")
    parser.add_argument("--device-dir", type=Path, default=ROOT / ".device", help="what bench/gpu_prepare.sh made")
    parser.add_argument("--work", type=Path, default=default_work_dir(),
                        help="scratch folder (data, runs, outputs); default per CUDA_VISIBLE_DEVICES, so two lanes of "
                             "one machine never share it")
    parser.add_argument("--project-root", type=Path, default=ROOT)
    parser.add_argument("--epochs", type=int, help="epochs of the 72-image set (18 steps each): SD 1.5 4, SDXL 2")
    parser.add_argument("--budget", type=float, help="seconds for everything, the model build included; variants "
                        "that do not fit are skipped (default 540)")
    parser.add_argument("--variant-timeout", type=float, help="seconds per variant: SD 1.5 170, SDXL 200")
    parser.add_argument("--variants", help="comma-separated names (default: all of the family's, in order)")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: 64 px, fp32, 1 epoch of 18 images")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="SD 1.5: `pairs` (the default without --variants: "
                        "card-raw/default twice back to back, the first pair and any lever profiled, then levers as "
                        "time allows) or `wall-1000` (a whole 3-epoch run on 1,000 images, start-up included)")
    parser.add_argument("--wall-1000", dest="preset", action="store_const", const="wall-1000",
                        help="same as --preset wall-1000")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="run bench/step_profile.py inside kohya's process for every variant but the -repeat ones "
                             "(on with --preset pairs); files <out>-profile.json and <out>-profile.collapsed.txt.gz")
    parser.add_argument("--profile-steps", default=None, help="first:last steps of the profiled window (20:60; "
                        "kernels: 24:34, inside the second epoch)")
    parser.add_argument("--profile-kind", choices=("stacks", "kernels"), default="stacks",
                        help="stacks: bench/step_profile.py samples kohya's Python stacks; kernels: torch's profiler "
                             "records the GPU's kernels over the window (GPU busy vs wall, categories, top kernels)")
    parser.add_argument("--images", type=int, help="train on this many images (the bench's 72 copied round); "
                        "wall-1000: 1000")
    parser.add_argument("--gpu", help="the GPU's short name in file names (default: bench/gpu_name.py, e.g. h200)")
    parser.add_argument("--attach-wall", type=Path, help="no run: copy this wall-1000 report's headline "
                        f"({WALL_HEADLINE}) and summary into the report at --out")
    parser.add_argument("--merge", type=Path, nargs="+", help="no run: join these reports' variants (e.g. two wall-1000 "
                        "calls, one variant each) into --out and summarise them")
    args = parser.parse_args()
    if args.attach_wall:
        if not args.out:
            parser.error("--attach-wall needs --out (the pairs report to complete)")
        pairs = json.loads(args.out.read_text(encoding="utf-8"))
        _write(args.out, attach_wall(pairs, json.loads(args.attach_wall.read_text(encoding="utf-8")), args.attach_wall.name))
        return 0
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        _write(args.out, merge_reports(args.merge))
        return 0
    t0 = time.monotonic()
    family = FAMILIES[args.family]
    if family.family != "sd15" and args.preset:
        parser.error(f"--preset {args.preset}: SD 1.5 only")
    preset = PRESETS[args.preset or ("pairs" if family.family == "sd15" and not args.variants else "none")]
    args.out = args.out or results_path(family.family, gpu=args.gpu or ("cpu" if args.smoke else None),
                                        mode=preset.name)
    args.epochs = args.epochs or preset.epochs or family.epochs
    args.images = args.images or preset.images
    args.budget = args.budget or family.budget
    args.variant_timeout = args.variant_timeout or preset.variant_timeout or family.variant_timeout
    names = args.variants.split(",") if args.variants else list(preset.variants) or [v.name for v in family.variants]
    unknown = sorted(set(names) - {v.name for v in family.variants})
    if unknown:
        parser.error(f"--variants {','.join(unknown)}: not one of the {family.label} variants; choose from "
                     + ", ".join(v.name for v in family.variants))
    root = args.project_root.resolve()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = (args.log or work / "kohya.log").resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)

    device = args.device_dir.resolve()
    if (device / "sd-scripts" / "train_network.py").is_file():
        os.environ["SD_SCRIPTS_DIR"] = str(device / "sd-scripts")
    os.environ.setdefault("KOHYA_PYTHON", sys.executable)
    os.environ.setdefault("DERMKOHYA_CACHE", str(work / "cache"))
    os.environ["TQDM_MININTERVAL"] = "0"  # a progress line per step, for every variant alike

    from dermkohya import basemodel, demo

    models = root / render.SMOKE_MODELS_DIR
    try:
        if (device / "tokenizers").is_dir() and not (models / "tokenizers").exists():
            shutil.copytree(device / "tokenizers", models / "tokenizers")
        started = time.monotonic()
        model_dir, tokenizers = basemodel.ensure_smoke_model(family.family, cache_root=models)
        model_s = time.monotonic() - started
        model_bytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
        print(f"[{time.monotonic() - t0:6.0f} s] random:{family.family} ready in {model_s:.0f} s "
              f"({model_bytes / 1e9:.1f} GB)", flush=True)
        started = time.monotonic()
        per_cell, size = (1, 64) if args.smoke else (4, family.card["resolution"])
        data_dir = demo.make_demo_dataset(work / "data", seed=0, per_cell=per_cell, size=size)
        source_images = len(list(data_dir.glob("*/*.png")))
        if args.images:
            data_dir = replicate_dataset(data_dir, work / f"data-{args.images}", args.images)
        images = len(list(data_dir.glob("*/*.png")))
        data_s = time.monotonic() - started
    except Exception as exc:  # the JSON still says what broke
        _write(args.out, {"setup_error": f"{type(exc).__name__}: {exc}", "versions": versions()})
        raise
    sampler = GpuSampler()
    epochs = 1 if args.smoke else args.epochs
    profile = args.profile if args.profile is not None else preset.profile
    steps = args.profile_steps or ("1:4" if args.smoke else "24:34" if args.profile_kind == "kernels" else "20:60")
    profiling_setup = Profiling(work / "profiles", args.out.stem, frozenset(
        n for n in names if not n.endswith("-repeat")), steps, kind=args.profile_kind) if profile else None
    bench = Bench(root, work, data_dir, model_dir, tokenizers, epochs, args.smoke, sampler, log,
                  warmup=1 if args.smoke else family.warmup, family=family.family, profile=profiling_setup)

    sd_scripts = kohya.find_sd_scripts()
    report: dict[str, Any] = {
        "benchmark": "SD 1.5 LoRA training throughput, the card's kohya command vs dermkohya's default",
        "harness": "bench/train_throughput.py (run by bench/gpu_run.sh)",
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(sampler),
        "versions": versions() | {
            "sd_scripts_commit": kohya.sd_scripts_commit(sd_scripts) or _commit(device / "sd-scripts.commit"),
            "dermkohya_commit": _commit(device / "repo.commit"),
        },
        "card": family.card,
        "setup": {
            "model": "random:sd15 — full-size SD 1.5 architecture, random fp16 weights (speed does not depend on values)",
            "model_build_s": round(model_s, 1),
            "dataset": {"generator": "dermkohya.demo.make_demo_dataset"
                        + (f" (its {source_images} images copied round to {images})" if args.images else ""),
                        "images": images, "size": size, "repeats": 1, "build_s": round(data_s, 1)},
            "epochs": epochs,
            "warmup_steps_skipped": bench.warmup,
            "progress": "kohya's tqdm lines, one per step (TQDM_MININTERVAL=0), time-stamped on arrival",
            "memory": "NVML memory used on GPU 0 (all processes), sampled every 0.1 s",
            "mfu": f"it/s × {STEP_TFLOP_CACHED} TFLOP (+{STEP_TFLOP_VAE} without cached latents) × batch/4 ÷ {PEAK_TFLOPS} TFLOP/s",
            "smoke": args.smoke,
        },
        "preset": preset.name or None,
        "variants": [],
        "skipped": [],
        "torch_compile": {"measured": False, "reason": "issue #6 measured no step within 330 s with --torch_compile "
                          "--dynamo_backend inductor; not repeated within this call's time"},
        "sdxl": {"measured": False, "reason": "measured by its own call: bench/gpu_run.sh --family sdxl "
                 "(train-throughput-sdxl-h100.json)"},
    }
    if profiling_setup:
        report["setup"]["profile"] = {
            "how": "bench/step_profile.py in kohya's training process (bench/profile_site/sitecustomize.py on its "
                   "PYTHONPATH): the main thread's Python stack sampled every 5 ms (GIL switch interval 0.5 ms), "
                   "torch.cuda.synchronize() timed at each step's end; start-up = before step 1",
            "steps": steps, "variants": sorted(profiling_setup.names),
            "unprofiled": "the -repeat variants: the second pair is measured without the profiler"}
    if preset.name == "wall-1000":
        report["wall_1000"] = {"what": f"whole {epochs}-epoch runs on {images} images, launch to exit (start-up, "
                               "latent caching, saves and dermkohya's own time included), measured, one after the other",
                               "images": images, "epochs": epochs, "target": WALL_TARGET}
    if family.family == "sd15":
        try:
            report["multi_gpu"] = {"measured": False,
                                   "reason": "the 1 vs 2 GPU run needs nvidia-h200-x2 (not part of this single-GPU call)",
                                   **multi_gpu_render(root, bench)}
        except Exception as exc:
            report["multi_gpu"] = {"measured": False, "error": f"{type(exc).__name__}: {exc}"}
    else:
        report = sdxl_report(report, family, model_bytes)

    places = redaction_places(args.device_dir, work, root)
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # gpu_run.sh's temporary wheel folder
        if entry and Path(entry).resolve() != root:
            places[str(Path(entry).resolve())] = "<site>"
            places[entry] = "<site>"
    report["setup"]["paths"] = ("machine paths redacted: <repo> is the repository root, <work> the scratch folder, "
                                "<site> the folder of the carried wheels")
    chosen = [v for name in names for v in family.variants if v.name == name]
    for variant in chosen:
        left = args.budget - (time.monotonic() - t0)
        reason = skip_reason(variant, report["variants"], left, family.min_slot)
        if reason:
            report["skipped"].append({"name": variant.name, "reason": reason})
            continue
        print(f"[{time.monotonic() - t0:6.0f} s] {variant.name} …", flush=True)
        result = bench.measure(variant, timeout=min(args.variant_timeout, left - 15))
        report["variants"].append(result)
        print(f"[{time.monotonic() - t0:6.0f} s] {variant.name}: ok={result['ok']} it/s={result.get('it_per_s')} "
              f"peak={result.get('peak_gpu_mem_gib')} GiB wall={result.get('wall_s')} s {result.get('graph_log', [])[-1:]}"
              + ("" if result["ok"] else f"\n  error: {str(result.get('error'))[-600:]}"), flush=True)
        summarise(report)
        _write(args.out, report, places)
        if profiling_setup:
            profiling_setup.bundle(args.out.parent)
    report["harness_seconds"] = round(time.monotonic() - t0, 1)
    summarise(report)
    _write(args.out, report, places)
    headline = ["speedup_default_vs_card_raw", "speedup_default_vs_card_raw_wall", WALL_HEADLINE, "pairs", "levers", "wall_1000",
                "mfu_default_pct", "loss_equivalence", "overhead"]
    headline += [k for k in report if k.startswith(("speedup_vs", "speedup_default_vs_sdxl", "card_raw_failed"))]
    print(json.dumps({k: report.get(k) for k in headline}, indent=1))
    return 0


def lane_suffix() -> str:
    """"-gpu<ids>" when CUDA_VISIBLE_DEVICES picks GPUs, else "": two harnesses run side by side on one machine (one GPU
    each) get their own scratch folder and run names (a run's lock would otherwise refuse the second's variant)."""
    visible = re.sub(r"[^A-Za-z0-9]+", "-", os.environ.get("CUDA_VISIBLE_DEVICES", "")).strip("-")
    return f"-gpu{visible}" if visible else ""


def default_work_dir() -> Path:
    """$TMPDIR/dermkohya-bench, or dermkohya-bench-gpu<ids> (`lane_suffix`)."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"dermkohya-bench{lane_suffix()}"


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """One report from several calls' (their variants in the given order, the first's setup), marked as merged."""
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    merged = dict(reports[0])
    merged["variants"] = [v | {"call": p.name} for p, r in zip(paths, reports) for v in r["variants"]]
    merged["merged_from"] = [{"file": p.name, "generated": r.get("generated"), "gpu": r.get("machine", {}).get("gpu")}
                             for p, r in zip(paths, reports)]
    for key in ("pairs", "levers", "speedup_default_vs_card_raw", "speedup_default_vs_card_raw_wall"):
        merged.pop(key, None)
    if merged.get("wall_1000"):
        merged["wall_1000"]["what"] = (merged["wall_1000"]["what"].replace(", one after the other", "")
                                       + "; merged from one report per run (merged_from)")
    summarise(merged)
    return merged


def attach_wall(pairs: dict[str, Any], wall: dict[str, Any], wall_name: str) -> dict[str, Any]:
    """The pairs report with the wall-clock headline of a wall-1000 report (issue #18 names both fields in
    train-throughput-<gpu>.json): its ratio, its summary, and which file and call it came from."""
    if not wall.get("wall_1000"):
        raise SystemExit(f"{wall_name}: not a wall-1000 report (no wall_1000 summary); run --wall-1000 or --merge first")
    out = dict(pairs)
    out[WALL_HEADLINE] = wall.get(WALL_HEADLINE)
    # its own key: `wall_1000` in a report means runs of that report, which summarise() recomputes
    out["wall_1000_measured"] = wall["wall_1000"] | {"source": wall_name, "generated": wall.get("generated")}
    return out


def skip_reason(variant: Variant, done: list[dict[str, Any]], left: float, min_slot: float) -> str | None:
    """Why a variant is not started: a fallback whose variant did not fail, or too little time left
    (a variant needs ~60–120 s, SDXL more; a shorter slot only ends in a timeout)."""
    if variant.only_if_failed:
        before = _by_name(done).get(variant.only_if_failed)
        if before is None or before["ok"]:
            return f"runs only if {variant.only_if_failed} failed; it " + ("was not run" if before is None else "ran fine")
    if left < min_slot:
        return f"time budget ({left:.0f} s left)"
    return None


def sdxl_report(report: dict[str, Any], family: FamilySetup, model_bytes: int) -> dict[str, Any]:
    """The SD 1.5 report's fields, said of SDXL: family, resolution, script, model, work per step."""
    setup = report["setup"] | {
        "model": f"random:{family.family} — full-size SDXL architecture (U-Net, CLIP-L and bigG text encoders), random "
                 "fp16 weights (speed does not depend on values); built on this machine by the harness",
        "model_bytes": model_bytes,
        "script": family.script,
        "run_file": f"runs/{family.run_file} with [model] base = random:{family.family} (its vae path dropped), "
                    "sampling off, epochs and data from the bench",
        "mfu": f"it/s × {family.step_tflop_cached} TFLOP (+{family.step_tflop_vae} without cached latents) × batch/4 ÷ "
               f"{PEAK_TFLOPS} TFLOP/s (bench/unet_flops.py)",
    }
    replaced = {
        "benchmark": {"benchmark": f"{family.label} LoRA training throughput, the card's kohya command vs dermkohya's "
                      "default", "family": family.family, "resolution": family.card["resolution"]},
        "setup": {"setup": setup},
        "torch_compile": {"torch_compile": {"measured": False, "reason": "not tried on SDXL (issue #6: no SD 1.5 step "
                                            "within 330 s)"}},
        "sdxl": {"multi_gpu": {"measured": False, "reason": "single-GPU call; the 1 vs 2 GPU scaling is measured on "
                               "SD 1.5 (bench/gpu_run_x2.sh)"}},
    }
    out: dict[str, Any] = {}
    for key, value in report.items():
        out |= replaced.get(key, {key: value})
    return out


def redaction_places(device_dir: Path, work: Path, root: Path) -> dict[str, str]:
    """Machine path → its name in the report, in the order redact() replaces them. The carried .device folder
    may be a link out of the checkout (it is on the device), so its resolved path is named too, before the root."""
    return {str(device_dir.resolve()): "<repo>/.device", str(device_dir): "<repo>/.device", str(work): "<work>",
            str(root): "<repo>"}


def redact(value: Any, places: dict[str, str]) -> Any:
    """Machine paths in the report become `<repo>` / `<work>`: results are committed, machines are not."""
    if isinstance(value, str):
        for path, name in places.items():
            value = value.replace(path, name)
        return value
    if isinstance(value, list):
        return [redact(v, places) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, places) for k, v in value.items()}
    return value


def _write(path: Path, report: dict[str, Any], places: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(redact(report, places or {}), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
