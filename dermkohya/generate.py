"""Balanced synthetic generation with kohya LoRAs: a plan file → `synthetic/<plan>/<diagnosis>/<fst>/<n>.png`.

Why it is built this way:
- Image n has its own seed, derived from (plan seed, n, attempt), and every batch is padded to the plan's
  batch size, so an image's pixels depend on its seed and prompt alone — not on its batch-mates — and are
  the same on 1 or N processes, after a resume, or regenerated alone (`render_one`).
- A finished file is never rewritten. Candidates are written to `.staging/` (atomic renames) and moved
  into place only after the near-duplicate check, which walks each diagnosis × skin-type cell in index
  order so that its decisions never depend on which process finished first.
- Rejections are recorded, not silent: the rejected image goes to `rejected/`, the reason into the
  accepted image's PNG text chunk, `index.csv` and `summary.json`.
- A rerun skips finished images. Everything that changes pixels is fingerprinted into `plan.json`; a
  changed plan is refused rather than mixed into the same folder.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermkohya import __version__, basemodel, locks, metrics, skin
from dermkohya.basemodel import ResolvedBase
from dermkohya.templating import text_template
from dermkohya.schema import load_toml_model
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.files import write_atomic
from dermkohya.spec import DEFAULT_CAPTION_TEMPLATE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SCHEDULERS = ("dpmpp_2m", "ddim", "euler", "pndm")
SCHEDULER_LABELS = {"dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "pndm": "PNDM"}
INDEX_COLUMNS = (
    "path", "n", "diagnosis", "fst", "prompt", "negative_prompt", "seed", "attempt", "rejected_attempts",
    "scheduler", "steps", "guidance", "width", "height", "loras", "lora_sha256", "base_model", "precision",
)  # fmt: skip
STAGING = ".staging"
REJECTED = "rejected"


# --- the plan file -----------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    base: str = Field(
        description="a local SD 1.5/SDXL .safetensors (or .ckpt) checkpoint, e.g. the file a run trained on, "
        "a diffusers folder, or random:sd15 / random:sdxl for the offline smoke model"
    )


class LoraEntry(_Section):
    path: str = Field(description="a kohya LoRA .safetensors, e.g. artifacts/<run>/<run>.safetensors")
    weight: float = Field(default=1.0, ge=-4, le=4)


def _shares(value: Any, what: str, parse: Callable[[str], str | None]) -> dict[str, float]:
    """"equal" / a list (equal shares) / a table of shares (any positive numbers, e.g. percentages)."""
    if value == "equal" and what == "skin type":
        value = list(skin.FST_TYPES)
    if isinstance(value, list):
        value = {str(v): 1.0 for v in value}
    if not isinstance(value, dict) or not value:
        raise ValueError(f'give "equal", a list of {what}s, or a table of {what} = share')
    out: dict[str, float] = {}
    for key, share in value.items():
        name = parse(str(key))
        if name is None:
            raise ValueError(f"unknown {what} {key!r}")
        if not isinstance(share, (int, float)) or isinstance(share, bool) or share <= 0:
            raise ValueError(f"share of {what} {key!r} must be a positive number, got {share!r}")
        if name in out:
            raise ValueError(f"{what} {name!r} is listed twice")
        out[name] = float(share)
    return out


def _parse_fst(value: str) -> str | None:
    fst = skin.parse_fst(value)
    return fst if fst in skin.FST_TYPES or fst in skin.FST_GROUPS else None


def slug(text: str) -> str:
    """The folder name of a diagnosis: lower case, runs of anything but letters and digits → '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class ClassesSection(_Section):
    diagnoses: dict[str, float]
    skin_types: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(skin.FST_TYPES, 1.0))
    count: int = Field(ge=1)

    @field_validator("diagnoses", mode="before")
    @classmethod
    def _diagnoses(cls, value: Any) -> dict[str, float]:
        shares = _shares(value, "diagnosis", lambda d: d.strip() or None)
        slugs = Counter(slug(d) for d in shares)
        if clash := [d for d in shares if not slug(d) or slugs[slug(d)] > 1]:
            raise ValueError(f"diagnoses {clash} need distinct folder names (letters or digits that differ)")
        return shares

    @field_validator("skin_types", mode="before")
    @classmethod
    def _skin_types(cls, value: Any) -> dict[str, float]:
        return _shares(value, "skin type", _parse_fst)


class PromptSection(_Section):
    template: str = DEFAULT_CAPTION_TEMPLATE
    negative: str = ""
    vars: dict[str, str] = Field(default_factory=dict)


class SamplerSection(_Section):
    scheduler: Literal["dpmpp_2m", "ddim", "euler", "pndm"] = "dpmpp_2m"
    karras: bool = False
    steps: int = Field(default=30, ge=1, le=1000)
    guidance: float = Field(default=7.5, ge=0)
    width: int = Field(default=512, ge=8, multiple_of=8)
    height: int = Field(default=512, ge=8, multiple_of=8)
    seed: int = Field(default=0, ge=0)


class EngineSection(_Section):
    batch_size: int = Field(default=8, ge=1, le=512)
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    compile: bool = False
    channels_last: bool = True
    fuse_qkv: bool = True


class FilterSection(_Section):
    enabled: bool = True
    min_std: float = Field(default=0.02, ge=0, le=1)
    max_clipped: float = Field(default=0.5, gt=0, le=1)
    duplicate_bits: int = Field(default=6, ge=0, le=64)
    max_attempts: int = Field(default=10, ge=1)
    classifier: str | None = None
    classifier_labels: list[str] | None = None
    classifier_size: int = Field(default=224, ge=8)
    min_confidence: float = Field(default=0.5, ge=0, le=1)


class Plan(_Section):
    name: str | None = Field(default=None, pattern=NAME_RE.pattern)
    description: str = ""
    model: ModelSection
    lora: list[LoraEntry] = Field(default_factory=list)
    classes: ClassesSection
    prompt: PromptSection = PromptSection()
    sampler: SamplerSection = SamplerSection()
    engine: EngineSection = EngineSection()
    filter: FilterSection = FilterSection()

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        import jinja2

        try:
            template = text_template(self.prompt.template)
            template.render(diagnosis="x", fst="I", **self.prompt.vars)
        except jinja2.TemplateError as exc:
            raise ValueError(f"[prompt] template: {exc} (variables: diagnosis, fst, and [prompt.vars])") from None
        labels = self.filter.classifier_labels
        if self.filter.classifier and labels is not None:
            if missing := [d for d in self.classes.diagnoses if d not in labels]:
                raise ValueError(f"[filter] classifier_labels lacks the diagnoses {missing}")
        return self


def load_plan(path: Path) -> tuple[Plan, str]:
    """Parse and validate a plan file, reporting every problem at once; returns it and its name."""
    plan = load_toml_model(path, Plan, what="plan file", example="plans/demo.toml")
    name = plan.name or path.stem
    if not NAME_RE.match(name):
        raise DermkohyaError(f"{path}: plan name {name!r} must be letters, digits, '.', '_' or '-': set `name`")
    return plan, name


# --- what to make ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One image slot of the plan: its index, class and prompt, and where its file goes."""

    n: int
    diagnosis: str
    fst: str
    prompt: str
    path: str


def quotas(plan: Plan) -> dict[tuple[str, str], int]:
    """Images per (diagnosis, skin type): shares multiplied out and rounded by largest remainder
    (exact fractions, ties to the earlier cell), so the total is exactly `count`."""
    diag = {d: Fraction(s).limit_denominator(10**6) for d, s in plan.classes.diagnoses.items()}
    fst = {f: Fraction(s).limit_denominator(10**6) for f, s in plan.classes.skin_types.items()}
    total = sum(diag.values()) * sum(fst.values())
    raw = {(d, f): plan.classes.count * ds * fs / total for d, ds in diag.items() for f, fs in fst.items()}
    floor = {cell: math.floor(value) for cell, value in raw.items()}
    left = plan.classes.count - sum(floor.values())
    order = sorted(raw, key=lambda cell: (-(raw[cell] - floor[cell]), list(raw).index(cell)))
    for cell in order[:left]:
        floor[cell] += 1
    return floor


def allocate(plan: Plan) -> list[Item]:
    """Every image of the plan in index order: cells in plan order (diagnosis, then skin type)."""

    template = text_template(plan.prompt.template)
    width = max(6, len(str(plan.classes.count - 1)))
    items: list[Item] = []
    for (diagnosis, fst), quota in quotas(plan).items():
        prompt = template.render(diagnosis=diagnosis, fst=fst, **plan.prompt.vars)
        for _ in range(quota):
            n = len(items)
            items.append(Item(n, diagnosis, fst, prompt, f"{slug(diagnosis)}/{fst}/{n:0{width}d}.png"))
    return items


def image_seed(plan_seed: int, n: int, attempt: int = 0) -> int:
    """Image n's seed for a given attempt: a hash, so plans with neighbouring seeds share no images."""
    digest = hashlib.sha256(f"dermkohya-image:{plan_seed}:{n}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# --- resolving the plan into a job -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraInfo:
    path: str
    sha256: str
    weight: float
    modules: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated plan with its files found and hashed: what every process needs to generate."""

    plan: Plan
    name: str
    out: Path
    base: ResolvedBase
    config_dir: Path | None  # the weightless pipeline config a single-file base is loaded with
    base_sha256: str
    loras: tuple[LoraInfo, ...]
    items: tuple[Item, ...]
    warnings: tuple[str, ...] = ()

    @property
    def model_dir(self) -> Path:
        """The base on disk: a diffusers folder or a single checkpoint file."""
        return self.base.path

    @property
    def staging(self) -> Path:
        return self.out / STAGING

    def cells(self) -> Iterator[list[Item]]:
        cell: list[Item] = []
        for item in self.items:
            if cell and (cell[0].diagnosis, cell[0].fst) != (item.diagnosis, item.fst):
                yield cell
                cell = []
            cell.append(item)
        if cell:
            yield cell


_KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def kohya_modules(path: Path) -> dict[str, int]:
    """LoRA modules per pipeline component, counted from a kohya .safetensors' tensor names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise DermkohyaError(f"{path}: not a readable .safetensors file ({exc}); re-export or re-collect it") from None
    counts: Counter[str] = Counter()
    for key in keys:
        if key.endswith(".lora_down.weight"):
            prefix = next((p for p in sorted(_KOHYA_COMPONENTS, key=len, reverse=True) if key.startswith(p)), None)
            if prefix:
                counts[_KOHYA_COMPONENTS[prefix]] += 1
    if not counts:
        raise DermkohyaError(
            f"{path}: not a kohya LoRA (no lora_unet_*/lora_te_* .lora_down.weight tensors); "
            "use the .safetensors that kohya's train_network.py wrote (dermkohya collect files it in artifacts/)"
        )
    return dict(counts)


def project_root() -> Path:
    """Where a plan's relative paths, `synthetic/` and `models/` are: the folder generate runs in."""
    return Path.cwd()


def load_base(spec: str, root: Path | None = None) -> tuple[ResolvedBase, Path | None]:
    """The plan's base through the one resolver train uses, made loadable offline: `random:*` builds
    (once) the project's smoke model in models/smoke/, the same one train uses; a single file gets the
    weightless pipeline config (models/configs/) diffusers loads it with, so nothing comes from the hub."""
    root = root or project_root()
    base = basemodel.resolve_base(spec, root)
    if base.smoke:
        basemodel.ensure_smoke_model(str(base.family), seed=basemodel.SMOKE_SEED, cache_root=basemodel.models_dir(root))
    if not base.single_file:
        return base, None
    if base.family not in basemodel.SUPPORTED_FAMILIES:
        found = basemodel.FAMILY_LABELS.get(str(base.family), "of unknown family (its keys could not be read)")
        raise DermkohyaError(
            f"{base.path}: an {found} checkpoint; generation loads SD 1.5 and SDXL checkpoints: "
            "set [model] base to one of those, or to its diffusers folder"
        )
    return base, basemodel.ensure_pipeline_config(base.family, basemodel.models_dir(root))


def resolve_base(spec: str, root: Path | None = None) -> Path:
    """The plan's base on disk (a diffusers folder or a checkpoint file), built first for `random:*`."""
    return load_base(spec, root)[0].path


def fingerprint(plan: Plan, base_sha256: str, loras: tuple[LoraInfo, ...]) -> dict[str, Any]:
    """Everything that changes an image's pixels (batch size, compile and processes do not)."""
    return {
        "base": {"spec": plan.model.base, "sha256": base_sha256},
        "loras": [{"sha256": lora.sha256, "weight": lora.weight} for lora in loras],
        "classes": plan.classes.model_dump(),
        "prompt": plan.prompt.model_dump(),
        "sampler": plan.sampler.model_dump(),
        "precision": plan.engine.precision,
        "filter": plan.filter.model_dump(),
    }


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out |= _flat(inner, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): value}


def prepare_job(plan_path: Path, out: Path | None = None, *, write: bool = True) -> Job:
    """Validate the plan, find and hash the base and LoRAs, allocate the images, and check `plan.json` in
    the output folder (or, with `write`, create it). Every problem a user can fix is found here, before
    any model loads."""
    from dermkohya import basemodel

    plan, name = load_plan(plan_path)
    problems = []
    for i, entry in enumerate(plan.lora, 1):
        if not Path(entry.path).is_file():
            problems.append(
                f"[[lora]] #{i} path: {entry.path} not found; run `dermkohya collect RUN` or point it at a kohya .safetensors"
            )
    if plan.filter.classifier and not Path(plan.filter.classifier).is_file():
        problems.append(f"[filter] classifier: {plan.filter.classifier} not found; point it at a TorchScript file")
    if not problems and plan.lora:  # a LoRA of the other family fails deep inside diffusers: say so before any model loads
        from dermkohya import lora as lora_files

        family = basemodel.resolve_base(plan.model.base, project_root()).family
        for i, entry in enumerate(plan.lora, 1):
            found = lora_files.describe(Path(entry.path)).family
            if family in basemodel.SUPPORTED_FAMILIES and found is not None and found != family:
                problems.append(f"[[lora]] #{i} path: {entry.path} is an {found} LoRA but [model] base {plan.model.base} is "
                                f"{family}: use a LoRA trained on an {family} base, or an {found} base")
    if problems:
        raise ProblemsError(str(plan_path), problems)
    base, config_dir = load_base(plan.model.base)
    loras = tuple(
        LoraInfo(entry.path, basemodel.sha256_path(Path(entry.path)), entry.weight, kohya_modules(Path(entry.path)))
        for entry in plan.lora
    )
    out = Path(out) if out is not None else Path("synthetic") / name
    warnings = (base.warning,) if base.warning else ()
    job = Job(plan, name, out, base, config_dir, basemodel.sha256_path(base.path), loras, tuple(allocate(plan)), warnings)
    _check_or_write_plan_json(job, plan_path, write)
    return job


def _check_or_write_plan_json(job: Job, plan_path: Path, write: bool) -> None:
    current = fingerprint(job.plan, job.base_sha256, job.loras)
    record = job.out / "plan.json"
    if record.is_file():
        stored = json.loads(record.read_text(encoding="utf-8")).get("fingerprint", {})
        old, new = _flat(stored), _flat(json.loads(json.dumps(current)))
        changed = [f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        if changed:
            raise DermkohyaError(
                f"{job.out}: was generated from a different plan (changed: {'; '.join(changed[:6])}); "
                "give the plan a new `name`, or move that folder away — finished images are never rewritten"
            )
        return
    if not write:
        return
    if job.out.exists() and any(p.name != STAGING for p in job.out.iterdir()):
        raise DermkohyaError(f"{job.out}: exists and holds files dermkohya did not write (no plan.json); choose another output folder")
    job.out.mkdir(parents=True, exist_ok=True)
    body = {
        "name": job.name,
        "plan_file": str(plan_path),
        "plan": job.plan.model_dump(),
        "model_dir": str(job.model_dir),
        "config_dir": str(job.config_dir) if job.config_dir else None,
        "loras": [dataclasses.asdict(lora) for lora in job.loras],
        "count": len(job.items),
        "quotas": [{"diagnosis": d, "fst": f, "count": q} for (d, f), q in quotas(job.plan).items()],
        "dermkohya_version": __version__,
        "fingerprint": current,
    }
    write_atomic(record, json.dumps(body, indent=2) + "\n")


# --- small file helpers ------------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray, record: dict[str, Any]) -> bytes:
    """PNG with the prompt and seed as text chunks: `parameters` (the A1111 line other tools read) and
    `dermkohya` (the full record, JSON)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    loras = ", ".join(f"{Path(lora['path']).name}: {lora['sha256'][:12]} @ {lora['weight']}" for lora in record["loras"])
    params = (
        f"{record['prompt']}\nNegative prompt: {record['negative_prompt']}\n"
        f"Steps: {record['steps']}, Sampler: {SCHEDULER_LABELS[record['scheduler']]}, CFG scale: {record['guidance']}, "
        f"Seed: {record['seed']}, Size: {record['width']}x{record['height']}" + (f", Lora: {loras}" if loras else "")
    )
    info.add_text("parameters", params)
    info.add_text("prompt", record["prompt"])
    info.add_text("seed", str(record["seed"]))
    info.add_text("dermkohya", json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_record(png: Path) -> dict[str, Any]:
    """The `dermkohya` text chunk of a generated image."""
    from PIL import Image

    with Image.open(png) as im:
        return json.loads(im.text["dermkohya"])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- the engine --------------------------------------------------------------------------------------------


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


class Engine:
    """The diffusers pipeline as the plan asks for it: base + fused LoRAs, scheduler, precision; on CUDA
    also channels-last, fused QKV projections (SDPA attention either way) and optionally torch.compile."""

    def __init__(self, job: Job, device: str = "cpu") -> None:
        import torch
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.job, self.device = job, device
        plan = job.plan
        self.dtype = _dtype(plan.engine.precision, device)
        pipe = load_pipeline(job, self.dtype)
        pipe.scheduler = make_scheduler(plan.sampler.scheduler, pipe.scheduler.config, plan.sampler.karras)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        load_loras(pipe, job.loras)
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            if plan.engine.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
                pipe.fuse_qkv_projections()
            if plan.engine.channels_last:
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            if plan.engine.compile:
                pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        self.pipe = pipe
        self.classifier = None
        if plan.filter.classifier:
            labels = plan.filter.classifier_labels or list(plan.classes.diagnoses)
            self.classifier = Classifier(Path(plan.filter.classifier), labels, plan.filter.classifier_size, device)

    def __call__(self, slots: list[tuple[str, int] | None]) -> tuple[np.ndarray, np.ndarray]:
        """Generate one batch of (prompt, seed) slots; uint8 (B, H, W, 3) images and a NaN flag per slot.
        A batch always has the plan's batch size (empty slots are filled with a copy of a used one) and
        image n always sits in slot n % batch size: the same shapes and position give the same pixels."""
        import torch

        plan = self.job.plan
        if len(slots) != plan.engine.batch_size:
            raise ValueError(f"a batch has {plan.engine.batch_size} slots, got {len(slots)}")
        filler = next(slot for slot in slots if slot is not None)
        prompts, seeds = zip(*(slot or filler for slot in slots))
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with torch.inference_mode():
            images = self.pipe(
                prompt=list(prompts),
                negative_prompt=[plan.prompt.negative] * len(slots),
                generator=generators,
                num_inference_steps=plan.sampler.steps,
                guidance_scale=plan.sampler.guidance,
                width=plan.sampler.width,
                height=plan.sampler.height,
                output_type="pt",
            ).images
            nan = torch.isnan(images).flatten(1).any(dim=1)
            pixels = (images.float().nan_to_num(0.0) * 255).round().clamp(0, 255).to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).cpu().numpy(), nan.cpu().numpy()


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
    images, _ = Engine(job, device or _device(0))(slots)
    return images[n % size]


# --- one process's share -----------------------------------------------------------------------------------


class _Writers:
    """Background PNG writers; an item always goes to the same single-thread worker, so its files are
    written in order. Waits when too much is in flight, so memory stays bounded."""

    def __init__(self, workers: int, max_pending: int) -> None:
        self.pools = [ThreadPoolExecutor(max_workers=1) for _ in range(max(1, workers))]
        self.pending: list[Future[None]] = []
        self.max_pending = max_pending

    def submit(self, n: int, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pools[n % len(self.pools)].submit(fn, *args))
        while len(self.pending) > self.max_pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        for future in self.pending:
            future.result()
        for pool in self.pools:
            pool.shutdown()


def _record(job: Job, item: Item, attempt: int, seed: int, phash: int, rejected: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    plan = job.plan
    return {
        "plan": job.name,
        "n": item.n,
        "diagnosis": item.diagnosis,
        "fst": item.fst,
        "prompt": item.prompt,
        "negative_prompt": plan.prompt.negative,
        "seed": seed,
        "attempt": attempt,
        "rejected": rejected,
        "phash": f"{phash:016x}",
        "scheduler": plan.sampler.scheduler,
        "karras": plan.sampler.karras,
        "steps": plan.sampler.steps,
        "guidance": plan.sampler.guidance,
        "width": plan.sampler.width,
        "height": plan.sampler.height,
        "loras": [{"path": lora.path, "sha256": lora.sha256, "weight": lora.weight} for lora in job.loras],
        "base_model": plan.model.base,
        "base_sha256": job.base_sha256,
        "precision": precision,
        "batch_size": plan.engine.batch_size,
        "compile": plan.engine.compile,
        "dermkohya_version": __version__,
    }


def _write_candidate(staging: Path, n: int, attempt: int, png: bytes, side: dict[str, Any]) -> None:
    write_atomic(staging / f"{n}-{attempt}.png", png)
    write_atomic(staging / f"{n}.json", json.dumps(side))


def _write_rejection(out: Path, n: int, attempt: int, png: bytes, side: dict[str, Any]) -> None:
    write_atomic(out / REJECTED / f"{n}-{attempt}.png", png)
    write_atomic(out / STAGING / f"{n}.json", json.dumps(side))


def _owner(n: int, batch_size: int, world: int) -> int:
    """Which process makes image n: whole batches of the index order, dealt round-robin."""
    return (n // batch_size) % world


def _too_many(job: Job, item: Item, rejected: list[dict[str, Any]]) -> DermkohyaError:
    reasons = Counter(r for entry in rejected for r in entry["reasons"])
    return DermkohyaError(
        f"{job.out}: image {item.n} ({item.diagnosis}, FST {item.fst}) was rejected {len(rejected)} times "
        f"({', '.join(f'{k} ×{v}' for k, v in reasons.items())}); the model does not make usable images for this "
        "cell: check the LoRA and base, or relax [filter] (min_std, max_clipped, duplicate_bits) or raise max_attempts"
    )


@dataclasses.dataclass
class _Progress:
    """What one process reports: images accepted by the per-image checks this run, and timings."""

    made: int = 0
    rejected: int = 0
    batches: int = 0
    first_batch_end: float | None = None
    made_at_first_batch: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    load_s: float = 0.0


def _produce(
    job: Job, engine: Engine, rank: int, world: int, progress: _Progress, limit: int | None, report: Callable[[], None]
) -> bool:
    """Make a candidate that passes the per-image checks for every image this process owns that has
    none yet. Returns False when `limit` stopped it early."""
    plan = job.plan
    staging = job.staging
    precision = str(engine.dtype).removeprefix("torch.")
    size = plan.engine.batch_size
    slots: list[deque[tuple[Item, int]]] = [deque() for _ in range(size)]
    sides: dict[int, dict[str, Any]] = {}
    for item in job.items:
        if _owner(item.n, size, world) != rank or (job.out / item.path).exists():
            continue
        side = _read_json(staging / f"{item.n}.json") or {"rejected": [], "candidate": None}
        cand = side.get("candidate")
        if cand and (staging / f"{item.n}-{cand['attempt']}.png").is_file():
            continue
        side["candidate"] = None
        sides[item.n] = side
        slots[item.n % size].append((item, len(side["rejected"])))
    writers = _Writers(min(4, max(1, (os.cpu_count() or 1) // world)), max_pending=2 * size)
    try:
        while any(slots):
            if limit is not None and progress.made >= limit:
                return False
            batch = [queue.popleft() if queue else None for queue in slots]
            seeds = [image_seed(plan.sampler.seed, entry[0].n, entry[1]) if entry else 0 for entry in batch]
            images, nans = engine([(entry[0].prompt, seed) if entry else None for entry, seed in zip(batch, seeds)])
            for entry, seed, image, nan in zip(batch, seeds, images, nans):
                if entry is None:
                    continue
                item, attempt = entry
                side = sides[item.n]
                reasons = ["nan"] if nan and plan.filter.enabled else []
                if plan.filter.enabled and not nan:
                    reasons = metrics.image_problems(image, min_std=plan.filter.min_std, max_clipped=plan.filter.max_clipped)
                    if not reasons and engine.classifier is not None:
                        if engine.classifier.confidence(image, item.diagnosis) < plan.filter.min_confidence:
                            reasons.append("low-confidence")
                phash = metrics.phash(image)
                record = _record(job, item, attempt, seed, phash, list(side["rejected"]), precision)
                if reasons:
                    side["rejected"].append({"attempt": attempt, "seed": seed, "reasons": reasons})
                    record["rejected_for"] = reasons
                    writers.submit(item.n, _write_rejection, job.out, item.n, attempt, _png_bytes(image, record), json.loads(json.dumps(side)))
                    progress.rejected += 1
                    if attempt + 1 >= plan.filter.max_attempts:
                        raise _too_many(job, item, side["rejected"])
                    slots[item.n % size].append((item, attempt + 1))
                else:
                    side["candidate"] = {"attempt": attempt, "seed": seed, "phash": f"{phash:016x}"}
                    writers.submit(item.n, _write_candidate, staging, item.n, attempt, _png_bytes(image, record), json.loads(json.dumps(side)))
                    progress.made += 1
            progress.batches += 1
            if progress.first_batch_end is None:
                progress.first_batch_end = time.perf_counter()
                progress.made_at_first_batch = progress.made
            report()
    finally:
        writers.close()
    return True


def _finalize(job: Job, cache: dict[int, dict[str, Any]]) -> int:
    """Rank 0, between rounds: walk each cell in index order; a candidate within `duplicate_bits` of an
    earlier accepted image of its cell is rejected (it gets the next seed next round), the others are
    moved into place once every earlier image of the cell is settled. Returns the number finished."""
    plan = job.plan
    staging = job.staging
    bits = plan.filter.duplicate_bits if plan.filter.enabled else 0
    for cell in job.cells():
        accepted: list[tuple[int, int]] = []
        blocked = False
        for item in cell:
            final = job.out / item.path
            side_path = staging / f"{item.n}.json"
            if final.exists():
                record = cache.get(item.n) or read_record(final)
                cache[item.n] = record
                accepted.append((item.n, int(record["phash"], 16)))
                if side_path.exists():
                    _drop_staged(staging, item.n)
                continue
            side = _read_json(side_path)
            cand = side.get("candidate") if side else None
            if cand is None or not (staging / f"{item.n}-{cand['attempt']}.png").is_file():
                blocked = True
                continue
            phash = int(cand["phash"], 16)
            near = [(metrics.hamming(phash, h), m) for m, h in accepted if metrics.hamming(phash, h) <= bits] if bits else []
            if near:
                distance, twin = min(near)
                side["rejected"].append(
                    {"attempt": cand["attempt"], "seed": cand["seed"], "reasons": ["duplicate"], "duplicate_of": twin, "distance": distance}
                )
                side["candidate"] = None
                os.replace(staging / f"{item.n}-{cand['attempt']}.png", job.out / REJECTED / f"{item.n}-{cand['attempt']}.png")
                write_atomic(side_path, json.dumps(side))
                if len(side["rejected"]) >= plan.filter.max_attempts:
                    raise _too_many(job, item, side["rejected"])
                blocked = True
                continue
            if blocked:
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f"{item.n}-{cand['attempt']}.png", final)
            cache[item.n] = read_record(final)
            accepted.append((item.n, phash))
            _drop_staged(staging, item.n)
    write_index(job, cache)
    return len(cache)


def _drop_staged(staging: Path, n: int) -> None:
    for leftover in staging.glob(f"{n}-*.png"):
        leftover.unlink(missing_ok=True)
    (staging / f"{n}.json").unlink(missing_ok=True)


def write_index(job: Job, cache: dict[int, dict[str, Any]]) -> Path:
    """index.csv from the finished images' own records (so it always matches the files), index order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for item in job.items:
        record = cache.get(item.n)
        if record is None:
            continue
        writer.writerow(
            {
                **{k: record[k] for k in ("n", "diagnosis", "fst", "prompt", "negative_prompt", "seed", "attempt")},
                **{k: record[k] for k in ("scheduler", "steps", "guidance", "width", "height", "base_model", "precision")},
                "path": item.path,
                "rejected_attempts": len(record["rejected"]),
                "loras": ";".join(f"{Path(lora['path']).name}@{lora['weight']}" for lora in record["loras"]),
                "lora_sha256": ";".join(lora["sha256"] for lora in record["loras"]),
            }
        )
    path = job.out / "index.csv"
    write_atomic(path, buffer.getvalue())
    return path


# --- running it --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """What a run did, for the CLI and the benchmark."""

    out: Path
    planned: int
    finished: int
    made: int
    rejected: dict[str, int]
    rejected_by_cell: dict[str, int]
    processes: int
    device: str
    wall_s: float
    load_s: float
    images_per_s: float | None
    steady_images_per_s: float | None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.finished == self.planned


def _device(rank: int) -> str:
    import torch

    return f"cuda:{rank}" if torch.cuda.is_available() else "cpu"


class _Dist:
    """Barriers and a shared stop flag over torch.distributed (gloo); no-ops for one process."""

    def __init__(self, rank: int, world: int, init_file: Path | None) -> None:
        self.rank, self.world = rank, world
        if world > 1:
            import datetime

            import torch.distributed as dist

            dist.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(hours=24)
            )

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_rank(job: Job, rank: int, world: int, init_file: Path | None, limit: int | None, show_progress: bool) -> None:
    """One process: load the engine, then rounds of (make candidates → rank 0 settles duplicates) until
    every image is finished or `limit` images were made. Writes its timings for the parent. (On a CPU
    every process keeps torch's full thread count: fewer threads would change the pixels' rounding.)"""
    dist = _Dist(rank, world, init_file)
    try:
        progress = _Progress()
        engine = Engine(job, _device(rank))
        progress.load_s = time.perf_counter() - progress.start
        cache: dict[int, dict[str, Any]] = {}
        with _ProgressBar(job, rank, world, progress, show_progress and rank == 0) as bar:
            while True:
                per_rank = None if limit is None else -(-limit // world)
                finished_early = not _produce(job, engine, rank, world, progress, per_rank, bar.update)
                stop = dist.any(finished_early)
                dist.barrier()
                if rank == 0:
                    done = _finalize(job, cache)
                    bar.update()
                    write_atomic(job.staging / "round.json", json.dumps({"finished": done}))
                dist.barrier()
                done = (_read_json(job.staging / "round.json") or {}).get("finished", 0)
                if stop or done == len(job.items):
                    break
        end = time.perf_counter()
        timing = dataclasses.asdict(progress) | {"end": end, "device": engine.device}
        write_atomic(job.staging / f"timing-{rank}.json", json.dumps(timing))
    finally:
        dist.close()


class _ProgressBar:
    """One rich progress bar over all processes (shown by rank 0): finished + staged images, images/s,
    rejections, ETA. The other ranks publish their counts in tiny files that rank 0 adds up."""

    def __init__(self, job: Job, rank: int, world: int, progress: _Progress, enabled: bool) -> None:
        self.job, self.rank, self.world, self.progress, self.enabled = job, rank, world, progress, enabled
        self.bar: Any = None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"), TextColumn("rejected {task.fields[rejected]}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self.bar.start()
            staged = sum(1 for _ in self.job.staging.glob("*-*.png"))
            self.base = staged + sum(1 for item in self.job.items if (self.job.out / item.path).exists())
            self.task = self.bar.add_task(f"generating {self.job.name}", total=len(self.job.items), completed=self.base, rate="–", rejected=0)
        return self

    def update(self) -> None:
        p = self.progress
        if self.rank > 0:
            write_atomic(self.job.staging / f"progress-{self.rank}.json", json.dumps({"made": p.made, "rejected": p.rejected}))
        if self.bar is None:
            return
        made, rejected = p.made, p.rejected
        for other in range(1, self.world):
            info = _read_json(self.job.staging / f"progress-{other}.json") or {}
            made, rejected = made + info.get("made", 0), rejected + info.get("rejected", 0)
        elapsed = time.perf_counter() - p.start - p.load_s
        rate = f"{made / elapsed:.2f}" if made and elapsed > 0 else "–"
        self.bar.update(self.task, completed=min(len(self.job.items), self.base + made), rate=rate, rejected=rejected)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _worker(rank: int, job: Job, world: int, init_file: Path, limit: int | None, show_progress: bool) -> None:
    try:
        _run_rank(job, rank, world, init_file, limit, show_progress)
    except DermkohyaError as exc:
        write_atomic(job.staging / f"error-{rank}.txt", str(exc))
        raise SystemExit(1) from None


def generate(
    plan_path: Path,
    *,
    out: Path | None = None,
    processes: int = 1,
    limit: int | None = None,
    show_progress: bool = True,
) -> Result:
    """Make (or finish) the plan's images. `processes` > 1 shards them over that many GPUs (or CPU
    processes), with the same files as one process. `limit` stops after about that many new images.
    A second generate into the same output folder meanwhile is refused at once (locks.py)."""
    folder = Path(out) if out is not None else Path("synthetic") / load_plan(plan_path)[1]
    with locks.holding(locks.folder_lock(folder), f"generate output {folder}", "generate") as held:
        result = _generate_locked(plan_path, out=folder, processes=processes, limit=limit, show_progress=show_progress)
    result.warnings[:0] = held.warnings  # a dead generate's lock, taken over
    return result


def _generate_locked(plan_path: Path, *, out: Path, processes: int, limit: int | None, show_progress: bool) -> Result:
    start = time.perf_counter()
    job = prepare_job(plan_path, out)
    job.staging.mkdir(parents=True, exist_ok=True)
    (job.out / REJECTED).mkdir(exist_ok=True)
    for stale in [*job.staging.glob("timing-*.json"), *job.staging.glob("progress-*.json"), *job.staging.glob("error-*.txt")]:
        stale.unlink()
    if processes > 1:
        import torch

        if torch.cuda.is_available() and processes > torch.cuda.device_count():
            raise DermkohyaError(f"--processes {processes}: only {torch.cuda.device_count()} CUDA device(s) visible")
        import torch.multiprocessing as mp

        init_file = job.staging / f"dist-{os.getpid()}-{time.time_ns()}"
        try:
            mp.spawn(_worker, args=(job, processes, init_file, limit, show_progress), nprocs=processes, join=True)
        except Exception:
            errors = [p.read_text(encoding="utf-8") for p in sorted(job.staging.glob("error-*.txt"))]
            if errors:
                raise DermkohyaError(errors[0]) from None
            raise
        finally:
            init_file.unlink(missing_ok=True)
    else:
        _run_rank(job, 0, 1, None, limit, show_progress)
    return _summarise(job, processes, time.perf_counter() - start)


def _summarise(job: Job, processes: int, wall_s: float) -> Result:
    timings = [t for r in range(processes) if (t := _read_json(job.staging / f"timing-{r}.json"))]
    finished_records = []
    for item in job.items:
        final = job.out / item.path
        if final.exists():
            finished_records.append(read_record(final))
    rejected: Counter[str] = Counter()
    by_cell: Counter[str] = Counter()
    for record in finished_records:
        for entry in record["rejected"]:
            rejected.update(entry["reasons"])
            by_cell[f"{record['diagnosis']} / {record['fst']}"] += 1
    made = sum(t["made"] for t in timings)
    gen_s = max((t["end"] - t["start"] - t["load_s"] for t in timings), default=0.0)
    steady_made = sum(t["made"] - t["made_at_first_batch"] for t in timings)
    steady_s = max((t["end"] - t["first_batch_end"] for t in timings if t["first_batch_end"]), default=0.0)
    result = Result(
        out=job.out,
        planned=len(job.items),
        finished=len(finished_records),
        made=made,
        rejected=dict(rejected),
        rejected_by_cell=dict(by_cell),
        processes=processes,
        device=timings[0]["device"] if timings else "",
        wall_s=wall_s,
        load_s=max((t["load_s"] for t in timings), default=0.0),
        images_per_s=made / gen_s if made and gen_s > 0 else None,
        steady_images_per_s=steady_made / steady_s if steady_made > 0 and steady_s > 0 else None,
        warnings=list(job.warnings),
    )
    summary = dataclasses.asdict(result) | {"out": str(job.out), "complete": result.complete}
    summary["cells"] = [{"diagnosis": d, "fst": f, "planned": q} for (d, f), q in quotas(job.plan).items()]
    write_atomic(job.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if result.complete:
        shutil.rmtree(job.staging, ignore_errors=True)
    return result
