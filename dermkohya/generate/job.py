"""A plan resolved into a job: its base found through the one resolver train uses (made loadable offline),
its LoRAs hashed and counted, its images allocated, and `plan.json` — the typed record that pins an
output folder to the plan that made it — checked or written. Every problem a user can fix is found
here, before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from dermkohya import __version__, basemodel
from dermkohya.basemodel import ResolvedBase
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.generate.plan import Item, Plan, allocate, load_plan, quotas
from dermkohya.records import Record, RecordError

STAGING = ".staging"
REJECTED = "rejected"


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
    } | ({"embeddings": [{"path": e.path, "token": e.token, "sha256": basemodel.sha256_path(Path(e.path))}
                          for e in plan.embedding]} if plan.embedding else {})


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


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraRecord(_Entry):
    path: str
    sha256: str
    weight: float
    modules: dict[str, int]


class Quota(_Entry):
    diagnosis: str
    fst: str
    count: int


class PlanRecord(Record):
    """`plan.json`: the plan an output folder was made from. Its `fingerprint` (everything that changes
    pixels) guards the folder: a rerun with a changed plan is refused instead of mixing two plans."""

    KIND: ClassVar[str] = "plan"
    VERSION: ClassVar[int] = 2  # 1: the unversioned plan.json written before records
    REMEDY: ClassVar[str] = (
        "generate into another folder (--out, or a new plan `name`) or move this one away; "
        "finished images are never rewritten"
    )

    name: str
    plan_file: str
    plan: Plan
    base: str
    base_format: str
    base_family: str | None
    model_dir: str
    config_dir: str | None
    loras: list[LoraRecord]
    count: int
    quotas: list[Quota]
    dermkohya_version: str
    fingerprint: dict[str, Any]

    @classmethod
    def from_data(cls, raw: Any, *, source: Path | str = "<data>") -> PlanRecord:
        if isinstance(raw, dict) and "format" not in raw and "fingerprint" in raw:
            raise RecordError(
                f"{source}: written by an older dermkohya (plan.json before {cls.format_id()}), so its images "
                f"cannot be checked against this plan: {cls.REMEDY}"
            )
        return super().from_data(raw, source=source)

    @classmethod
    def of(cls, job: Job, plan_path: Path) -> PlanRecord:
        return cls(
            name=job.name,
            plan_file=str(plan_path),
            plan=job.plan,
            base=job.base.spec,
            base_format=job.base.format,
            base_family=job.base.family,
            model_dir=str(job.model_dir),
            config_dir=str(job.config_dir) if job.config_dir else None,
            loras=[LoraRecord(**dataclasses.asdict(lora)) for lora in job.loras],
            count=len(job.items),
            quotas=[Quota(diagnosis=d, fst=f, count=q) for (d, f), q in quotas(job.plan).items()],
            dermkohya_version=__version__,
            fingerprint=json.loads(json.dumps(fingerprint(job.plan, job.base_sha256, job.loras))),
        )


def _check_or_write_plan_json(job: Job, plan_path: Path, write: bool) -> None:
    path = job.out / "plan.json"
    current = PlanRecord.of(job, plan_path)
    if path.is_file():
        old, new = _flat(PlanRecord.read(path).fingerprint), _flat(current.fingerprint)
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
    current.write(path)
