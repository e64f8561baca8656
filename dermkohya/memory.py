"""Will a run fit the GPU? The benchmark's measured peak memory, matched to the run, against the free memory.

kohya runs out of GPU memory only after a minute or more of model loading and latent caching, and the
fix (gradient checkpointing, kohya's own LoRA module, a smaller batch) is a choice between speed and
memory that the run file makes explicit. So `train` compares, before the launch, what the run will
need with what the GPU has free, and refuses with the keys to change when it will not fit.

What a run needs comes from measurements, not a model of memory: `memory_table.json` (package data)
holds the peak GPU memory of every training run `bench/train_throughput.py` measured, by profile
(family, resolution, batch, processes, checkpointing, network, precision, latent cache, text encoder,
attention, rank); `bench/memory_table.py` writes it from `bench/results/`. A run takes its own profile's
measurement; where that was not measured, the smallest measurement of a profile that needs at least as
much (checkpointing off where the run has it on, graphs where it has none, …), scaled up for a larger
batch or resolution and never down; failing that, the nearest profile, and the verdict says it may be
low. Free memory is asked of `nvidia-smi` (no torch import here: dermkohya's start-up stays fast); no
NVIDIA GPU, no check.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from dermkohya.errors import DermkohyaError
from dermkohya.records import Record
from dermkohya.spec import RunSpec

TABLE_FILE = "memory_table.json"
HEADROOM = 1.05  # measured peaks are sampled every 0.1 s and vary a little between calls
LORA_FAST = "dermkohya.networks.lora_fast"
SDXL_24GB_RUN = "runs/derm-sdxl-24gb.toml"
Network = Literal["networks.lora", "lora_fast", "lora_fast+graphs", "other"]
NETWORK_RANK: dict[str, int] = {"networks.lora": 0, "lora_fast": 1, "lora_fast+graphs": 2}


class Profile(BaseModel):
    """What decides a run's peak memory, as far as the benchmark varied it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["sd15", "sdxl"]
    resolution: int
    batch_size: int  # per process
    processes: int
    gradient_checkpointing: bool
    network: Network
    network_dim: int
    mixed_precision: Literal["no", "fp16", "bf16"]
    cache_latents: bool
    train_text_encoder: bool
    attention: Literal["efficient", "none"]  # sdpa, xformers and mem_eff_attn vs kohya's plain attention


class Measurement(Profile):
    peak_gib: float
    at_least: bool = False  # the run ran out of memory at this much: a lower bound only
    lora_params: int | None = None  # the trained LoRA's size (its saved file), for other ranks
    source: str  # the bench/results file
    variant: str
    gpu: str


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    generated: str
    gpu: str


class MemoryTable(Record):
    KIND: ClassVar[str] = "memory-table"
    REMEDY: ClassVar[str] = "regenerate it from the benchmark's results: python bench/memory_table.py"

    about: str
    sources: list[Source]
    measurements: list[Measurement]


def load_table(path: Path | None = None) -> MemoryTable:
    """The table shipped in the package (or `path`)."""
    if path is not None:
        return MemoryTable.read(path)
    with resources.as_file(resources.files("dermkohya") / TABLE_FILE) as shipped:
        return MemoryTable.read(shipped)


# --- a run's profile --------------------------------------------------------------------------------

def graphs_off_reason(spec: RunSpec) -> str | None:
    """Why lora_fast runs without CUDA graphs for this run (the rules of its `prepare_network`), or None."""
    args = dict(a.split("=", 1) for a in spec.network.args if "=" in a)
    if args.get("cuda_graph", "auto").lower() == "off":
        return "cuda_graph=off"
    if spec.train.gradient_checkpointing:
        return "gradient checkpointing"
    if spec.train.gradient_accumulation_steps > 1:
        return "gradient accumulation"
    if spec.kohya.get("torch_compile") or spec.kohya.get("deepspeed"):
        return "torch_compile or deepspeed"
    return None


def profile_of(spec: RunSpec) -> Profile:
    module = spec.network.module
    if module == "networks.lora":
        network: Network = "networks.lora"
    elif module == LORA_FAST:
        network = "lora_fast" if graphs_off_reason(spec) else "lora_fast+graphs"
    else:
        network = "other"
    return Profile(family=spec.model.family, resolution=spec.resolution, batch_size=spec.train.batch_size,
                   processes=spec.launch.processes * spec.launch.machines,
                   gradient_checkpointing=spec.train.gradient_checkpointing, network=network,
                   network_dim=spec.network.dim, mixed_precision=spec.train.mixed_precision,
                   cache_latents=spec.train.cache_latents, train_text_encoder=not spec.network.train_unet_only,
                   attention="none" if spec.train.attention == "none" else "efficient")


def describe(profile: Profile) -> str:
    network = {"networks.lora": "networks.lora", "lora_fast": "lora_fast without graphs",
               "lora_fast+graphs": "lora_fast with CUDA graphs", "other": "another network module"}[profile.network]
    parts = [{"sd15": "SD 1.5", "sdxl": "SDXL"}[profile.family], f"{profile.resolution} px", f"batch {profile.batch_size}",
             network, "gradient checkpointing" if profile.gradient_checkpointing else "no gradient checkpointing",
             "fp32" if profile.mixed_precision == "no" else profile.mixed_precision, "cached latents" if profile.cache_latents else "VAE each step"]
    if profile.processes > 1:
        parts.append(f"{profile.processes} processes")
    if profile.attention == "none":
        parts.append("kohya's plain attention")
    return ", ".join(parts)


# --- matching ---------------------------------------------------------------------------------------

# Each ordered key as (name, rank): a higher rank needs at least as much memory, the rest equal.
ORDERED: tuple[tuple[str, Callable[[Profile], int]], ...] = (
    ("gradient checkpointing", lambda p: 0 if p.gradient_checkpointing else 1),
    ("network", lambda p: NETWORK_RANK.get(p.network, -1)),
    ("precision", lambda p: 1 if p.mixed_precision == "no" else 0),
    ("latent cache", lambda p: 0 if p.cache_latents else 1),
    ("text encoder training", lambda p: 1 if p.train_text_encoder else 0),
    ("attention", lambda p: 1 if p.attention == "none" else 0),
    ("processes", lambda p: 1 if p.processes > 1 else 0),
)
# A LoRA parameter in training: fp32 weight and gradient, AdamW's two moments.
BYTES_PER_TRAINED_PARAM = 16


@dataclass(frozen=True)
class Estimate:
    peak_gib: float
    kind: Literal["measured", "upper bound", "at least", "nearest"]
    basis: Measurement
    notes: tuple[str, ...] = ()

    @property
    def required_gib(self) -> float:
        return self.peak_gib * HEADROOM

    def explain(self) -> str:
        where = f"{self.basis.variant} on {self.basis.gpu}, {self.basis.source}"
        head = {"measured": f"{self.basis.peak_gib:.1f} GiB measured for this profile ({where})",
                "upper bound": f"upper bound: {self.basis.peak_gib:.1f} GiB measured for {describe(self.basis)} ({where})",
                "at least": f"at least: ran out of memory at {self.basis.peak_gib:.1f} GiB ({where})",
                "nearest": f"not measured; nearest profile: {describe(self.basis)}, {self.basis.peak_gib:.1f} GiB ({where})"}
        return "; ".join([head[self.kind], *self.notes])


def _below(m: Measurement, run: Profile) -> list[str]:
    """The keys where `m` needs less memory than `run` (or cannot be compared)."""
    below = [name for name, rank in ORDERED if rank(m) < rank(run) or rank(run) < 0]
    if run.network_dim > m.network_dim and not m.lora_params:
        below.append("network dim")
    return below


def _scaled(m: Measurement, run: Profile) -> tuple[float, list[str]]:
    """m's peak scaled up (never down) to the run's batch and pixel count: more than the real growth,
    since the weights do not grow with either; a higher rank adds its LoRA's weights and optimizer state."""
    factor, notes, extra = 1.0, [], 0.0
    if run.network_dim > m.network_dim and m.lora_params:
        extra = m.lora_params * (run.network_dim / m.network_dim - 1) * BYTES_PER_TRAINED_PARAM / 2**30
        notes.append(f"rank {run.network_dim} not measured: +{extra:.1f} GiB for its weights and AdamW state over rank {m.network_dim}")
    if run.batch_size > m.batch_size:
        factor *= run.batch_size / m.batch_size
        notes.append(f"batch {run.batch_size} not measured: scaled ×{run.batch_size / m.batch_size:.2g} from batch {m.batch_size}")
    if run.resolution > m.resolution:
        area = (run.resolution / m.resolution) ** 2
        factor *= area
        notes.append(f"{run.resolution} px not measured: scaled ×{area:.2g} from {m.resolution} px")
    return m.peak_gib * factor + extra, notes


def estimate(run: Profile, table: MemoryTable) -> Estimate | None:
    """The run's peak GPU memory from the table, conservatively; None where its family was never measured."""
    same = [m for m in table.measurements if m.family == run.family]
    bounds = []
    for m in same:
        if not m.at_least and not _below(m, run):
            peak, notes = _scaled(m, run)
            bounds.append(Estimate(peak, "measured" if m.model_dump(include=set(Profile.model_fields)) == run.model_dump()
                                   else "upper bound", m, tuple(notes)))
    if bounds:
        return min(bounds, key=lambda e: (e.peak_gib, e.kind != "measured"))
    floors = [m for m in same if m.at_least and m.model_dump(include=set(Profile.model_fields)) == run.model_dump()]
    if floors:
        return Estimate(max(m.peak_gib for m in floors), "at least", max(floors, key=lambda m: m.peak_gib))
    if not same:
        return None
    def distance(m: Measurement) -> tuple[int, int]:  # fewest keys below the run's, then fewest keys different
        return len(_below(m, run)), sum(rank(m) != rank(run) for _, rank in ORDERED)

    closest = min(distance(m) for m in same)
    nearest = [(m, *_scaled(m, run)) for m in same if distance(m) == closest]
    m, peak, notes = max(nearest, key=lambda n: n[1])
    below = ", ".join(_below(m, run))
    return Estimate(peak, "nearest", m, (*notes, f"no measurement needs as much ({below} below this run's): "
                                                  "the real peak may be higher"))


# --- what to change ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    keys: str  # what to write in the run file
    applies: Callable[[Profile], bool]
    apply: Callable[[Profile], Profile]


def _changes(spec: RunSpec, table: MemoryTable) -> list[Change]:
    """Settings that lower memory, fastest first (what a user gives up least by)."""
    batches = sorted({m.batch_size for m in table.measurements if m.family == spec.model.family})
    lora_args = [a for a in spec.network.args if a.split("=", 1)[0] in ("cuda_graph", "max_graphs")]
    networks_lora = '[network] module = "networks.lora"' + (" and args = []" if lora_args else "")
    changes = [
        Change('[train] attention = "sdpa"', lambda p: p.attention == "none", lambda p: p.model_copy(update={"attention": "efficient"})),
        Change("[train] cache_latents = true", lambda p: not p.cache_latents, lambda p: p.model_copy(update={"cache_latents": True})),
        Change('[train] mixed_precision = "bf16"', lambda p: p.mixed_precision == "no",
               lambda p: p.model_copy(update={"mixed_precision": "bf16"})),
        Change("[train] gradient_checkpointing = true", lambda p: not p.gradient_checkpointing,
               lambda p: p.model_copy(update={"gradient_checkpointing": True,
                                              "network": "lora_fast" if p.network == "lora_fast+graphs" else p.network})),
        Change(networks_lora, lambda p: p.network in ("lora_fast", "lora_fast+graphs"),
               lambda p: p.model_copy(update={"network": "networks.lora"})),
    ]
    if batches and spec.train.batch_size > batches[-1]:
        top = max(b for b in batches if b < spec.train.batch_size)
        changes.append(Change(f"[train] batch_size = {top}", lambda p: p.batch_size > top,
                              lambda p: p.model_copy(update={"batch_size": top})))
    return changes


def smallest_fix(spec: RunSpec, free_gib: float, table: MemoryTable) -> tuple[list[str], Estimate] | None:
    """The fewest run-file changes whose estimate fits `free_gib` (fastest settings first), or None."""
    run = profile_of(spec)
    changes = [c for c in _changes(spec, table) if c.applies(run)]
    for size in range(1, len(changes) + 1):
        for chosen in itertools.combinations(changes, size):
            profile = run
            for change in chosen:
                profile = change.apply(profile)
            found = estimate(profile, table)
            if found is not None and found.kind in ("measured", "upper bound") and found.required_gib <= free_gib:
                return [c.keys for c in chosen], found
    return None


# --- the GPU's free memory --------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    index: str
    uuid: str
    name: str
    free_gib: float
    total_gib: float


QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.free,memory.total", "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """nvidia-smi's CSV (MiB) as GPUs; a line it could not measure ("[N/A]") is left out."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 5:
            continue
        try:
            free, total = float(cells[3]), float(cells[4])
        except ValueError:
            continue
        gpus.append(Gpu(cells[0], cells[1], cells[2], free / 1024, total / 1024))
    return gpus


def selected(gpus: list[Gpu], selectors: list[str]) -> list[Gpu] | str:
    """The GPUs the run will use, or why they cannot be told (a MIG instance, an id nvidia-smi did not list)."""
    found = []
    for selector in selectors:
        if selector.startswith("MIG-"):
            return f"CUDA_VISIBLE_DEVICES names a MIG instance ({selector}), whose free memory nvidia-smi does not give"
        match = next((g for g in gpus if selector in (g.index, g.uuid)), None)
        if match is None:
            return f"GPU {selector} is not in nvidia-smi's list"
        found.append(match)
    return found


def gpu_selectors(spec: RunSpec, gpu_ids: str | None, env: dict[str, str]) -> list[str]:
    """Which GPUs this machine's processes use: --gpus or [launch] gpu_ids (accelerate sets
    CUDA_VISIBLE_DEVICES to them), else CUDA_VISIBLE_DEVICES, else the first ones."""
    processes = spec.launch.processes
    ids = gpu_ids or spec.launch.gpu_ids
    if ids and ids != "all":
        return ids.split(",")[:processes]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"][:processes]
    return [str(i) for i in range(processes)]


def query_gpus(timeout: float = 10.0) -> list[Gpu] | str:
    """Every NVIDIA GPU's free memory, or why there is no answer."""
    if shutil.which(QUERY[0]) is None:
        return "no NVIDIA GPU here (nvidia-smi is not on PATH)"
    try:
        out = subprocess.run(QUERY, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi did not answer ({exc})"
    if out.returncode != 0:
        return f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[-200:]}"
    return parse_nvidia_smi(out.stdout) or "nvidia-smi listed no GPU"


# --- the check --------------------------------------------------------------------------------------

# [kohya] pass-through options that cannot change the peak: highvram only skips kohya's gc.collect() and CUDA cache
# release between latent batches (the allocator reuses the same blocks; kohya releases them once caching ends)
MEMORY_NEUTRAL_KOHYA_OPTIONS = frozenset({"highvram"})


@dataclass
class Verdict:
    fits: bool | None  # None: not checked, or no measurement covers the run (`line` says which)
    line: str
    warning: bool = False  # worth showing without --verbose: the nearest measurement does not fit
    notes: list[str] = field(default_factory=list)


def verdict(spec: RunSpec, run_file: Path | str, gpus: list[Gpu], table: MemoryTable) -> Verdict:
    """Fit or not, against the given GPUs' free memory: a pure function of its arguments."""
    run = profile_of(spec)
    found = estimate(run, table)
    outside = sorted(set(spec.kohya) - MEMORY_NEUTRAL_KOHYA_OPTIONS)
    notes = [f"[kohya] options ({', '.join(outside)}) are not part of the estimate"] if outside else []
    if run.network == "lora_fast+graphs" and spec.dataset.enable_bucket:
        notes.append("measured with one image shape: with bucketing, every shape lora_fast captures (max_graphs) "
                     "keeps its own activations")
    if found is None:
        return Verdict(None, f"memory: not checked: no {run.family} run was measured (bench/memory_table.py)", notes=notes)
    tightest = min(gpus, key=lambda g: g.free_gib)
    need = found.required_gib
    gpu = f"GPU {tightest.index} ({tightest.name}) has {tightest.free_gib:.1f} of {tightest.total_gib:.1f} GiB free"
    basis = f"{found.explain()}; +{HEADROOM - 1:.0%} headroom"
    if need <= tightest.free_gib:
        vouch = "fits" if found.kind in ("measured", "upper bound") else f"may fit (the estimate is {found.kind})"
        return Verdict(True, f"memory: {describe(run)} needs ≈{need:.1f} GiB ({basis}); {gpu}: {vouch}", notes=notes)
    if found.kind == "nearest":  # no measurement covers the run: a warning, never a refusal
        return Verdict(None, f"{run_file}: may not fit: needs ≈{need:.1f} GiB of GPU memory, {gpu} ({basis})",
                       warning=True, notes=notes)
    fix = smallest_fix(spec, tightest.free_gib, table)
    if fix is None:
        advice = ("no measured setting fits: lower [train] batch_size or resolution (smaller ones were not measured, "
                  "so this check cannot vouch for them) or use a GPU with more free memory")
    else:
        keys, fixed = fix
        advice = f"set {' and '.join(keys)} (≈{fixed.required_gib:.1f} GiB)"
        if run.family == "sdxl" and "[train] gradient_checkpointing = true" in keys:
            advice += f" — {SDXL_24GB_RUN} is the SDXL run with the memory-saver settings"
    return Verdict(False, f"{run_file}: needs ≈{need:.1f} GiB of GPU memory, {gpu}: {advice}; "
                          f"or pass --skip-memory-check if you know better ({basis})", notes=notes)


def check_before_launch(spec: RunSpec, run_file: Path | str, *, gpu_ids: str | None = None,
                        env: dict[str, str] | None = None, table: MemoryTable | None = None) -> Verdict:
    """The check `train` runs before the launch: raises when the run will not fit, else says what it found."""
    answer = query_gpus()
    if isinstance(answer, str):
        return Verdict(None, f"memory: not checked: {answer}")
    gpus = selected(answer, gpu_selectors(spec, gpu_ids, dict(os.environ) if env is None else env))
    if isinstance(gpus, str):
        return Verdict(None, f"memory: not checked: {gpus}")
    if not gpus:
        return Verdict(None, "memory: not checked: CUDA_VISIBLE_DEVICES hides every GPU")
    result = verdict(spec, run_file, gpus, table or load_table())
    if result.fits is False:
        raise DermkohyaError(result.line)
    return result
