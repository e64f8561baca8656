"""kohya's whole process group ends with dermkohya: a stop signal stops it and is recorded; SIGKILL of
dermkohya (which runs no code) leaves it to the watchdog. Real processes throughout: a dermkohya in its own
Python process, the real `accelerate launch`, a stand-in for train_network.py (tests/_stand_in.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dermkohya import locks, runstate

from _processes import running
from _stand_in import make_project, start_train

pytest.importorskip("accelerate", reason="the stand-in is launched through accelerate, as kohya is")


def _gone_within(pid: int, seconds: float) -> float | None:
    """How long `pid` took to end, or None if it still runs after `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not running(pid):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _members(group: int) -> list[int]:
    """The live processes of a process group (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_stops_kohyas_group_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sig = signal.SIGTERM
    root = make_project(tmp_path, monkeypatch)
    dermkohya = start_train(root)
    kohya = int((root / "output" / "tiny" / "stand-in.pid").read_text())
    group = os.getpgid(kohya)
    assert group != os.getpgid(dermkohya.pid) and runstate.run_state(root, "tiny") == runstate.RunState.RUNNING
    dermkohya.send_signal(sig)
    out, _ = dermkohya.communicate(timeout=30)
    assert f"ENDED stopped {128 + sig.value}" in out, out
    assert not running(kohya) and _members(group) == []
    manifest = json.loads((root / "output" / "tiny" / "manifest.json").read_text())
    assert {k: v for k, v in manifest["stopped"].items() if v is not None} == {"cause": "signal", "signal": sig.name}
    assert manifest["state"] == "stopped" and manifest["exit_code"] == 128 + sig.value
    assert runstate.run_state(root, "tiny") == runstate.RunState.STOPPED
    assert locks.holder(locks.run_lock(root, "tiny")) is None  # released: the next train may start


def test_sigkill_of_dermkohya_leaves_no_kohya_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path, monkeypatch)
    dermkohya = start_train(root)
    kohya = int((root / "output" / "tiny" / "stand-in.pid").read_text())
    group = os.getpgid(kohya)
    dermkohya.kill()  # SIGKILL: dermkohya runs no code at all
    dermkohya.wait(timeout=10)
    took = _gone_within(kohya, 10)
    assert took is not None, "train_network.py still runs 10 s after dermkohya was killed"
    assert _gone_within_group(group, 5)
    # It never recorded how it ended; with no live holder of the lock the run reads as failed, and the
    # kernel dropped the lock with its holder, so the next train takes it over with a warning.
    assert json.loads((root / "output" / "tiny" / "manifest.json").read_text())["state"] == "running"
    assert runstate.run_state(root, "tiny") == runstate.RunState.FAILED
    with locks.hold_run(root, "tiny", "train") as held:
        assert held.warnings and "took over a stale lock" in held.warnings[0] and f"pid {dermkohya.pid}" in held.warnings[0]


def _gone_within_group(group: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


_CHILD = """
import signal, subprocess, sys, time
stubborn = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if sys.argv[2] == "stubborn" else ""
if stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that ignores SIGTERM: SIGKILL must follow
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; " + stubborn + "time.sleep(120)"])
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(120)
"""

_DRIVER = """
import json, os, sys
from pathlib import Path
from dermkohya import kohya, locks
folder = Path(sys.argv[1])
with locks.holding(folder / "run-x.lock", "run 'x'", "train") as held:
    result = kohya.launch([sys.executable, "-c", sys.argv[2], str(folder / "grandchild.pid"), sys.argv[3]], cwd=folder,
                          log_path=folder / "log.txt", env=dict(os.environ), hold_fds=(held.fd,))
print(json.dumps({"stop_signal": result.stop_signal, "interrupted": result.interrupted}), flush=True)
"""


def _launch_with_grandchild(tmp_path: Path, *, stubborn: bool = False) -> tuple[subprocess.Popen[str], int]:
    """kohya.launch alone (no accelerate, fast): the process two levels below is what must not survive."""
    pid_file = tmp_path / "grandchild.pid"
    process = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), _CHILD, "stubborn" if stubborn else "plain"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    return process, int(pid_file.read_text())


def test_the_watchdog_stops_a_grandchild_that_ignores_sigterm_when_dermkohya_is_killed(tmp_path: Path) -> None:
    process, grandchild = _launch_with_grandchild(tmp_path, stubborn=True)
    group = os.getpgid(grandchild)
    process.kill()
    process.wait()
    # The watchdog keeps the run's lock until kohya's group has gone: no new train starts beside a dying one.
    lock = tmp_path / "run-x.lock"
    with pytest.raises(locks.LockedError, match=f"(?s)pid {process.pid} .*has ended and its kohya is being stopped"):
        with locks.holding(lock, "run 'x'", "train"):
            pass
    assert _gone_within(grandchild, 10) is not None and _gone_within_group(group, 2)
    time.sleep(0.2)
    with locks.holding(lock, "run 'x'", "train") as held:
        assert "took over a stale lock" in held.warnings[0]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_each_stop_signal_stops_the_group_and_is_named(tmp_path: Path, sig: signal.Signals) -> None:
    process, grandchild = _launch_with_grandchild(tmp_path)
    group = os.getpgid(grandchild)
    process.send_signal(sig)
    out, _ = process.communicate(timeout=60)
    assert json.loads(out.splitlines()[-1]) == {"stop_signal": sig.name, "interrupted": True}
    assert not running(grandchild) and _members(group) == []
