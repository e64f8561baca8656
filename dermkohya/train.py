"""`dermkohya train`: check → render → verify → launch kohya → confirm the LoRA exists → collect.

Each step reads what the previous one wrote, so any of them can be re-run alone. The launch facts
(verified base hash, sd-scripts commit, exact argv, times, exit code) go to output/<run>/manifest.json.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dermkohya import basemodel, dataset, kohya, locks, render, runstate
from dermkohya.files import write_atomic
from dermkohya.errors import DermkohyaError, ProblemsError


@dataclass
class TrainResult:
    name: str
    lora: Path | None
    returncode: int
    interrupted: bool
    log_path: Path
    manifest_path: Path
    saved_states: list[Path] = field(default_factory=list)
    hint: str | None = None
    tail: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    overhead_seconds: float = 0.0  # dermkohya's time before the launch + any time its overlapped checks held kohya back
    kohya_seconds: float = 0.0
    overlapped_checks: list[str] = field(default_factory=list)
    checks_seconds: float | None = None  # when the overlapped checks finished, in seconds after the launch
    state: runstate.RunState = runstate.RunState.FAILED  # how the launch ended (also in the manifest)
    stopped: runstate.Stop | None = None  # why kohya was stopped, when it was


def saved_states(output_dir: Path, name: str) -> list[Path]:
    """kohya's state folders for this run, oldest first (`<name>-000001-state`, `<name>-step…-state`, `<name>-state`)."""
    if not output_dir.is_dir():
        return []
    states = [p for p in output_dir.glob(f"{name}*-state") if p.is_dir() and (p / "train_state.json").is_file()]
    return sorted(states, key=lambda p: json.loads((p / "train_state.json").read_text()).get("current_step", 0))


def _set_aside(output_dir: Path) -> Path:
    """Keep a finished run's outputs as output/<run>.N (never deleted) so a new run can start."""
    n = 1
    while (target := output_dir.with_name(f"{output_dir.name}.{n}")).exists():
        n += 1
    output_dir.rename(target)
    return target


@dataclass
class PreparedLaunch:
    """What `train` launches, and the checks it runs while kohya starts.

    The two checks that can take seconds on a first run (hashing the base model; asking kohya's parser
    for its option list, which imports the training script in kohya's environment) run beside kohya's
    own start-up (imports, model loading, latent caching), which takes longer (on an H100: done 15-19 s
    after the launch, kohya's first step at 54-64 s); a failure stops kohya's process group at once.
    The manifest's `timing` says whether they held kohya back. Answers already cached are checked
    before the launch, so later runs have nothing left to overlap.
    """

    rendered: render.RenderedRun
    argv: list[str]
    manifest: dict[str, Any]
    warnings: list[str]
    overlapped: dict[str, Callable[[], list[str]]] = field(default_factory=dict)
    set_aside: Path | None = None  # where --new moved the previous outputs

    def run_overlapped(self) -> None:
        """Run the overlapped checks side by side; the first failure is raised as soon as it happens."""
        if not self.overlapped:
            return
        pool = ThreadPoolExecutor(max_workers=len(self.overlapped), thread_name_prefix="dermkohya-check")
        try:
            futures = [pool.submit(check) for check in self.overlapped.values()]
            for future in as_completed(futures):
                self.warnings.extend(future.result())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a failure is reported without waiting for the rest


def prepare_launch(
    run_file: Path,
    *,
    project_root: Path | None = None,
    resume: bool = False,
    new: bool = False,
    strict: bool = False,
    overlap: bool = True,
) -> PreparedLaunch:
    """Everything before kohya starts. With overlap=False the slow checks run here too, before returning."""
    root = (project_root or Path.cwd()).resolve()
    rendered = render.render(run_file, project_root=root, check_keys=False)
    spec, name = rendered.spec, rendered.name
    warnings = list(rendered.warnings)

    output_dir = rendered.output_dir
    final = output_dir / f"{name}.safetensors"
    script_args = list(rendered.script_args)
    if resume:
        states = saved_states(output_dir, name)
        if not states:
            raise DermkohyaError(f"--resume: no saved kohya state in {output_dir} (states are saved when [train] save_state = true)")
        script_args += ["--resume", render.project_path(states[-1], root)]
    elif final.exists() and not new:
        raise DermkohyaError(
            f"{output_dir} holds a finished run ({final.name}): `dermkohya collect {run_file}` it, "
            "pass --new to keep it as output/<run>.N and start afresh, or --resume"
        )
    elif output_dir.exists() and any(output_dir.glob("*.safetensors")) and not new:
        raise DermkohyaError(
            f"{output_dir} holds an unfinished run: pass --resume to continue it or --new to keep it aside and start afresh"
        )

    sd_scripts = kohya.find_sd_scripts(root)
    python = kohya.find_python(root)
    base = rendered.manifest["base_model"]
    if base["smoke"]:
        model_dir, _ = basemodel.ensure_smoke_model(spec.model.family, cache_root=root / render.SMOKE_MODELS_DIR)
        if model_dir.resolve() != rendered.base_path.resolve():
            raise DermkohyaError(f"smoke model built at {model_dir}, but the run renders {rendered.base_path}")
    elif not rendered.base_path.exists():
        raise DermkohyaError(
            f"[model] base {spec.model.base!r} not found at {rendered.base_path}: put the checkpoint there or fix the path in {run_file}"
        )
    # The rendered tokenizer_cache_dir, for every base: built offline once, so kohya never asks the hub.
    basemodel.build_tokenizer_cache(basemodel.tokenizer_cache_dir(root))

    # Independent checks, run side by side: the dataset scan reads image headers, the interpreter and
    # commit checks wait on subprocesses.
    with ThreadPoolExecutor(max_workers=3) as pool:
        scanning = pool.submit(dataset.scan, rendered.dataset_dir, caption_extension=spec.dataset.caption_extension,
                               resolution=(spec.resolution, spec.resolution))
        python_ok = pool.submit(kohya.verify_python, python)
        commit = pool.submit(kohya.verify_commit, sd_scripts, strict=strict)
        report = scanning.result()
        python_ok.result()
        commit_warning = commit.result()
    if report.has_errors(strict):
        raise ProblemsError(
            f"dataset {rendered.dataset_dir}",
            [f"{p.path}: {p.message} — {p.fix}" for p in report.problems if p.severity == "error" or strict],
        )
    if commit_warning:
        warnings.append(commit_warning)

    argv = [str(python), *rendered.launch_args, str(sd_scripts / spec.script), *script_args]
    manifest = dict(rendered.manifest)
    manifest["base_model"] = base | {"sha256": None, "verified": False}
    manifest["sd_scripts"] = {"path": str(sd_scripts), "commit": kohya.sd_scripts_commit(sd_scripts), "pinned_commit": kohya.PINNED_COMMIT}
    manifest["command"] = argv
    manifest["resumed_from"] = script_args[-1] if resume else None

    def check_base() -> list[str]:
        sha256 = basemodel.sha256_path(rendered.base_path)
        manifest["base_model"] = manifest["base_model"] | {"sha256": sha256, "verified": spec.model.sha256 == sha256}
        if spec.model.sha256 and spec.model.sha256 != sha256:
            raise DermkohyaError(
                f"[model] base {rendered.base_path} has sha256 {sha256}, but the run file expects {spec.model.sha256}: "
                "you have a different checkpoint; fix [model] sha256 or the file"
            )
        return []

    def check_keys() -> list[str]:
        return render.check_keys_against_kohya(spec.script, rendered.config_keys, rendered.run_file, project_root=root)

    prepared = PreparedLaunch(rendered, argv, manifest, warnings)
    known = kohya.cached_argument_names(spec.script, root)
    if known is not None:
        warnings += render.check_keys_against_kohya(spec.script, rendered.config_keys, rendered.run_file, known,
                                                    project_root=root)
    else:
        prepared.overlapped["rendered keys against kohya's parser"] = check_keys
    if basemodel.cached_sha256(rendered.base_path) is not None:
        check_base()  # a stat and a dictionary lookup
    else:
        prepared.overlapped["base model sha256"] = check_base
    if not overlap:
        prepared.run_overlapped()
        prepared.overlapped.clear()

    if new and not resume and output_dir.exists():
        prepared.set_aside = _set_aside(output_dir)
        warnings.append(f"previous outputs kept in {prepared.set_aside}")
    return prepared


def run_lock(run_file: Path, *, project_root: Path | None = None, break_lock: bool = False) -> AbstractContextManager[locks.Held]:
    """The run's lock, held by `train` from before its refusals and --new's renaming until kohya has ended;
    `dermkohya train` holds it through its own collect as well (locks are re-entrant within a thread)."""
    from dermkohya.spec import load_run

    root = (project_root or Path.cwd()).resolve()
    _, name = load_run(run_file if run_file.is_absolute() else root / run_file)
    return locks.hold_run(root, name, "train", break_lock=break_lock)


def train(
    run_file: Path,
    *,
    project_root: Path | None = None,
    resume: bool = False,
    new: bool = False,
    strict: bool = False,
    online: bool = False,
    on_line: Callable[[str], None] | None = None,
    break_lock: bool = False,
) -> TrainResult:
    """Launch kohya for a run file and report what happened; never raises for a kohya failure.

    A failed check that ran beside kohya's start-up stops kohya and is raised (its log stays). A second
    train, --resume or collect of the same run meanwhile is refused at once (locks.py).
    """
    root = (project_root or Path.cwd()).resolve()
    with run_lock(run_file, project_root=root, break_lock=break_lock) as held:
        result = _train_locked(run_file, project_root=root, resume=resume, new=new, strict=strict, online=online,
                               on_line=on_line, lock_fd=held.fd)
    result.warnings[:0] = held.warnings
    return result


def _train_locked(
    run_file: Path,
    *,
    project_root: Path | None = None,
    resume: bool = False,
    new: bool = False,
    strict: bool = False,
    online: bool = False,
    on_line: Callable[[str], None] | None = None,
    lock_fd: int = -1,
) -> TrainResult:
    """`train` once the run's lock is held; kohya's watchdog holds it too, until kohya's group has gone."""
    started = time.monotonic()
    root = (project_root or Path.cwd()).resolve()
    prepared = prepare_launch(run_file, project_root=root, resume=resume, new=new, strict=strict)
    rendered, manifest = prepared.rendered, prepared.manifest
    output_dir = rendered.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / "manifest.json"
    log_path = output_dir / "train.log"
    manifest["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["checked_while_kohya_starts"] = sorted(prepared.overlapped)
    manifest["state"] = runstate.RunState.RUNNING.value
    _write_json(manifest_path, manifest)
    before_launch = time.monotonic() - started

    result = kohya.launch(prepared.argv, cwd=root, log_path=log_path, env=kohya.kohya_env(online=online, project_root=root), on_line=on_line,
                          guard=prepared.run_overlapped if prepared.overlapped else None,
                          hold_fds=(lock_fd,) if lock_fd >= 0 else ())

    # The overlapped checks cost kohya time only where they outlasted its start-up (its first step).
    held_back = 0.0
    if result.guard_seconds is not None:
        started_training = result.first_step_seconds if result.first_step_seconds is not None else result.seconds
        held_back = max(0.0, result.guard_seconds - started_training)
    final = output_dir / f"{rendered.name}.safetensors"
    returncode = result.returncode
    hint = kohya.hint_for(result.tail)
    if returncode == 0 and not final.exists() and not result.interrupted:
        returncode = 1
        hint = hint or f"kohya exited 0 but wrote no {final.name}: read {log_path}"
    if result.stop_signal is not None and returncode <= 0:
        returncode = 128 + signal.Signals[result.stop_signal].value  # the shell's convention: 130, 143, 129
    if result.stopped_by is not None and returncode == 0:
        returncode = 1
    manifest |= {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exit_code": returncode,
        "interrupted": result.interrupted,
        "kohya_seconds": round(result.seconds, 1),
        "timing": {
            "dermkohya_before_launch_s": round(before_launch, 3),
            "checks_finished_after_launch_s": None if result.guard_seconds is None else round(result.guard_seconds, 2),
            "kohya_first_step_after_launch_s": None if result.first_step_seconds is None else round(result.first_step_seconds, 2),
            "kohya_held_back_s": round(held_back, 3),
        },
        "outputs": sorted(p.name for p in output_dir.glob("*.safetensors")),
        "loss_last": _last_loss(result.tail),
    }
    stopped = None
    if result.stopped_by is not None:
        stopped = runstate.Stop(cause="check", message=str(result.stopped_by))
    elif result.stop_signal is not None:
        stopped = runstate.Stop(cause="signal", signal=result.stop_signal)
    state = runstate.ended(returncode, final.exists(), stopped)
    manifest["stopped"] = stopped.model_dump(exclude_none=True) if stopped else None
    manifest["state"] = state.value
    _write_json(manifest_path, manifest)
    if result.stopped_by is not None:
        note = f"found while kohya started; kohya was stopped, its log is {log_path}"
        if prepared.set_aside is not None:
            note += f"; the previous outputs are kept in {prepared.set_aside}"
        raise _with_note(result.stopped_by, note)
    return TrainResult(
        name=rendered.name,
        lora=final if returncode == 0 else None,
        returncode=returncode,
        interrupted=result.interrupted,
        log_path=log_path,
        manifest_path=manifest_path,
        saved_states=saved_states(output_dir, rendered.name),
        hint=hint,
        tail=result.tail,
        warnings=prepared.warnings,
        overhead_seconds=before_launch + held_back,
        kohya_seconds=result.seconds,
        overlapped_checks=sorted(prepared.overlapped),
        checks_seconds=result.guard_seconds,
        state=state,
        stopped=stopped,
    )


def _with_note(exc: BaseException, note: str) -> BaseException:
    """The same user error, saying that kohya had started and was stopped for it."""
    if isinstance(exc, ProblemsError):
        return ProblemsError(exc.source, [*exc.problems, note])
    if isinstance(exc, DermkohyaError):
        return DermkohyaError(f"{exc} ({note})")
    return exc


def _last_loss(lines: list[str]) -> float | None:
    for line in reversed(lines):
        progress = kohya.parse_progress(line)
        if progress and progress.loss is not None:
            return progress.loss
        match = re.search(r"avr_loss=([\d.eE+-]+)", line)
        if match:
            return float(match.group(1))
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
