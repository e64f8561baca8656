"""The job queue: generate, evaluate and train jobs kept in SQLite, run one at a time per GPU.

Why each job is a subprocess (`dermkohya generate|evaluate|train …`) in its own process group: it takes
exactly the CLI's code path and its locks (a second generate into the same folder or a second train of
the same run is refused the same way), a crash cannot take the server down, and cancel is what Ctrl-C
does in a terminal: SIGINT to the whole group, then SIGTERM, then SIGKILL. Why SQLite in the project
(`.dermkohya/serve.sqlite`): a restarted server shows every finished job, runs the queued ones, resumes
interrupted generation and evaluation (both resumable) and marks an interrupted train `stopped`, to be
continued with `--resume` — nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dermkohya.locks import STATE_DIR

DB_NAME = "serve.sqlite"
LOG_DIR = Path(STATE_DIR) / "serve" / "jobs"
MAX_QUEUED = 100
STOP_GRACE_S = 10.0
POLL_S = 0.5
ACTIVE = ("queued", "running")
CLI = "import sys; from dermkohya.cli import main; sys.exit(main(prog_name='dermkohya'))"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  params TEXT NOT NULL,
  argv TEXT NOT NULL,
  status TEXT NOT NULL,
  worker TEXT,
  pid INTEGER,
  pid_start TEXT,
  created TEXT NOT NULL,
  started TEXT,
  ended TEXT,
  returncode INTEGER,
  done INTEGER,
  total INTEGER,
  message TEXT,
  resumed INTEGER NOT NULL DEFAULT 0,
  cancel INTEGER NOT NULL DEFAULT 0
)
"""


class QueueFull(Exception):
    """More than MAX_QUEUED jobs waiting."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks: a pid with other ticks is another process (pid reuse)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_group(pid: int, pid_start: str | None, grace: float = STOP_GRACE_S) -> None:
    """Ctrl-C for a job's process group: SIGINT, then SIGTERM, then SIGKILL, each after `grace` seconds."""
    if pid_start is not None and _start_ticks(pid) != pid_start:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _start_ticks(pid) is None or _zombie(pid):
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class JobStore:
    """The SQLite table of jobs; a connection per call, so worker threads and requests never share one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STATE_DIR / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.root / LOG_DIR).mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def add(self, kind: str, params: dict[str, Any], argv: list[str], max_queued: int = MAX_QUEUED) -> int:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if waiting >= max_queued:
                db.execute("ROLLBACK")
                raise QueueFull(f"{waiting} jobs are waiting (the limit is {max_queued})")
            cur = db.execute("INSERT INTO jobs (kind, params, argv, status, created) VALUES (?, ?, ?, 'queued', ?)",
                             (kind, json.dumps(params), json.dumps(argv), _now()))
            db.execute("COMMIT")
            return int(cur.lastrowid)

    def get(self, job_id: int) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._dict(row)

    def all(self, limit: int = 200) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._dict(row) for row in rows]

    def _dict(self, row: sqlite3.Row) -> dict[str, Any]:
        data = dict(row)
        data["params"] = json.loads(data["params"])
        data["argv"] = json.loads(data["argv"])
        data["cancel"] = bool(data["cancel"])
        data["log"] = (LOG_DIR / f"{data['id']}.log").as_posix()
        return data

    def update(self, job_id: int, **fields: Any) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def claim(self, worker: str) -> dict[str, Any] | None:
        """The oldest queued job, now `running` on `worker` (atomic: two workers never take the same job)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET status = 'running', worker = ?, started = ?, pid = NULL WHERE id = ?",
                       (worker, _now(), row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    def cancel(self, job_id: int) -> dict[str, Any] | None:
        """A queued job is cancelled at once; a running one is flagged, and its worker stops its group."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE jobs SET status = 'cancelled', ended = ?, message = 'cancelled before it started' "
                       "WHERE id = ? AND status = 'queued'", (_now(), job_id))
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND status = 'running'", (job_id,))
            db.execute("COMMIT")
        return self.get(job_id)

    def recover(self) -> list[int]:
        """After a restart: stop any job process a dead server left behind, requeue interrupted generation and
        evaluation, mark an interrupted train `stopped` (resumable with --resume). Returns the requeued ids."""
        requeued = []
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()
        for row in rows:
            if row["pid"]:
                stop_group(row["pid"], row["pid_start"])
            if row["cancel"]:
                self.update(row["id"], status="cancelled", ended=_now(), message="cancelled (server restarted)")
            elif row["kind"] == "train":
                self.update(row["id"], status="stopped", ended=_now(),
                            message="interrupted by a server restart: resume it to continue with --resume")
            else:
                self.update(row["id"], status="queued", pid=None, resumed=row["resumed"] + 1,
                            message="interrupted by a server restart: queued again (it resumes where it stopped)")
                requeued.append(row["id"])
        return requeued


class Workers:
    """One thread per GPU (or one for the CPU), each taking the oldest queued job and running it."""

    def __init__(self, store: JobStore, gpus: list[str] | None, progress: Callable[[dict[str, Any]], tuple[int | None, int | None]]) -> None:
        self.store, self.gpus, self.progress = store, gpus or [None], progress  # type: ignore[list-item]
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.threads: list[threading.Thread] = []
        self.running: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for gpu in self.gpus:
            thread = threading.Thread(target=self._loop, args=(gpu,), name=f"dermkohya-worker-{gpu or 'cpu'}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        """Server shutdown: stop the running jobs' groups; their rows stay `running`, so the next start recovers them."""
        self.closing.set()
        self.wake.set()
        for proc in list(self.running.values()):
            stop_group(proc.pid, _start_ticks(proc.pid))
        for thread in self.threads:
            thread.join(timeout=STOP_GRACE_S * 2 + 5)

    def _loop(self, gpu: str | None) -> None:
        while not self.closing.is_set():
            job = None
            try:
                job = self.store.claim(f"gpu {gpu}" if gpu is not None else "cpu")
                if job is not None:
                    self._run(job, gpu)
                    continue
            except (sqlite3.Error, OSError) as exc:  # a busy database or a job that could not start: the worker lives on
                if job is not None:
                    self.store.update(job["id"], status="failed", ended=_now(), message=f"could not run: {exc}")
            self.wake.wait(1.0)
            self.wake.clear()

    def _run(self, job: dict[str, Any], gpu: str | None) -> None:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        env["PYTHONUNBUFFERED"] = "1"
        log = self.store.root / job["log"]
        with open(log, "ab") as out:
            out.write(f"--- {_now()} job {job['id']}: {'dermkohya ' + ' '.join(job['argv'])}\n".encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-c", CLI, *job["argv"]], cwd=self.store.root, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.running[job["id"]] = proc
        self.store.update(job["id"], pid=proc.pid, pid_start=_start_ticks(proc.pid))
        try:
            while proc.poll() is None:
                if self.closing.is_set():
                    return  # close() stops the group; the row stays running for recover()
                current = self.store.get(job["id"])
                if current is not None and current["cancel"]:
                    stop_group(proc.pid, None)
                    proc.wait()
                    break
                self._progress(job)
                time.sleep(POLL_S)
            if self.closing.is_set():
                return
            self._progress(job)
            current = self.store.get(job["id"]) or job
            code = proc.returncode
            if current["cancel"]:
                status, message = "cancelled", "cancelled: its process group was stopped (SIGINT, as Ctrl-C)"
            elif code == 0:
                status, message = "finished", _last_line(log)
            else:
                status, message = ("stopped" if job["kind"] == "train" and code < 0 else "failed"), _last_line(log)
            self.store.update(job["id"], status=status, returncode=code, ended=_now(), message=message)
        finally:
            self.running.pop(job["id"], None)

    def _progress(self, job: dict[str, Any]) -> None:
        try:
            done, total = self.progress(job)
        except Exception:  # progress is a courtesy: a half-written file must not fail the job
            return
        self.store.update(job["id"], done=done, total=total)


def _last_line(log: Path) -> str | None:
    return next(iter(tail(log, 1)), None)


def tail(log: Path, lines: int = 20) -> list[str]:
    """A job log's last lines, progress bars' carriage returns as line ends, blank lines dropped."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 32 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    kept = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return kept[-lines:]
