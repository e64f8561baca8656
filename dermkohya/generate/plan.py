"""The plan file and what it asks for: the schema (every problem reported at once), the exact split of
the count over diagnosis × skin type, each image's prompt, output path and seed.

Nothing here loads a model or touches the output folder: a plan can be checked and its images listed
on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermkohya import skin
from dermkohya.errors import DermkohyaError
from dermkohya.names import slug
from dermkohya.schema import load_toml_model
from dermkohya.spec import DEFAULT_CAPTION_TEMPLATE
from dermkohya.templating import text_template

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SCHEDULERS = ("dpmpp_2m", "ddim", "euler", "pndm")
SCHEDULER_LABELS = {"dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "pndm": "PNDM"}


# --- the plan file -----------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    base: str = Field(
        description="a local SD 1.5/SDXL .safetensors (or .ckpt) checkpoint, e.g. the file a run trained on, "
        "a diffusers folder, or random:sd15 / random:sdxl for the offline smoke model"
    )


class EmbeddingEntry(_Section):
    path: str = Field(description="a textual-inversion .safetensors or a folder of them, e.g. artifacts/<run>/<run>-embeddings")
    token: str | None = Field(default=None, description="for one file: the token to use (default: the file's dermkohya.token)")


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
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        default="reduce-overhead", description="torch.compile mode of the U-Net (CUDA only); reduce-overhead replays CUDA graphs"
    )
    compile_vae: bool = Field(default=True, description="with compile: also the VAE decoder (default mode)")
    conv1x1_as_mm: bool = Field(default=False, description="with compile: inductor lowers 1×1 convolutions to matmuls (their epilogues fuse)")
    attention: Literal["auto", "cudnn"] = Field(default="auto", description="SDPA kernels (CUDA): torch's choice, or cuDNN's first")
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
    embedding: list[EmbeddingEntry] = Field(default_factory=list)  # learned tokens (ti.py), loaded before the LoRAs
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
