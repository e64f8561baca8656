"""`dermkohya train`: check → render → verify → launch kohya → confirm the LoRA exists → collect.

Each step reads what the previous one wrote, so any of them can be re-run alone. The launch facts
(verified base hash, sd-scripts commit, exact argv, times, exit code) go to output/<run>/manifest.json.
"""

from __future__ import annotations

import math
import os
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

from dermkohya import basemodel, dataset, kohya, locks, manifests, memory, render, runstate
from dermkohya.resume import _resume_done, check_resume, saved_states
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
    # kohya's final LoRA when kohya failed only after writing it (a crash while freeing the GPU): collect verifies it
    final_before_failure: Path | None = None
    note: str | None = None  # why nothing was launched (a --resume with nothing left to train)
    memory: str | None = None  # the pre-launch memory check's verdict, or why it did not run (memory.py)


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
    nothing_to_do: str | None = None  # --resume of a state at the run's last epoch or step: why nothing launches
    memory: str | None = None  # the memory check's verdict (memory.py)

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
    gpu_ids: str | None = None,
    skip_memory_check: bool = False,
) -> PreparedLaunch:
    """Everything before kohya starts. With overlap=False the slow checks run here too, before returning.

    Long because its order is the contract: refusals that touch nothing of the user's come first (a
    finished or unfinished run, an unwritable output), then the cheap checks, then the slow ones that may
    overlap kohya's start-up; splitting it would hide that order.

    `gpu_ids` (the queue's `--gpus`) replaces the run file's [launch] gpu_ids for this launch only; the
    launch manifest records both, so the run file stays the truth of what the run asked for.
    """
    root = (project_root or Path.cwd()).resolve()
    rendered = render.render(run_file, project_root=root, check_keys=False)
    spec, name = rendered.spec, rendered.name
    warnings = list(rendered.warnings)
    launch_args = list(rendered.launch_args)
    if gpu_ids is not None:
        launch_args = _with_gpu_ids(launch_args, gpu_ids, spec.launch.processes * spec.launch.machines, run_file)

    output_dir = rendered.output_dir
    final = output_dir / f"{name}.safetensors"
    script_args = list(rendered.script_args)
    nothing_to_do = None
    if resume:
        states = saved_states(output_dir, name)
        if not states:
            raise DermkohyaError(f"--resume: no saved kohya state in {output_dir} (states are saved when [train] save_state = true): "
                                 f"start afresh with `dermkohya train {run_file} --new`")
        warnings += check_resume(rendered, states[-1])
        nothing_to_do = _resume_done(rendered, states[-1])
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

    _check_writable(output_dir)
    # Will it fit the GPU? A refusal names the keys to change; kohya would fail only after loading the models.
    room = (memory.Verdict(None, "memory: not checked (--skip-memory-check)") if skip_memory_check
            else memory.check_before_launch(spec, run_file, gpu_ids=gpu_ids))
    warnings += [room.line] if room.warning else []
    dataset_files = _stat_files(rendered.dataset_dir)  # what the checks below see; compared again just before the launch

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

    argv = [str(python), *launch_args, str(sd_scripts / spec.script), *script_args]
    manifest = manifests.launch_from(rendered.manifest)  # a LaunchManifest's data, validated when written
    manifest["base_model"] = base | {"sha256": None, "verified": False}
    manifest["sd_scripts"] = {"path": str(sd_scripts), "commit": kohya.sd_scripts_commit(sd_scripts), "pinned_commit": kohya.PINNED_COMMIT}
    manifest["command"] = argv
    manifest["resumed_from"] = script_args[-1] if resume else None
    manifest["gpu_override"] = (None if gpu_ids is None else
                                {"gpu_ids": gpu_ids, "run_file_gpu_ids": spec.launch.gpu_ids, "by": "--gpus"})

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

    prepared = PreparedLaunch(rendered, argv, manifest, warnings, nothing_to_do=nothing_to_do,
                              memory="; ".join([room.line, *room.notes]))
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

    if (changed := _changed_files(dataset_files, _stat_files(rendered.dataset_dir))):
        raise DermkohyaError(f"{rendered.dataset_dir}: {len(changed)} file(s) changed or vanished while train checked them "
                             f"(first: {changed[0]}): wait for whatever writes there to finish, then train again")
    if new and not resume and output_dir.exists():
        prepared.set_aside = _set_aside(output_dir)
        warnings.append(f"previous outputs kept in {prepared.set_aside}")
    return prepared


def _with_gpu_ids(launch_args: list[str], gpu_ids: str, processes: int, run_file: Path) -> list[str]:
    """accelerate's arguments with `--gpu_ids` set to the queue's GPU(s) instead of the run file's."""
    if not re.fullmatch(r"\d+(,\d+)*", gpu_ids):
        raise DermkohyaError(f"--gpus {gpu_ids!r}: give GPU ids as digits separated by commas, e.g. --gpus 0,1")
    if processes > len(gpu_ids.split(",")):
        raise DermkohyaError(
            f"{run_file}: [launch] asks for {processes} processes but --gpus gives this run GPU {gpu_ids}: "
            "train it alone without --gpus (its [launch] gpu_ids apply), or set [launch] processes = 1"
        )
    args = list(launch_args)
    if "--gpu_ids" in args:
        at = args.index("--gpu_ids")
        del args[at:at + 2]
    at = args.index("--mixed_precision") if "--mixed_precision" in args else len(args)
    return [*args[:at], "--gpu_ids", gpu_ids, *args[at:]]


# What may change between a run and its --resume: how long it trains, what and how often it saves, its samples.
def _check_writable(folder: Path) -> None:
    """kohya writes the LoRA, states and samples into output/<run>/ and fails there only after loading the
    models (the final save: after the whole run), so an unwritable folder is refused before the launch."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK):
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise DermkohyaError(f"{existing} {why}: kohya writes the run's LoRA and states into {folder}; make it "
                             "writable (or mount a writable disk there) and train again")


def _stat_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under `folder` (links not followed): cheap, unlike a hash."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            files[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return files


def _changed_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


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
    gpu_ids: str | None = None,
    skip_memory_check: bool = False,
) -> TrainResult:
    """Launch kohya for a run file and report what happened; never raises for a kohya failure.

    A failed check that ran beside kohya's start-up stops kohya and is raised (its log stays). A second
    train, --resume or collect of the same run meanwhile is refused at once (locks.py).
    """
    root = (project_root or Path.cwd()).resolve()
    from dermkohya.spec import load_run

    if load_run(run_file if run_file.is_absolute() else root / run_file)[0].method != "lora":
        from dermkohya import ti  # textual inversion (then LoRA): phases of their own, same launch path

        return ti.train_result(run_file, project_root=root, resume=resume, new=new, on_line=on_line,
                               break_lock=break_lock, gpu_ids=gpu_ids)
    with run_lock(run_file, project_root=root, break_lock=break_lock) as held:
        result = _train_locked(run_file, project_root=root, resume=resume, new=new, strict=strict, online=online,
                               on_line=on_line, lock_fd=held.fd, gpu_ids=gpu_ids, skip_memory_check=skip_memory_check)
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
    gpu_ids: str | None = None,
    skip_memory_check: bool = False,
) -> TrainResult:
    """`train` once the run's lock is held; kohya's watchdog holds it too, until kohya's group has gone.

    Long because it is the one place that records what happened, in order: nothing to do, launch, the
    stop cause, the exit code that kohya gave or dermkohya decides (no LoRA, NaN loss, a crash after the
    last save), collect; each outcome writes the launch manifest before it returns or raises."""
    started = time.monotonic()
    root = (project_root or Path.cwd()).resolve()
    prepared = prepare_launch(run_file, project_root=root, resume=resume, new=new, strict=strict, gpu_ids=gpu_ids,
                              skip_memory_check=skip_memory_check)
    rendered, manifest = prepared.rendered, prepared.manifest
    output_dir = rendered.output_dir
    if prepared.nothing_to_do is not None:  # nothing launched, nothing rewritten
        final = output_dir / f"{rendered.name}.safetensors"
        return TrainResult(name=rendered.name, lora=final if final.exists() else None, returncode=0, interrupted=False,
                           log_path=output_dir / "train.log", manifest_path=output_dir / "manifest.json",
                           saved_states=saved_states(output_dir, rendered.name), warnings=prepared.warnings,
                           state=runstate.RunState.FINISHED, note=prepared.nothing_to_do, memory=prepared.memory)
    manifest_path = output_dir / "manifest.json"
    log_path = output_dir / "train.log"
    manifest["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["checked_while_kohya_starts"] = sorted(prepared.overlapped)
    manifest["state"] = runstate.RunState.RUNNING.value
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifests.LaunchManifest.model_validate(manifest).write(manifest_path)
    except OSError as exc:
        raise DermkohyaError(f"{output_dir}: {exc.strerror} while writing manifest.json before the launch: kohya writes "
                             "the LoRA and its states there too, so free space there and train again") from None
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
    loss_last = _last_loss(result.tail)
    if returncode == 0 and loss_last is not None and math.isnan(loss_last):
        returncode = 1  # kohya trains on through a NaN loss and saves a LoRA of NaNs
        hint = kohya.hint_for(["avr_loss=nan"])
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
        "loss_last": None if loss_last is None or math.isnan(loss_last) else loss_last,
    }
    stopped = None
    if result.stopped_by is not None:
        stopped = runstate.Stop(cause="check", message=str(result.stopped_by))
    elif result.stop_signal is not None:
        stopped = runstate.Stop(cause="signal", signal=result.stop_signal)
    state = runstate.ended(returncode, final.exists(), stopped)
    manifest["stopped"] = stopped.model_dump(exclude_none=True) if stopped else None
    manifest["state"] = state.value
    try:
        manifests.LaunchManifest.model_validate(manifest).write(manifest_path)
    except OSError as exc:  # a full disk: what happened is still reported, only not recorded
        prepared.warnings.append(f"{manifest_path}: not updated ({exc.strerror}), so it still reads as running; "
                                 "free space there before the next train")
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
        final_before_failure=final if final.exists() and result.returncode != 0 and stopped is None else None,
        memory=prepared.memory,
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
        loss = kohya.parse_loss(line)
        if loss is not None:
            return loss
    return None
