"""What a job request may say, checked before anything is queued, and the CLI command it becomes.

Why argv and not kohya options: a request names a plan, a run file or a synthetic set of this project
and a few bounded numbers; the server turns them into the same `dermkohya …` command a person would
type. No request can pass kohya arguments or a path outside the project. An ad-hoc generation is written
as a plan in plans/ first (validated by the plan schema `dermkohya generate` uses), so it is reproducible.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermkohya import skin
from dermkohya.errors import DermkohyaError
from dermkohya.serve.security import NAME_RE

Name = Annotated[str, Field(pattern=NAME_RE.pattern, max_length=128)]
RANDOM_BASES = ("random:sd15", "random:sdxl")


class RequestError(DermkohyaError):
    """A job request that names something missing or outside the project (answered 422)."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Request):
    """A plan of plans/ by name, or an ad-hoc request that is written as one."""

    kind: Literal["generate"]
    plan: Name | None = None
    name: Name | None = Field(default=None, description="ad hoc: the plan's name (default: serve-<adapter>-<time>)")
    adapter: str | None = Field(default=None, description="ad hoc: a LoRA in artifacts/, e.g. artifacts/demo/demo.safetensors")
    weight: float = Field(default=1.0, ge=-4, le=4)
    base: str = Field(default="random:sd15", description="random:sd15, random:sdxl or a model path inside the project")
    diagnosis: str | None = Field(default=None, min_length=1, max_length=200)
    skin_type: str = Field(default="all", description="I … VI, or all")
    count: int = Field(default=6, ge=1, le=10000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    steps: int = Field(default=20, ge=1, le=200)
    guidance: float = Field(default=7.5, ge=0, le=30)
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)

    @field_validator("skin_type")
    @classmethod
    def _fst(cls, value: str) -> str:
        if value != "all" and value not in skin.FST_TYPES:
            raise ValueError(f"skin_type must be one of {', '.join(skin.FST_TYPES)} or all")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> GenerateRequest:
        if self.plan is None and self.diagnosis is None:
            raise ValueError("give `plan` (a plan in plans/) or an ad-hoc request with at least `diagnosis`")
        return self


class EvaluateRequest(_Request):
    kind: Literal["evaluate"]
    synthetic: Name = Field(description="a set in synthetic/")
    real: str = Field(description="held-out images inside the project, e.g. datasets/demo/prepared/heldout")
    skip: list[Name] = Field(default_factory=list, max_length=20)


class TrainRequest(_Request):
    kind: Literal["train"]
    run: Name = Field(description="a run file runs/<run>.toml")
    resume: bool = False
    new: bool = False


JobRequest = Annotated[GenerateRequest | EvaluateRequest | TrainRequest, Field(discriminator="kind")]


def inside(root: Path, relative: str, what: str) -> Path:
    """A project path (relative, no '..', resolving inside the project) that exists."""
    parts = Path(relative)
    if not relative or parts.is_absolute() or ".." in parts.parts or "\\" in relative:
        raise RequestError(f"{what} {relative!r}: give a path relative to the project, without '..'")
    resolved = (root / parts).resolve()
    if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
        raise RequestError(f"{what} {relative!r}: not found inside the project {root}")
    return resolved


def _write_plan(root: Path, req: GenerateRequest) -> tuple[str, Path]:
    """plans/<name>.toml for an ad-hoc request; never replaces a different plan of the same name."""
    from dermkohya.files import write_atomic

    if req.adapter is not None:
        adapter = inside(root, req.adapter, "adapter")
        if not adapter.is_relative_to((root / "artifacts").resolve()) or adapter.suffix != ".safetensors":
            raise RequestError(f"adapter {req.adapter!r}: give a .safetensors file in artifacts/")
    if req.base not in RANDOM_BASES:
        inside(root, req.base, "base")
    stem = Path(req.adapter).stem if req.adapter else req.base.replace(":", "-")
    name = req.name or f"serve-{stem}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    plan: dict[str, Any] = {
        "name": name,
        "description": "written by dermkohya serve (an ad-hoc generation request)",
        "model": {"base": req.base},
        "classes": {"diagnoses": [req.diagnosis], "skin_types": list(skin.FST_TYPES) if req.skin_type == "all" else [req.skin_type],
                    "count": req.count},
        "sampler": {"steps": req.steps, "guidance": req.guidance, "width": req.width, "height": req.height, "seed": req.seed},
    }
    if req.adapter is not None:
        plan["lora"] = [{"path": req.adapter, "weight": req.weight}]
    text = "# Written by `dermkohya serve` for an ad-hoc request; rerun with `dermkohya generate` to reproduce it.\n" + tomli_w.dumps(plan)
    path = root / "plans" / f"{name}.toml"
    if path.exists() and path.read_text(encoding="utf-8") != text:
        raise RequestError(f"{path}: a different plan has this name: choose another `name`")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        write_atomic(path, text)
    return name, path


def to_command(root: Path, req: GenerateRequest | EvaluateRequest | TrainRequest) -> tuple[list[str], dict[str, Any]]:
    """The `dermkohya` arguments a request runs, and the parameters recorded with the job."""
    root = Path(root)
    params = json.loads(req.model_dump_json(exclude_none=True))
    if isinstance(req, GenerateRequest):
        from dermkohya.generate import load_plan

        if req.plan is not None:
            path = root / "plans" / f"{req.plan}.toml"
            if not path.is_file():
                raise RequestError(f"plans/{req.plan}.toml: no such plan")
        else:
            _, path = _write_plan(root, req)
        plan, name = load_plan(path)  # the CLI's schema: every problem at once
        params |= {"plan_file": path.relative_to(root).as_posix(), "plan": name, "out": f"synthetic/{name}",
                   "total": plan.classes.count}
        return ["generate", params["plan_file"], "--no-progress"], params
    if isinstance(req, EvaluateRequest):
        synthetic = inside(root, f"synthetic/{req.synthetic}", "synthetic set")
        if not (synthetic / "index.csv").is_file():
            raise RequestError(f"synthetic/{req.synthetic}: no index.csv yet: generate the set first")
        inside(root, req.real, "real images")
        argv = ["evaluate", "--real", req.real, "--synthetic", f"synthetic/{req.synthetic}"]
        if req.skip:
            from dermkohya import evaluate

            if unknown := set(req.skip) - set(evaluate.METRICS):
                raise RequestError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(evaluate.METRICS)}")
            argv += ["--skip", ",".join(req.skip)]
        return argv, params
    run_file = root / "runs" / f"{req.run}.toml"
    if not run_file.is_file():
        raise RequestError(f"runs/{req.run}.toml: no such run file")
    argv = ["train", f"runs/{req.run}.toml"] + (["--resume"] if req.resume else []) + (["--new"] if req.new else [])
    return argv, params


def progress(root: Path, job: dict[str, Any]) -> tuple[int | None, int | None]:
    """(done, total) of a job from the files it writes: images on disk, or kohya's last step in train.log."""
    params = job["params"]
    if job["kind"] == "generate":
        out = root / params["out"]
        return (sum(1 for _ in out.glob("*/*/*.png")) if out.is_dir() else 0), params.get("total")
    if job["kind"] == "train":
        from dermkohya import kohya

        from dermkohya.serve.jobs import tail

        for line in reversed(tail(root / "output" / params["run"] / "train.log", 50)):
            found = kohya.parse_progress(line)
            if found:
                return found.step, found.total
    return None, None
