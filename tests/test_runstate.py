"""A run's state, read from the files each stage leaves (no process needed: the lock's holder is one)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from dermkohya import locks
from dermkohya.runstate import RunState, Stop, ended, run_state


def _write(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_each_stage_leaves_its_state(tmp_path: Path) -> None:
    assert run_state(tmp_path, "x") is None
    _write(tmp_path / "runs" / "x" / "manifest.json", {"run_name": "x"})
    assert run_state(tmp_path, "x") == RunState.RENDERED

    launch = tmp_path / "output" / "x" / "manifest.json"
    _write(launch, {"run_name": "x", "started": "2026-11-30T10:00:00+00:00", "state": "running"})
    with locks.hold_run(tmp_path, "x", "train"):
        assert run_state(tmp_path, "x") == RunState.RUNNING
    assert run_state(tmp_path, "x") == RunState.FAILED  # "running", and nobody holds the lock: dermkohya died

    _write(launch, {"started": "2026-11-30T10:00:00+00:00", "state": "finished", "exit_code": 0})
    with locks.hold_run(tmp_path, "x", "collect"):  # collecting is not training
        assert run_state(tmp_path, "x") == RunState.FINISHED
    _write(tmp_path / "artifacts" / "x" / "manifest.json", {"started": "2026-11-30T10:00:00+00:00"})
    assert run_state(tmp_path, "x") == RunState.COLLECTED
    _write(launch, {"started": "2026-11-30T12:00:00+00:00", "state": "stopped", "exit_code": 143,
                    "stopped": {"cause": "signal", "signal": "SIGTERM"}})
    assert run_state(tmp_path, "x") == RunState.STOPPED  # a later launch (--new) is not the collected one


def test_a_dead_holder_is_not_running_and_old_manifests_still_read(tmp_path: Path) -> None:
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    lock = locks.run_lock(tmp_path, "x")
    lock.parent.mkdir(parents=True)
    locks.LockRecord(what="run 'x'", purpose="train", pid=dead, host=socket.gethostname(), since="2026-11-30T09:00:00+00:00",
                     command=["dermkohya", "train"]).write(locks.record_path(lock))
    _write(tmp_path / "output" / "x" / "manifest.json", {"exit_code": 0})  # before states were recorded
    assert run_state(tmp_path, "x") == RunState.FINISHED
    _write(tmp_path / "output" / "x" / "manifest.json", {"exit_code": 130, "interrupted": True})
    assert run_state(tmp_path, "x") == RunState.STOPPED


def test_how_a_launch_ended() -> None:
    assert ended(0, True, None) == RunState.FINISHED
    assert ended(0, False, None) == RunState.FAILED  # kohya's exit 0 without a LoRA
    assert ended(1, False, None) == RunState.FAILED
    assert ended(143, False, Stop(cause="signal", signal="SIGTERM")) == RunState.STOPPED
    assert Stop(cause="check", message="different checkpoint").model_dump(exclude_none=True) == {
        "cause": "check", "message": "different checkpoint"}

