"""Sweeps: `sweeps/<name>.toml` (a base run file and a grid or list of overrides) → one run file per variant.

Why rendered run files: each variant becomes an ordinary, committed `runs/<sweep>-<variant>.toml`, so it
trains, resumes, collects and reproduces exactly like any run (and its name, which carries the sweep's,
keeps its outputs apart from every other run's). The sweep itself only renders them, hands them to the
queue (queue.py) or to a SLURM job array, optionally generates and evaluates each variant's LoRA, and
files `reports/sweep-<name>.json/.md` (a `SweepReport`) with a plot.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from dermkohya import manifests, runstate
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.files import write_atomic
from dermkohya.records import Record
from dermkohya.schema import describe, load_toml_model
from dermkohya.spec import RunSpec, load_run

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HEADER = "# Rendered by `dermkohya sweep {sweep}`"


def _sections() -> dict[str, type[BaseModel] | None]:
    """The run file's sections a sweep may override: a model's keys, or None for a free table ([kohya])."""
    found: dict[str, type[BaseModel] | None] = {}
    for name, field in RunSpec.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found[name] = field.annotation
        elif name == "kohya":
            found[name] = None
    return found


def _overrides_model(name: str, value_type: Any) -> type[BaseModel]:
    """`[grid]` / `[[variants]]` as a schema: the run file's sections and keys, so a typo names the nearest key."""
    fields: dict[str, Any] = {}
    for section, model in _sections().items():
        if model is None:
            fields[section] = (dict[str, value_type] | None, None)
            continue
        inner = create_model(f"{name}_{section}", __config__=ConfigDict(extra="forbid"),
                             **{key: (value_type | None, None) for key in model.model_fields})
        fields[section] = (inner | None, None)
    if name == "Variant":
        fields["name"] = (str | None, Field(default=None, pattern=NAME_RE.pattern))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


Grid = _overrides_model("Grid", list[Any])
Variant = _overrides_model("Variant", Any)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluateSection(_Section):
    plan: str = Field(description="a plan file (plans/<plan>.toml); its [[lora]] becomes the variant's LoRA")
    heldout: str = Field(description="real held-out images: datasets/<ds>/prepared/heldout or its metadata.csv")
    skip: list[str] = Field(default_factory=list, description="metrics to leave out (as `dermkohya evaluate --skip`)")
    weights: str | None = None  # the evaluation weight files' folder (default as `dermkohya evaluate`)


class SlurmSection(_Section):
    partition: str | None = None
    gpus: int = Field(default=1, ge=0)
    time: str = Field(default="04:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
    cpus_per_task: int | None = Field(default=None, ge=1)
    mem: str | None = None
    account: str | None = None
    sbatch: list[str] = Field(default_factory=list, description="more #SBATCH options, e.g. \"--qos=high\"")
    setup: list[str] = Field(default_factory=list, description="shell lines before training, e.g. \"module load cuda\"")
    dermkohya: str = "dermkohya"  # the command on the nodes


class SweepFile(_Section):
    name: str | None = Field(default=None, pattern=NAME_RE.pattern)
    description: str = ""
    base: str = Field(description="the run file every variant starts from, e.g. runs/demo.toml")
    grid: Grid | None = None  # type: ignore[valid-type]
    variants: list[Variant] = Field(default_factory=list)  # type: ignore[valid-type]
    evaluate: EvaluateSection | None = None
    slurm: SlurmSection = SlurmSection()

    @model_validator(mode="after")
    def _something(self) -> SweepFile:
        if not _flat(self.grid) and not self.variants:
            raise ValueError("a sweep needs a [grid] of lists (e.g. network.dim = [8, 16]) or [[variants]] tables")
        if any(not values for values in _flat(self.grid).values()):
            raise ValueError("[grid]: every key needs at least one value")
        return self


def _flat(model: BaseModel | None) -> dict[str, Any]:
    """`section.key` → value, for the keys the sweep file sets (in file order)."""
    if model is None:
        return {}
    flat = {}
    for section, inner in model.model_dump(exclude_unset=True).items():
        if section == "name" or inner is None:
            continue
        for key, value in inner.items():
            flat[f"{section}.{key}"] = value
    return flat


class VariantRecord(BaseModel):
    """One variant of a sweep report: what it changed and what came of it."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    run: str
    run_file: str
    overrides: dict[str, Any]
    state: str | None  # runstate.py's vocabulary; None when never rendered
    seconds: float | None = None  # kohya's time
    loss: float | None = None
    artifact: str | None = None
    evaluation: str | None = None  # reports/<run>.json
    headline: dict[str, float] = Field(default_factory=dict)
    per_skin_type: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # FST → metric → value
    note: str | None = None


class SweepReport(Record):
    """`reports/sweep-<name>.json`: one row per variant (loss, time, per-skin-type metrics when evaluated)."""

    KIND = "sweep-report"
    REMEDY = "re-run `dermkohya sweep SWEEP_FILE`"
    sweep: str
    sweep_file: str
    base: str
    created: str
    variants: list[VariantRecord]
    plot: str | None = None


class Sweep(BaseModel):
    """A loaded sweep: its name, file, spec and every variant's run name and overrides."""

    name: str
    path: Path
    spec: SweepFile
    variants: dict[str, dict[str, Any]]  # variant → {section.key: value}

    def run_name(self, variant: str) -> str:
        return f"{self.name}-{variant}"

    def run_file(self, variant: str) -> Path:
        return Path("runs") / f"{self.run_name(variant)}.toml"


def _label(key: str, value: Any, leaves: dict[str, int]) -> str:
    section, leaf = key.split(".", 1)
    label = leaf if leaves[leaf] == 1 else f"{section}_{leaf}"
    text = ("true" if value else "false") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    return label + re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def load_sweep(path: Path, project_root: Path) -> Sweep:
    """Read a sweep file (every problem at once) and check every variant as a run file before anything is written."""
    spec = load_toml_model(path, SweepFile, what="sweep file", example="sweeps/demo.toml")
    name = spec.name or path.stem
    if not NAME_RE.match(name):
        raise DermkohyaError(f"{path}: sweep name {name!r} must be letters, digits, '.', '_' or '-': set `name`")
    variants: dict[str, dict[str, Any]] = {}
    grid = _flat(spec.grid)
    if grid:
        leaves: dict[str, int] = {}
        for key in grid:
            leaves[key.split(".", 1)[1]] = leaves.get(key.split(".", 1)[1], 0) + 1
        for values in itertools.product(*grid.values()):
            overrides = dict(zip(grid, values))
            variants["-".join(_label(k, v, leaves) for k, v in overrides.items())] = overrides
    problems = []
    for i, variant in enumerate(spec.variants, 1):
        label = variant.name or f"v{i}"
        if label in variants:
            problems.append(f"[[variants]] #{i}: a second variant named {label!r}: give it another `name`")
        variants[label] = _flat(variant)
    base = project_root / spec.base
    if not base.is_file():
        raise DermkohyaError(f"{path}: base run file {spec.base} not found in {project_root} (e.g. base = \"runs/demo.toml\")")
    load_run(base)  # the base itself, with its own file's line numbers
    text = base.read_text(encoding="utf-8")
    sweep = Sweep(name=name, path=path, spec=spec, variants=variants)
    for variant, overrides in variants.items():
        try:
            RunSpec.model_validate(_apply(tomllib.loads(text), sweep, variant))
        except ValidationError as exc:
            problems += [f"variant {variant} ({_shown(overrides)}): {describe(err, text, RunSpec, 'run file')}"
                         for err in exc.errors()]
        run = sweep.run_name(variant)
        if not NAME_RE.match(run):
            problems.append(f"variant {variant}: run name {run!r} is not a valid name")
    if problems:
        raise ProblemsError(str(path), problems)
    return sweep


def _shown(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items())


def _apply(data: dict[str, Any], sweep: Sweep, variant: str) -> dict[str, Any]:
    overrides = sweep.variants[variant]
    for key, value in overrides.items():
        section, leaf = key.split(".", 1)
        data.setdefault(section, {})[leaf] = value
    data["name"] = sweep.run_name(variant)
    base_description = data.get("description") or ""
    data["description"] = f"{base_description} [sweep {sweep.name}, variant {variant}: {_shown(overrides)}]".strip()
    return {"name": data.pop("name"), "description": data.pop("description"), **data}


def render_variants(sweep: Sweep, project_root: Path) -> list[Path]:
    """Write `runs/<sweep>-<variant>.toml` for every variant (project-relative paths, in variant order).

    A file this sweep wrote before is rewritten; any other file of that name is never touched."""
    header = HEADER.format(sweep=_relative(sweep.path, project_root))
    written = []
    for variant, overrides in sweep.variants.items():
        path = project_root / sweep.run_file(variant)
        data = _apply(tomllib.loads((project_root / sweep.spec.base).read_text(encoding="utf-8")), sweep, variant)
        lines = [f"{header} from {sweep.spec.base}, variant {variant}:"]
        lines += [f"#   {key} = {json.dumps(value)}" for key, value in overrides.items()]
        lines += ["# Change the sweep file and re-run it rather than editing this file: the sweep rewrites it.", ""]
        text = "\n".join(lines) + tomli_w.dumps(data)
        if path.exists() and not path.read_text(encoding="utf-8").startswith(header):
            raise DermkohyaError(f"{path} exists and was not written by {sweep.path}: rename the sweep (`name`) "
                                 "or move that run file away; a sweep never replaces a run file of yours")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_atomic(path, text)
        written.append(sweep.run_file(variant))
    return written


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


# --- SLURM ---------------------------------------------------------------------------------------------


def write_sbatch(sweep: Sweep, project_root: Path, run_files: list[Path]) -> Path:
    """`runs/<sweep>.sbatch.sh`: a job array, task i trains run file i in the shared project folder."""
    from dermkohya.templating import file_environment

    slurm = sweep.spec.slurm
    options = [f"--job-name=dermkohya-{sweep.name}", f"--array=0-{len(run_files) - 1}", f"--time={slurm.time}",
               f"--output=output/slurm/{sweep.name}-%A_%a.log", f"--chdir={Path(project_root).resolve()}"]
    if slurm.partition:
        options.append(f"--partition={slurm.partition}")
    if slurm.gpus:
        options.append(f"--gres=gpu:{slurm.gpus}")
    if slurm.cpus_per_task:
        options.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.mem:
        options.append(f"--mem={slurm.mem}")
    if slurm.account:
        options.append(f"--account={slurm.account}")
    options += slurm.sbatch
    if bad := [o for o in options if re.search(r"\s", o)]:
        raise DermkohyaError(f"{sweep.path}: [slurm] options with spaces cannot go on an #SBATCH line: {bad} "
                             "(move the project to a path without spaces, or fix the value)")
    path = Path(project_root) / "runs" / f"{sweep.name}.sbatch.sh"
    text = file_environment().get_template("sweep.sbatch.sh.j2").render(
        sweep=sweep.name, sweep_file=_relative(sweep.path, project_root), script=_relative(path, project_root),
        options=options, setup=slurm.setup, root=shlex.quote(str(Path(project_root).resolve())),
        runs=[shlex.quote(p.as_posix()) for p in run_files], dermkohya=slurm.dermkohya)
    (Path(project_root) / "output" / "slurm").mkdir(parents=True, exist_ok=True)  # sbatch opens the log before the script runs
    write_atomic(path, text)
    path.chmod(0o755)
    return path


def submit(script: Path, sweep: Sweep, project_root: Path, run_files: list[Path]) -> str:
    """`sbatch --parsable` the script; records the job so `dermkohya runs` shows its pending tasks as queued."""
    import subprocess

    from dermkohya import queue

    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], cwd=project_root, capture_output=True, text=True)
    except FileNotFoundError:
        raise DermkohyaError(f"sbatch not found: submit {script} on a SLURM login node (`sbatch {script}`)") from None
    if done.returncode != 0:
        raise DermkohyaError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    job = done.stdout.strip().split(";")[0]
    queue.write_slurm_record(project_root, job, [(sweep.run_name(v), p) for v, p in zip(sweep.variants, run_files)])
    return job


# --- running a sweep ----------------------------------------------------------------------------------------


def run_sweep(sweep: Sweep, project_root: Path, run_files: list[Path], *, gpus: list[str] | None = None,
              new: bool = False, on_line: Any = None, on_start: Any = None,
              on_note: Any = None) -> tuple[list[Any], list[VariantRecord]]:
    """Train every variant through the queue (a variant already collected is kept unless `new`), evaluate each
    collected one when the sweep has [evaluate], and return the queue's rows and the report's records."""
    from dermkohya import queue

    pending = [(v, p) for v, p in zip(sweep.variants, run_files)
               if new or runstate.run_state(project_root, sweep.run_name(v)) != runstate.RunState.COLLECTED]
    rows = queue.run_queue([p for _, p in pending], project_root=project_root, gpus=gpus, new=new, on_line=on_line,
                           on_start=on_start) if pending else []
    messages = {row.run: row.message for row in rows if row.message}
    records = []
    for variant in sweep.variants:
        run = sweep.run_name(variant)
        note = messages.get(run)
        artifact = queue.latest_artifact(project_root, run)
        report = project_root / "reports" / f"{run}.json"
        if sweep.spec.evaluate is not None and artifact is not None and note is None and (
                new or not report.is_file() or report.stat().st_mtime < artifact.stat().st_mtime):
            if on_note:
                on_note(f"{run}: generating {sweep.spec.evaluate.plan} with its LoRA and evaluating it")
            try:
                evaluate_variant(sweep, variant, artifact, project_root)
            except DermkohyaError as exc:
                note = f"evaluation failed: {queue._one_line(exc)}"
        records.append(variant_record(sweep, variant, project_root, note))
    return rows, records


# --- evaluation and the report ---------------------------------------------------------------------------


def evaluate_variant(sweep: Sweep, variant: str, artifact: Path, project_root: Path) -> Path:
    """Generate the sweep's plan with the variant's LoRA and evaluate it against the held-out set → reports/<run>.json."""
    from dermkohya import evaluate, generate

    config = sweep.spec.evaluate
    assert config is not None
    run = sweep.run_name(variant)
    plan = tomllib.loads((project_root / config.plan).read_text(encoding="utf-8"))
    plan["name"] = run
    plan["lora"] = [{"path": str(Path(artifact).resolve()), "weight": 1.0}]
    base = str((plan.get("model") or {}).get("base", ""))
    if base and ":" not in base and not Path(base).is_absolute():  # generate reads paths from the working folder
        plan["model"]["base"] = str(project_root / base)
    plan_file = project_root / "reports" / f"sweep-{sweep.name}" / "plans" / f"{run}.toml"
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(plan_file, f"# {config.plan} with the LoRA of {run} (dermkohya sweep {sweep.name})\n" + tomli_w.dumps(plan))
    result = generate.generate(plan_file, out=project_root / "synthetic" / run, show_progress=False)
    if not result.complete:
        raise DermkohyaError(f"{plan_file}: generation stopped before every image was made; re-run the sweep")
    skipped = set(config.skip)
    weights = Path(config.weights) if config.weights else evaluate.default_weights_dir()
    options = evaluate.Options(enabled=tuple(m for m in evaluate.METRICS if m not in skipped))
    evaluate.evaluate(project_root / config.heldout, project_root / "synthetic" / run,
                      weights=evaluate.Weights.under(weights, None, None, None), out_dir=project_root / "reports",
                      options=options)
    return project_root / "reports" / f"{run}.json"


def variant_record(sweep: Sweep, variant: str, project_root: Path, note: str | None = None) -> VariantRecord:
    """A variant's row, read from the files its run left (launch manifest, artifacts, evaluation report)."""
    from dermkohya import queue

    run = sweep.run_name(variant)
    state = runstate.run_state(project_root, run)
    launch = manifests.launch_status(project_root / "output" / run / "manifest.json") or manifests.LaunchStatus()
    artifact = queue.latest_artifact(project_root, run)
    record = VariantRecord(variant=variant, run=run, run_file=sweep.run_file(variant).as_posix(),
                           overrides=sweep.variants[variant], state=state.value if state else None,
                           seconds=launch.kohya_seconds, loss=launch.loss_last,
                           artifact=_relative(artifact, project_root) if artifact else None, note=note)
    report = project_root / "reports" / f"{run}.json"
    if sweep.spec.evaluate is not None and report.is_file():
        from dermkohya.evaluation_report import EvaluationReport

        evaluation = EvaluationReport.read(report)
        record.evaluation = _relative(report, project_root)
        record.headline = evaluation.headline()
        keys = list(record.headline) or [k for k in evaluation.rows[0] if isinstance(evaluation.rows[0][k], float)]
        for row in evaluation.rows:
            if row.get("fst") and not row.get("diagnosis"):
                record.per_skin_type[str(row["fst"])] = {k: row.get(k) for k in keys}
    return record


def write_report(sweep: Sweep, records: list[VariantRecord], project_root: Path) -> tuple[Path, Path]:
    """reports/sweep-<name>.json (the record), .md and .png."""
    from dermkohya.templating import file_environment

    reports = project_root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    plot = _plot(records, reports / f"sweep-{sweep.name}.png")
    report = SweepReport(sweep=sweep.name, sweep_file=_relative(sweep.path, project_root), base=sweep.spec.base,
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"), variants=records,
                         plot=plot.name if plot else None)
    json_path = report.write(reports / f"sweep-{sweep.name}.json")
    skin_types = sorted({fst for r in records for fst in r.per_skin_type}, key=_fst_order)
    metrics = list(dict.fromkeys(k for r in records for k in r.headline))
    md = file_environment(trim_blocks=True).get_template("sweep_report.md.j2").render(report=report, skin_types=skin_types,
                                                                      metrics=metrics, fmt=_fmt)
    md_path = reports / f"sweep-{sweep.name}.md"
    write_atomic(md_path, md)
    return json_path, md_path


def _fst_order(fst: str) -> int:
    order = ["I", "II", "III", "IV", "V", "VI"]
    return order.index(fst) if fst in order else len(order)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _plot(records: list[VariantRecord], path: Path) -> Path | None:
    """Final loss per variant and, when evaluated, each variant's first headline metric per skin type."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    evaluated = [r for r in records if r.per_skin_type]
    fig, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(11 if evaluated else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.bar([r.variant for r in records], [r.loss if r.loss is not None else 0 for r in records], color="#4c72b0")
    ax.set_ylabel("final loss (kohya's avr_loss)")
    ax.set_title("loss per variant")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    if evaluated:
        ax = axes[0][1]
        metric = next(iter(evaluated[0].headline), None) or next(iter(next(iter(evaluated[0].per_skin_type.values()))))
        for r in evaluated:
            fsts = sorted(r.per_skin_type, key=_fst_order)
            ax.plot(fsts, [r.per_skin_type[f].get(metric) for f in fsts], marker="o", label=r.variant)
        ax.set_title(f"{metric} per Fitzpatrick skin type")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
