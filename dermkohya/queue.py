"""A queue of runs (`dermkohya train A.toml B.toml …`) and the list of every run of a project (`dermkohya runs`).

Why a queue in dermkohya and not a shell loop: one failed run must not stop the others, a stopped one
(Ctrl-C) must stop the rest, and the end needs one table of what happened. With `--gpus 0,1` the runs
go one per GPU at a time, each GPU's runs as a separate `dermkohya train RUN --gpus N` (a process of its
own, so each handles its signals and its lock as a single train does); the GPU id replaces the run
file's [launch] gpu_ids and the launch manifest says so.

While a queue runs, `.dermkohya/queue/<id>.json` (a `QueueRecord`) lists its runs: `dermkohya runs`
shows those not started yet as `queued`, the one vocabulary of runstate.py. A SLURM job array submitted
by `dermkohya sweep --slurm --submit` leaves such a record too; its tasks train in the shared project
folder, so their locks and launch manifests give every other state.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dermkohya import locks, manifests, runstate
from dermkohya.errors import DermkohyaError
from dermkohya.records import Record, RecordError

QUEUE_DIR = Path(locks.STATE_DIR) / "queue"
NOT_RUN = "not run"  # a queued run the queue never started (it was stopped first)


class QueuedRun(BaseModel):
    """One run of a queue: where it stands in the queue (not the run's own state: runstate.py says that)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    run_file: str
    status: Literal["waiting", "started", "ended"] = "waiting"
    gpu: str | None = None


class QueueRecord(Record):
    """`.dermkohya/queue/<id>.json`: who runs a queue (or which SLURM job holds it) and its runs."""

    KIND = "queue"
    REMEDY = "it is dermkohya's own state: delete it if no queue runs"
    source: Literal["dermkohya", "slurm"]
    owner: locks.LockRecord | None = None  # the dermkohya running the queue ("dermkohya" source)
    slurm_job: str | None = None
    since: str
    runs: list[QueuedRun]

    def live(self) -> bool:
        """A local queue lives while its dermkohya does; a SLURM job cannot be asked from here, so it counts as
        live (its runs are `queued` only until they start: see `queued_runs`)."""
        if self.source == "slurm":
            return True
        return self.owner is not None and locks.alive(self.owner) is not False


@dataclass
class Row:
    """One line of the queue's closing table."""

    run: str
    run_file: Path
    result: str  # a runstate value (finished, failed, stopped, collected) or NOT_RUN
    seconds: float = 0.0
    loss: float | None = None
    artifact: Path | None = None
    message: str | None = None  # why it failed, in one line
    gpu: str | None = None
    log: Path | None = None  # the `dermkohya train` output of a run given its own process (--gpus with several)

    @property
    def ok(self) -> bool:
        return self.result in (runstate.RunState.FINISHED, runstate.RunState.COLLECTED)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _owner(command: list[str]) -> locks.LockRecord:
    return locks.LockRecord(what="queue", purpose="queue", pid=os.getpid(), host=socket.gethostname(),
                            boot_id=locks._boot_id(), pid_start=locks._start_ticks(os.getpid()), since=_now(),
                            command=command)


def record_path(root: Path, ident: str) -> Path:
    folder = Path(root) / QUEUE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{ident}.json"


def write_slurm_record(root: Path, job_id: str, runs: list[tuple[str, Path]]) -> Path:
    """What a submitted job array will train, so `dermkohya runs` can show its pending tasks as queued."""
    record = QueueRecord(source="slurm", slurm_job=job_id, since=_now(),
                         runs=[QueuedRun(name=name, run_file=str(path)) for name, path in runs])
    return record.write(record_path(root, f"slurm-{job_id}"))


def _run_names(root: Path, run_files: list[Path]) -> list[tuple[str, Path]]:
    """Every run file's name, all loaded first: a mistake in the fifth file is reported before the first trains."""
    from dermkohya.errors import ProblemsError
    from dermkohya.spec import load_run

    names: list[tuple[str, Path]] = []
    problems: list[str] = []
    for path in run_files:
        try:
            _, name = load_run(path if path.is_absolute() else root / path)
        except ProblemsError as exc:
            problems += [f"{exc.source}: {p}" for p in exc.problems]
            continue
        except DermkohyaError as exc:
            problems.append(str(exc))
            continue
        names.append((name, path))
    seen: dict[str, Path] = {}
    for name, path in names:
        if name in seen:
            problems.append(f"{path}: run {name!r} is queued twice (also {seen[name]}): a run trains once per queue")
        seen[name] = path
    if problems:
        raise ProblemsError("the queue's run files", problems)
    return names


@contextmanager
def _recorded(root: Path, names: list[tuple[str, Path]], command: list[str]) -> Iterator[Callable[..., None]]:
    """The queue's record while it runs; yields `update(index, status, gpu)`; removed when the queue ends."""
    record = QueueRecord(source="dermkohya", owner=_owner(command), since=_now(),
                         runs=[QueuedRun(name=name, run_file=str(path)) for name, path in names])
    path = record_path(root, f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{os.getpid()}")
    guard = threading.Lock()

    def update(index: int, status: str, gpu: str | None = None) -> None:
        with guard:
            record.runs[index] = record.runs[index].model_copy(update={"status": status, "gpu": gpu})
            record.write(path)

    record.write(path)
    try:
        yield update
    finally:
        path.unlink(missing_ok=True)


def run_queue(
    run_files: list[Path],
    *,
    project_root: Path,
    gpus: list[str] | None = None,
    new: bool = False,
    strict: bool = False,
    online: bool = False,
    collect: bool = True,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[str, Path, str | None], None] | None = None,
    command: list[str] | None = None,
) -> list[Row]:
    """Train each run file in turn (or one per GPU of `gpus` at a time) and collect it; never stops at a failure.

    A stop (Ctrl-C, SIGTERM) of a run stops the queue: the runs not yet started are `not run`.
    """
    root = Path(project_root).resolve()
    names = _run_names(root, run_files)
    command = command or [os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]]
    rows: list[Row | None] = [None] * len(names)
    with _recorded(root, names, command) as update:
        if gpus is None or len(gpus) == 1:
            gpu = gpus[0] if gpus else None
            for i, (name, path) in enumerate(names):
                update(i, "started", gpu)
                if on_start:
                    on_start(name, path, gpu)
                rows[i] = train_one(path, name, project_root=root, gpu=gpu, new=new, strict=strict, online=online,
                                    collect=collect, on_line=on_line)
                update(i, "ended", gpu)
                if rows[i].result == runstate.RunState.STOPPED:
                    break
        else:
            _run_parallel(root, names, gpus, rows, update, on_start=on_start,
                          options=_child_options(new=new, strict=strict, online=online, collect=collect))
    return [row or Row(name, path, NOT_RUN) for row, (name, path) in zip(rows, names)]


def train_one(run_file: Path, name: str, *, project_root: Path, gpu: str | None = None, new: bool = False,
              strict: bool = False, online: bool = False, collect: bool = True,
              on_line: Callable[[str], None] | None = None) -> Row:
    """One run in this process, under its lock through train and collect (as `dermkohya train` holds it)."""
    from dermkohya import collect as collecting
    from dermkohya import train

    started = time.monotonic()
    row = Row(name, run_file, runstate.RunState.FAILED.value, gpu=gpu)
    try:
        with train.run_lock(run_file, project_root=project_root):
            result = train.train(run_file, project_root=project_root, new=new, strict=strict, online=online,
                                 on_line=on_line, gpu_ids=gpu)
            row.result, row.loss = result.state.value, _loss(result.manifest_path)
            if result.returncode != 0:
                last = _cause(result.tail)
                row.message = (f"stopped by {result.stopped.signal or result.stopped.cause}" if result.stopped else
                               f"kohya exit {result.returncode}: {result.hint or last}; read {result.log_path}")
            elif collect:
                row.artifact = collecting.collect(run_file, project_root=project_root, new_version=new)
                row.result = runstate.RunState.COLLECTED.value
    except DermkohyaError as exc:
        row.message = _one_line(exc)
    row.seconds = time.monotonic() - started
    return row


def _cause(tail: list[str]) -> str:
    """kohya's own error line (accelerate's CalledProcessError about it comes after), else the last line."""
    lines = [line.strip() for line in tail if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line) and "CalledProcessError" not in line]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


def _one_line(exc: DermkohyaError) -> str:
    from dermkohya.errors import ProblemsError

    if isinstance(exc, ProblemsError):
        return f"{exc.source}: " + "; ".join(exc.problems)
    return str(exc)


def _loss(manifest_path: Path) -> float | None:
    launch = manifests.launch_status(manifest_path)
    return launch.loss_last if launch is not None else None


def _child_options(*, new: bool, strict: bool, online: bool, collect: bool) -> list[str]:
    flags = {"--new": new, "--strict": strict, "--online": online, "--no-collect": not collect}
    return [flag for flag, on in flags.items() if on]


def _run_parallel(root: Path, names: list[tuple[str, Path]], gpus: list[str], rows: list[Row | None],
                  update: Callable[..., None], *, on_start: Callable[[str, Path, str | None], None] | None,
                  options: list[str]) -> None:
    """One worker per GPU, each training the next waiting run as its own `dermkohya train RUN --gpus N`."""
    pending = list(range(len(names)))
    guard = threading.Lock()
    stop = threading.Event()
    logs = root / QUEUE_DIR / f"logs-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)

    def worker(gpu: str) -> None:
        while not stop.is_set():
            with guard:
                if not pending:
                    return
                i = pending.pop(0)
            name, path = names[i]
            update(i, "started", gpu)
            if on_start:
                on_start(name, path, gpu)
            rows[i] = _train_child(root, name, path, gpu, options, logs / f"{name}.log")
            update(i, "ended", gpu)
            if rows[i].result == runstate.RunState.STOPPED:
                stop.set()

    threads = [threading.Thread(target=worker, args=(gpu,), name=f"dermkohya-gpu-{gpu}") for gpu in gpus]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:  # the children got the same Ctrl-C and stop their kohya; start no more
        stop.set()
        for thread in threads:
            thread.join()


def _train_child(root: Path, name: str, path: Path, gpu: str, options: list[str], log: Path) -> Row:
    """`dermkohya train` for one run in a process of its own; its result is read from the files it leaves."""
    argv = [sys.executable, "-c", "from dermkohya.cli import main; main()", "--project", str(root), "train",
            str(path), "--gpus", gpu, *options]
    started_at, started = datetime.now(timezone.utc).replace(microsecond=0), time.monotonic()
    with open(log, "wb") as out:
        code = subprocess.run(argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    row = Row(name, path, runstate.RunState.FAILED.value, seconds=time.monotonic() - started, gpu=gpu, log=log)
    manifest_path = root / "output" / name / "manifest.json"
    launch = manifests.launch_status(manifest_path)
    if launch is not None and _iso(launch.started) >= started_at:  # this launch's, not an earlier one's
        row.loss = _loss(manifest_path)
        state = runstate.run_state(root, name)
        row.result = (state or runstate.RunState.FAILED).value
        if row.result == runstate.RunState.COLLECTED:
            row.artifact = latest_artifact(root, name)
    if code != 0 or not row.ok:
        errors = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("error:")]
        row.message = (errors[-1].removeprefix("error:").strip() if errors else f"exit {code}") + f" (log: {log})"
        if row.result in (runstate.RunState.FINISHED, runstate.RunState.COLLECTED):
            row.result = runstate.RunState.FAILED.value  # trained, but collect failed
    return row


def _iso(value: Any) -> datetime:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


def latest_artifact(root: Path, name: str) -> Path | None:
    """The newest version filed in artifacts/<name>/ (`<name>.safetensors`, `<name>-v2.safetensors`, …)."""
    folder = Path(root) / "artifacts" / name
    found = [p for p in folder.glob(f"{name}*.safetensors") if p.stem == name or p.stem.startswith(f"{name}-v")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


# --- dermkohya runs ------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """One run of the project as `dermkohya runs` shows it."""

    name: str
    run_file: Path | None
    state: str  # a runstate value, or "new" for a run file never rendered
    pid: int | None = None  # the dermkohya training it (running)
    host: str | None = None
    queued_by: str | None = None  # "queue pid 123" or "slurm job 456"
    steps: str | None = None  # "120/400" from kohya's last progress line
    loss: float | None = None
    artifact: Path | None = None
    evaluation: dict[str, float] | None = None  # the headline of the newest evaluation of its artifact
    evaluation_report: str | None = None


def queued_runs(root: Path) -> dict[str, str]:
    """Run name → who queued it, for runs a live queue or a submitted SLURM job has not started yet."""
    queued: dict[str, str] = {}
    for path in sorted((Path(root) / QUEUE_DIR).glob("*.json")):
        try:
            record = QueueRecord.read(path)
        except RecordError:
            continue
        if not record.live():
            continue
        who = f"slurm job {record.slurm_job}" if record.source == "slurm" else f"queue pid {record.owner.pid}"
        for run in record.runs:
            if record.source == "dermkohya" and run.status == "waiting":
                queued[run.name] = who
            elif record.source == "slurm":
                launch = manifests.launch_status(Path(root) / "output" / run.name / "manifest.json")
                if launch is None or _iso(launch.started) < _iso(record.since):
                    queued[run.name] = who
    return queued


def project_runs(root: Path) -> list[RunInfo]:
    """Every run of the project: each runs/*.toml, and any run with outputs or artifacts but no run file left."""
    from dermkohya import kohya
    from dermkohya.spec import load_run

    root = Path(root).resolve()
    files: dict[str, Path | None] = {}
    for path in sorted((root / "runs").glob("*.toml")):
        try:
            _, name = load_run(path)
        except DermkohyaError:
            name = path.stem
        files.setdefault(name, path.relative_to(root))
    for folder in ("output", "artifacts"):
        for path in sorted((root / folder).glob("*")):
            if re.search(r"\.\d+$", path.name) and path.name.rsplit(".", 1)[0] in files:
                continue  # output/<run>.N: an earlier result `--new` kept aside
            if path.is_dir() and ((path / "manifest.json").is_file() or folder == "artifacts"):
                files.setdefault(path.name, None)
    queued = queued_runs(root)
    infos = []
    for name, run_file in sorted(files.items()):
        state = runstate.run_state(root, name)
        info = RunInfo(name, run_file, state.value if state else "new")
        if name in queued and state != runstate.RunState.RUNNING:
            info.state, info.queued_by = runstate.RunState.QUEUED.value, queued[name]
        if state == runstate.RunState.RUNNING:
            holder = locks.holder(locks.run_lock(root, name))
            if holder is not None:
                info.pid, info.host = holder.pid, holder.host
        info.loss = _loss(root / "output" / name / "manifest.json")
        log = root / "output" / name / "train.log"
        if log.is_file():
            for line in reversed(_tail(log)):
                progress = kohya.parse_progress(line)
                if progress:
                    info.steps = f"{progress.step}/{progress.total}"
                    info.loss = progress.loss if info.loss is None else info.loss
                    break
        info.artifact = latest_artifact(root, name)
        if info.artifact is not None:
            info.evaluation_report, info.evaluation = evaluation_headline(root, info.artifact)
        infos.append(info)
    return infos


def _tail(path: Path, size: int = 64 * 1024) -> list[str]:
    """The last lines of a log, tqdm's carriage returns as line ends."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", errors="replace").replace("\r", "\n").splitlines()


def evaluation_headline(root: Path, artifact: Path) -> tuple[str | None, dict[str, float] | None]:
    """The newest `dermkohya evaluate` report of images generated with `artifact`, and its headline numbers."""
    from dermkohya import collect
    from dermkohya.lora import file_sha256

    sidecar = artifact.with_name(artifact.name + ".sha256")
    sha = sidecar.read_text().split()[0] if sidecar.is_file() else file_sha256(artifact)
    reports = collect.evaluation_reports(root, {sha})
    if not reports:
        return None, None
    newest = max(reports, key=lambda p: (root / p).stat().st_mtime_ns)
    try:
        from dermkohya.evaluation_report import EvaluationReport

        return newest, EvaluationReport.read(root / newest).headline()
    except (RecordError, ImportError):
        return newest, None


def run_info_dict(info: RunInfo) -> dict[str, Any]:
    """`dermkohya runs --json`: one run, paths relative to the project."""
    data = dict(info.__dict__)
    data["run_file"] = None if info.run_file is None else info.run_file.as_posix()
    data["artifact"] = None if info.artifact is None else str(info.artifact)
    return data
