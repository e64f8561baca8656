"""One writer at a time: a lock per run (train, --resume, collect) and per generate output folder.

Why a kernel lock plus a record. The lock itself is `flock` on a file that is never deleted: the kernel
drops it the moment its holder dies (SIGKILL, the OOM killer, a closed terminal), so a dead holder never
blocks anyone and taking over its lock has no check-then-act race: whoever gets the flock is alone.
Beside it, `<lock>.json` says who holds it (pid, host, boot, since, command) so a refusal can name the
holder and the fix. The record is written and removed only by the flock's holder, atomically.

A record left behind by a holder that died is a stale lock: on this host (same hostname and boot) it is
taken over with a warning. A record from another host (a shared cluster filesystem, where flock may not
reach across machines) cannot be checked from here, so it is refused unless the user passes --break-lock.
On a filesystem without flock, the record alone is the lock: it is created with an atomic link, and a
stale one is replaced only with --break-lock (without a kernel lock an automatic takeover could race).

Locks are re-entrant within one thread: `dermkohya train` holds its run's lock through its own collect.
Run locks live in `<project>/.dermkohya/locks/`, outside `output/<run>/`, which `--new` renames; generate's
lies beside its output folder (`synthetic/.<plan>.dermkohya.lock`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dermkohya.errors import DermkohyaError
from dermkohya.files import private_temp
from dermkohya.records import Record, RecordError

STATE_DIR = ".dermkohya"  # the project's machine state (locks; later the job queue), never committed
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockRecord(Record):
    """Who holds a lock: enough to name them, to tell a dead holder from a live one, and to stop them."""

    KIND = "lock"
    VERSION = 1
    REMEDY = "no dermkohya holds it if none runs: delete the file"

    what: str  # "run demo", "generate output synthetic/derm-v1"
    purpose: str  # "train", "collect", "generate"
    pid: int
    host: str
    boot_id: str | None = None  # a reboot ends every holder, whatever its pid
    pid_start: int | None = None  # the holder's start time in clock ticks: a reused pid is another process
    since: str
    command: list[str]


class LockedError(DermkohyaError):
    """Someone else holds the lock; the message names them and the fix."""

    def __init__(self, message: str, holder: LockRecord | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass
class Held:
    """A lock this thread holds; `warnings` says what was taken over or broken to get it."""

    path: Path
    record: LockRecord
    warnings: list[str] = field(default_factory=list)
    fd: int = -1  # the flock's file: a child given it (kohya's watchdog) keeps the lock while it lives


def run_lock(root: Path, name: str) -> Path:
    """The lock of run `name` in the project at `root`."""
    return Path(root) / STATE_DIR / "locks" / f"run-{name}.lock"


def hold_run(root: Path, name: str, purpose: str, *, break_lock: bool = False,
             command: list[str] | None = None) -> AbstractContextManager[Held]:
    """Hold run `name`'s lock (train, --resume, collect)."""
    return holding(run_lock(root, name), f"run {name!r}", purpose, break_lock=break_lock, command=command)


def folder_lock(folder: Path) -> Path:
    """The lock of an output folder (generate's): beside it, so the folder holds only what the command wrote."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.dermkohya.lock")


def record_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".json")


def holder(lock: Path) -> LockRecord | None:
    """Who the record says holds `lock`, or None (free, or an unreadable record)."""
    try:
        return LockRecord.read(record_path(lock))
    except RecordError:
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """A process's start time (field 22 of /proc/<pid>/stat), or None off Linux or when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(record: LockRecord) -> bool | None:
    """True or False for a holder on this host (pid alive and the same process); None for another host."""
    if record.host != socket.gethostname():
        return None
    boot = _boot_id()
    if record.boot_id and boot and record.boot_id != boot:
        return False
    if Path("/proc").is_dir():
        ticks = _start_ticks(record.pid)
        return ticks is not None and (record.pid_start is None or ticks == record.pid_start)
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(record: LockRecord) -> str:
    return (f"{record.purpose} by pid {record.pid} on {record.host} since {record.since} "
            f"(`{shlex.join(record.command)}`)")


_local = threading.local()


def _held_here() -> dict[str, Held]:
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


@contextmanager
def holding(lock: Path, what: str, purpose: str, *, break_lock: bool = False,
            command: list[str] | None = None) -> Iterator[Held]:
    """Hold `lock` for the block, or raise LockedError at once (never waits) naming the holder and the fix."""
    lock = Path(os.path.abspath(lock))
    mine = _held_here()
    if str(lock) in mine:  # held further out in this thread, which releases it
        outer = mine[str(lock)]
        yield Held(outer.path, outer.record, fd=outer.fd)  # its warnings were the outer holder's to report
        return
    if command is None:  # `dermkohya train runs/x.toml`, not the script's full path
        command = [os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]]
    fd, held = _acquire(lock, what, purpose, break_lock, command)
    mine[str(lock)] = held
    try:
        yield held
    finally:
        del mine[str(lock)]
        _release(fd, held)


def _acquire(lock: Path, what: str, purpose: str, break_lock: bool, command: list[str]) -> tuple[int, Held]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        kernel = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            found = holder(lock)
            who = describe(found) if found else "another dermkohya (its record is being written)"
            fix = (f"wait for it to finish or stop it (`kill {found.pid}` on {found.host})" if found
                   else "try again in a moment")
            if found is not None and alive(found) is False:
                fix = "it has ended and its kohya is being stopped (the watchdog keeps the lock until it is gone): try again in a few seconds"
            raise LockedError(f"{what} is in use: {who}; {fix} (lock {record_path(lock)})", found) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            kernel = False  # e.g. a cluster filesystem mounted without flock: the record alone is the lock
        warnings = _clear_previous(lock, what, break_lock, kernel)
        record = LockRecord(what=what, purpose=purpose, pid=os.getpid(), host=socket.gethostname(),
                            boot_id=_boot_id(), pid_start=_start_ticks(os.getpid()),
                            since=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command)
        _write_record(lock, record, exclusive=not kernel, what=what)
        return fd, Held(lock, record, warnings, fd)
    except BaseException:
        os.close(fd)
        raise


def _clear_previous(lock: Path, what: str, break_lock: bool, kernel: bool) -> list[str]:
    """Judge a record left by an earlier holder; under flock that holder has let go of the kernel lock."""
    path = record_path(lock)
    if not path.exists():
        return []
    previous = holder(lock)
    if previous is None:
        if not kernel and not break_lock:
            raise LockedError(f"{what}: {path} is not a lock record dermkohya can read; if no dermkohya runs, "
                              "delete it or pass --break-lock", None)
        path.unlink(missing_ok=True)
        return [f"{path}: replaced an unreadable lock record"]
    state = alive(previous)
    if state is True:  # alive, yet its flock did not stop us: this filesystem's flock does not lock
        raise LockedError(f"{what} is in use: {describe(previous)}; wait for it to finish or stop it "
                          f"(`kill {previous.pid}`) (lock {path})", previous)
    if state is None and not break_lock:
        raise LockedError(
            f"{what} is locked from another host: {describe(previous)}; this host cannot see whether it still "
            f"runs. If it does not, pass --break-lock (lock {path})", previous)
    if state is False and not kernel and not break_lock:
        raise LockedError(
            f"{what} has a stale lock: {describe(previous)}, which no longer runs, but this filesystem has no "
            f"file locks, so it is not taken over automatically: pass --break-lock (lock {path})", previous)
    path.unlink(missing_ok=True)
    if state is None:
        return [f"broke the lock of {describe(previous)} (--break-lock)"]
    return [f"took over a stale lock: {describe(previous)} no longer runs"]


def _write_record(lock: Path, record: LockRecord, *, exclusive: bool, what: str) -> None:
    path = record_path(lock)
    if not exclusive:
        record.write(path)
        return
    tmp = private_temp(path.parent, path.name, ".tmp")
    try:
        record.write(tmp)
        os.link(tmp, path)  # atomic and exclusive, NFS included
    except FileExistsError:
        found = holder(lock)
        raise LockedError(f"{what} is in use: {describe(found) if found else 'another dermkohya'} "
                          f"(lock {path})", found) from None
    finally:
        tmp.unlink(missing_ok=True)


def _release(fd: int, held: Held) -> None:
    try:
        if holder(held.path) == held.record:
            record_path(held.path).unlink(missing_ok=True)
    finally:
        os.close(fd)  # drops the flock
