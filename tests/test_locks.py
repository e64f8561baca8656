"""One writer per run and per generate output: a second train, --resume or collect of a run refuses at
once naming the holder; a dead holder's lock is taken over with a warning; another host's is refused
unless --break-lock. Real processes hold the locks (no mocks of os.kill or flock).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dermkohya import collect, generate, locks, runstate, train
from dermkohya.locks import LockedError, LockRecord

from _stand_in import make_project, start_train

HOLD = """
import sys, time
from pathlib import Path
from dermkohya import locks
with locks.holding(Path(sys.argv[1]), "the thing", "train", command=["dermkohya", "train", "runs/x.toml"]):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_elsewhere(lock: Path) -> subprocess.Popen[str]:
    """Another dermkohya process holding `lock` until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def _left_behind(lock: Path, *, pid: int, host: str) -> None:
    """The record a holder leaves when it dies without releasing (the kernel's flock is gone with it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    LockRecord(what="run 'tiny'", purpose="train", pid=pid, host=host, since="2026-11-30T09:00:00+00:00",
               command=["dermkohya", "train", "runs/tiny.toml"]).write(locks.record_path(lock))


def test_a_held_lock_is_refused_at_once_naming_the_holder_and_freed_when_the_holder_dies(tmp_path: Path) -> None:
    lock = tmp_path / ".dermkohya" / "locks" / "run-x.lock"
    holder = _hold_elsewhere(lock)
    start = time.monotonic()
    with pytest.raises(LockedError) as refused:
        with locks.holding(lock, "run 'x'", "train"):
            pass
    assert time.monotonic() - start < 1
    message = str(refused.value)
    assert f"pid {holder.pid} on {socket.gethostname()} since 20" in message
    assert "`dermkohya train runs/x.toml`" in message and f"kill {holder.pid}" in message
    holder.kill()  # SIGKILL: no release runs, its record stays, the kernel drops the flock
    holder.wait()
    assert locks.holder(lock) is not None and locks.alive(locks.holder(lock)) is False  # type: ignore[arg-type]
    with locks.holding(lock, "run 'x'", "train") as held:
        assert held.warnings == [f"took over a stale lock: {locks.describe(refused.value.holder)} no longer runs"]  # type: ignore[arg-type]
        assert locks.holder(lock) == held.record and held.record.pid == os.getpid()
    assert locks.holder(lock) is None and lock.exists()  # released: the record goes, the lock file stays


def test_re_entrant_within_a_thread_refused_from_another(tmp_path: Path) -> None:
    lock = tmp_path / "run-x.lock"
    refusals: list[BaseException] = []

    def other_thread() -> None:
        try:
            with locks.holding(lock, "run 'x'", "collect"):
                pass
        except LockedError as exc:
            refusals.append(exc)

    with locks.holding(lock, "run 'x'", "train") as outer:
        with locks.holding(lock, "run 'x'", "collect") as inner:
            assert inner.record == outer.record and inner.warnings == []
        assert locks.holder(lock) == outer.record  # the inner block did not release it
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(refusals) == 1 and f"train by pid {os.getpid()}" in str(refusals[0])
    assert locks.holder(lock) is None


def test_a_stale_record_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    lock = tmp_path / "run-tiny.lock"
    dead = _dead_pid()
    _left_behind(lock, pid=dead, host=socket.gethostname())
    with locks.holding(lock, "run 'tiny'", "train") as held:
        assert len(held.warnings) == 1 and f"pid {dead} on {socket.gethostname()}" in held.warnings[0]
        assert "took over a stale lock" in held.warnings[0]


def test_another_hosts_lock_is_refused_unless_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path, monkeypatch)
    lock = locks.run_lock(root, "tiny")
    _left_behind(lock, pid=4242, host="gpu-node-07")
    assert runstate.run_state(root, "tiny") == runstate.RunState.RUNNING  # as far as this host can tell
    for attempt in (lambda: train.train(Path("runs/tiny.toml"), project_root=root),
                    lambda: collect.collect("tiny", project_root=root)):
        with pytest.raises(LockedError, match=r"locked from another host: train by pid 4242 on gpu-node-07 .*--break-lock"):
            attempt()
    assert not (root / "output" / "tiny").exists()
    with locks.hold_run(root, "tiny", "collect", break_lock=True) as held:
        assert held.warnings and held.warnings[0].startswith("broke the lock of train by pid 4242 on gpu-node-07")
    assert locks.holder(lock) is None


def test_one_run_trains_once_at_a_time_while_another_run_trains_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("accelerate", reason="the stand-in is launched through accelerate, as kohya is")
    root = make_project(tmp_path, monkeypatch, runs=("tiny", "other"))
    first = start_train(root, "tiny", until="locked")  # kohya starts meanwhile
    try:
        for again in (dict(), dict(resume=True), dict(new=True)):
            start = time.monotonic()
            with pytest.raises(LockedError) as refused:
                train.train(Path("runs/tiny.toml"), project_root=root, **again)
            assert time.monotonic() - start < 5
            assert f"run 'tiny' is in use: train by pid {first.pid} on {socket.gethostname()}" in str(refused.value)
        with pytest.raises(LockedError, match=f"pid {first.pid}"):
            collect.collect("tiny", project_root=root)
        assert not (root / "output" / "tiny.1").exists()  # --new renamed nothing
        assert runstate.run_state(root, "tiny") == runstate.RunState.RUNNING

        dead = _dead_pid()
        _left_behind(locks.run_lock(root, "other"), pid=dead, host=socket.gethostname())
        beside = train.train(Path("runs/other.toml"), project_root=root)  # a different run, at the same time
        assert beside.returncode == 0 and beside.state == runstate.RunState.FINISHED
        assert any(f"took over a stale lock: train by pid {dead}" in w for w in beside.warnings)
        assert runstate.run_state(root, "other") == runstate.RunState.FINISHED
        assert first.poll() is None  # the first one still trains
    finally:
        first.terminate()
        first.communicate(timeout=60)


def test_generate_into_a_folder_being_generated_refuses(tmp_path: Path) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text('[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["a"]\ncount = 6\n')
    out = tmp_path / "synthetic" / "p"
    holder = _hold_elsewhere(locks.folder_lock(out))
    try:
        with pytest.raises(LockedError, match=f"is in use: train by pid {holder.pid}"):
            generate.generate(plan, out=out, show_progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_the_record_alone_is_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some cluster filesystems refuse flock (ENOLCK): the record is then created exclusively (a hard link),
    and a stale one is replaced only with --break-lock, since no kernel lock rules out a racing takeover."""
    import errno
    import fcntl

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / "run-tiny.lock"
    refusals: list[BaseException] = []

    def other_thread() -> None:
        try:
            with locks.holding(lock, "run 'tiny'", "train"):
                pass
        except LockedError as exc:
            refusals.append(exc)

    with locks.holding(lock, "run 'tiny'", "train") as held:
        assert locks.holder(lock) == held.record
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(refusals) == 1 and f"train by pid {os.getpid()}" in str(refusals[0])
    assert locks.holder(lock) is None

    dead = _dead_pid()
    _left_behind(lock, pid=dead, host=socket.gethostname())
    with pytest.raises(LockedError, match=f"stale lock: train by pid {dead} .*no file locks.*--break-lock"):
        with locks.holding(lock, "run 'tiny'", "train"):
            pass
    with locks.holding(lock, "run 'tiny'", "train", break_lock=True) as held:
        assert "took over a stale lock" in held.warnings[0] and locks.holder(lock) == held.record
