"""The run file: one schema, the single source of truth for a training run.

load → validate → normalise, in that order: `load_run` reads the TOML, reports every problem at once
(unknown keys with the nearest valid one, bad values with the key and its line), and returns a
`RunSpec` whose family-dependent defaults (resolution, script) are filled in.
Defaults are the user's training card: SD 1.5, 512×512, network_dim 16, alpha 16, lr 1e-4, batch 4,
3 epochs, fp16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermkohya.errors import DermkohyaError
from dermkohya.schema import load_toml_model

Family = Literal["sd15", "sdxl"]
SCRIPTS: dict[str, str] = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}
DEFAULT_RESOLUTION: dict[str, int] = {"sd15": 512, "sdxl": 1024}
SMOKE_BASES: dict[str, str] = {"random:sd15": "sd15", "random:sdxl": "sdxl"}
DEFAULT_CAPTION_TEMPLATE = "clinical dermatology photograph, {{ diagnosis }}, Fitzpatrick skin type {{ fst }}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_todo(value: str | None) -> str | None:
    """`dermkohya adopt` leaves a path the source did not name as "TODO: …": never a path to use."""
    if value is not None and value.startswith("TODO"):
        raise ValueError(f"still {value!r} (left by `dermkohya adopt`): set the path")
    return value


class ModelSection(_Section):
    base: str = Field(description="local .safetensors/.ckpt file, diffusers folder, or random:sd15 / random:sdxl")
    family: Family = "sd15"
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    vae: str | None = None
    no_half_vae: bool | None = None

    _paths = field_validator("base", "vae")(_no_todo)


class DatasetSection(_Section):
    train_data_dir: str | None = None
    prepared: str | None = None
    caption_extension: Literal[".txt"] = ".txt"
    enable_bucket: bool = True
    min_bucket_reso: int | None = Field(default=None, ge=64)
    max_bucket_reso: int | None = Field(default=None, ge=64)
    bucket_reso_steps: int = Field(default=64, ge=8)
    shuffle_caption: bool = False
    keep_tokens: int = Field(default=0, ge=0)
    flip_aug: bool = False

    _paths = field_validator("train_data_dir", "prepared")(_no_todo)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSection:
        if (self.train_data_dir is None) == (self.prepared is None):
            raise ValueError("set exactly one of `train_data_dir` (a kohya folder) or `prepared` (a prepared dataset)")
        return self


class NetworkSection(_Section):
    module: str = "networks.lora"
    dim: int = Field(default=16, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    args: list[str] = Field(default_factory=list)
    train_unet_only: bool = False


class TrainSection(_Section):
    learning_rate: float = Field(default=1e-4, gt=0)
    unet_lr: float | None = Field(default=None, gt=0)
    text_encoder_lr: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=4, ge=1)
    epochs: int | None = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    resolution: int | None = Field(default=None, ge=64)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    save_precision: Literal["float", "fp16", "bf16"] = "fp16"
    optimizer: str = "AdamW"
    optimizer_args: list[str] = Field(default_factory=list)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = Field(default=0, ge=0, description="steps, or a fraction (< 1) of all steps, as kohya reads it")
    min_snr_gamma: float | None = Field(default=None, gt=0)
    noise_offset: float | None = Field(default=None, ge=0)
    seed: int = 42
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    attention: Literal["sdpa", "xformers", "mem_eff_attn", "none"] = "sdpa"
    data_loader_workers: int = Field(default=2, ge=0)
    persistent_data_loader_workers: bool = True
    save_every_n_epochs: int | None = Field(default=1, ge=1)
    save_state: bool = True
    clip_skip: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _steps_alone(cls, data: Any) -> Any:
        # kohya's max_train_epochs overrides max_train_steps: `max_steps` alone must not keep the default epochs
        if isinstance(data, dict) and "max_steps" in data and "epochs" not in data:
            return {**data, "epochs": None}
        return data

    @field_validator("lr_warmup_steps")
    @classmethod
    def _warmup(cls, value: int | float) -> int | float:
        if isinstance(value, float) and value >= 1:
            raise ValueError(f"{value} is a fraction of all steps and must be below 1: write whole steps as an integer")
        return value


class SampleSection(_Section):
    prompts: list[str] = Field(default_factory=list)
    template: str = DEFAULT_CAPTION_TEMPLATE
    diagnoses: list[str] = Field(default_factory=list)
    skin_types: list[str] = Field(default_factory=lambda: ["I", "II", "III", "IV", "V", "VI"])
    negative: str = ""
    every_n_epochs: int | None = Field(default=None, ge=1)
    every_n_steps: int | None = Field(default=None, ge=1)
    sampler: str = "euler_a"
    steps: int = Field(default=20, ge=1)
    guidance: float = Field(default=7.0, ge=0)
    width: int | None = Field(default=None, ge=64)
    height: int | None = Field(default=None, ge=64)
    seed: int = 1


class ValidationSection(_Section):
    split: float = Field(default=0.0, ge=0, lt=1)
    seed: int | None = None
    every_n_steps: int | None = Field(default=None, ge=1)
    every_n_epochs: int | None = Field(default=None, ge=1)


class LaunchSection(_Section):
    processes: int = Field(default=1, ge=1)
    gpu_ids: str | None = Field(default=None, pattern=r"^(all|\d+(,\d+)*)$")
    machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
    cpu_threads_per_process: int = Field(default=2, ge=1)
    extra_args: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _multi_node(self) -> LaunchSection:
        if self.machines > 1 and not (self.main_process_ip and self.main_process_port):
            raise ValueError("multi-node (`machines` > 1) needs `main_process_ip` and `main_process_port`")
        if self.machine_rank >= self.machines:
            raise ValueError(f"`machine_rank` {self.machine_rank} must be below `machines` ({self.machines})")
        return self


class TextualInversionSection(_Section):
    """Phase 1 of `textual_inversion` / `ti_then_lora` (dermkohya/ti.py): one kohya run per token."""

    token_scope: Literal["cell", "diagnosis"] = "cell"
    token_template: str | None = Field(default=None, description="jinja2 over diagnosis, fst; default by token_scope")
    caption_template: str = Field(default="{{ token }}, {{ caption }}",
                                  description="jinja2 over token, caption, diagnosis, fst: the phase captions")
    init_word: str | None = "skin"
    num_vectors_per_token: int = Field(default=1, ge=1, le=16)
    learning_rate: float = Field(default=5e-3, gt=0)
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=1500, ge=1)
    batch_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _epochs_alone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "epochs" in data and "max_steps" not in data:
            return {**data, "max_steps": None}
        return data

    @property
    def template(self) -> str:
        if self.token_template is not None:
            return self.token_template
        return DEFAULT_TOKEN_TEMPLATES[self.token_scope]


DEFAULT_TOKEN_TEMPLATES: dict[str, str] = {
    "cell": "<{{ diagnosis | slug }}-fst-{{ fst | lower }}>",
    "diagnosis": "<{{ diagnosis | slug }}>",
}


class RunSpec(_Section):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    method: Literal["lora", "textual_inversion", "ti_then_lora"] = "lora"
    model: ModelSection
    dataset: DatasetSection
    network: NetworkSection = NetworkSection()
    train: TrainSection = TrainSection()
    sample: SampleSection = SampleSection()
    validation: ValidationSection = ValidationSection()
    launch: LaunchSection = LaunchSection()
    kohya: dict[str, Any] = Field(default_factory=dict)
    textual_inversion: TextualInversionSection = TextualInversionSection()

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        if self.model.base in SMOKE_BASES and SMOKE_BASES[self.model.base] != self.model.family:
            raise ValueError(f"base `{self.model.base}` is a {SMOKE_BASES[self.model.base]} model but family is `{self.model.family}`")
        if self.train.epochs is None and self.train.max_steps is None:
            raise ValueError("[train] needs `epochs` or `max_steps`")
        return self

    @property
    def script(self) -> str:
        return SCRIPTS[self.model.family]

    @property
    def resolution(self) -> int:
        return self.train.resolution or DEFAULT_RESOLUTION[self.model.family]


def load_run(path: Path) -> tuple[RunSpec, str]:
    """Parse and validate a run file; returns the spec and its run name (the `name` key or the file stem)."""
    spec = load_toml_model(path, RunSpec, what="run file", example="runs/derm-sd15.toml")
    name = spec.name or path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DermkohyaError(f"{path}: run name {name!r} must be letters, digits, '.', '_' or '-': set `name`")
    return spec, name
