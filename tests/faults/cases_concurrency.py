"""Concurrency and supervision: locks.py, runstate.py and the watchdog (tests/test_locks.py and
tests/test_supervision.py prove them in depth; these cases run their scenarios as a user meets them,
through their helpers, with real processes: a dermkohya in its own process, the real `accelerate launch`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from dermkohya import locks, runstate

from _processes import running
from _stand_in import start_train
from test_locks import _dead_pid, _hold_elsewhere, _left_behind
from test_supervision import _gone_within, _gone_within_group, _launch_with_grandchild, _members

from .cases_disk import finished_run
from .project import RUN, Project, refused, succeeded
from .registry import case

A = "concurrency and supervision"


def _stop(process) -> None:
    process.terminate()
    process.communicate(timeout=60)


@case("lock-same-run-twice", A, "a second `train` (or `collect`) of a run while a dermkohya trains it",
      "refuses within seconds: names the holder (pid, host, since, its command) and how to stop it; the first goes on")
def _(project: Project) -> None:
    project.freeze()
    first = start_train(project.root, until="locked")
    try:
        start = time.monotonic()
        ran = project.cli("train", "runs/tiny.toml", process=True)
        refused(ran, f"run 'tiny' is in use: train by pid {first.pid} on {socket.gethostname()} since", f"kill {first.pid}", code=1)
        assert time.monotonic() - start < 30
        refused(project.cli("collect", "tiny", process=True), f"pid {first.pid}", code=1)
        assert first.poll() is None
    finally:
        _stop(first)


@case("two-runs-at-once", A, "two different runs of one project trained at the same time",
      "works: each run has its own lock and output folder; both finish")
def _(project: Project) -> None:
    project.write("runs/other.toml", RUN)
    project.freeze()
    first = start_train(project.root)  # kohya of run tiny is running
    try:
        succeeded(project.cli("train", "runs/other.toml", process=True), "trained", "collected")
        assert first.poll() is None and runstate.run_state(project.root, "tiny") == runstate.RunState.RUNNING
    finally:
        _stop(first)
    assert (project.root / "artifacts/other/other.safetensors").is_file()


@case("lock-stale", A, "a lock left by a dermkohya that died on this host (SIGKILL, OOM killer, power loss)",
      "works: the lock is taken over with a warning naming the dead holder")
def _(project: Project) -> None:
    finished_run(project)
    dead = _dead_pid()
    _left_behind(locks.run_lock(project.root, "tiny"), pid=dead, host=socket.gethostname())
    project.freeze()
    succeeded(project.cli("collect", "tiny"), f"took over a stale lock: train by pid {dead} on {socket.gethostname()}",
              "collected")
    assert locks.holder(locks.run_lock(project.root, "tiny")) is None


@case("lock-other-host", A, "a lock held from another host (a shared filesystem): this host cannot tell if it still runs",
      "refuses: names the host and pid and says --break-lock takes it once that dermkohya is known to be gone")
def _(project: Project) -> None:
    _left_behind(locks.run_lock(project.root, "tiny"), pid=4242, host="gpu-node-07")
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml"), "locked from another host: train by pid 4242 on gpu-node-07", "--break-lock", code=1)
    assert not (project.root / "output/tiny").exists()


@case("generate-same-plan-twice", A, "`generate` into a folder another `generate` is writing",
      "refuses at once naming the holder; the folder is left to the first")
def _(project: Project) -> None:
    project.write("plans/p.toml", '[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["a"]\ncount = 6\n')
    project.freeze()
    holder = _hold_elsewhere(locks.folder_lock(project.root / "synthetic/p"))
    try:
        refused(project.cli("generate", "plans/p.toml"), f"is in use: train by pid {holder.pid}", code=1)
        assert not (project.root / "synthetic/p").exists()
    finally:
        holder.kill()
        holder.wait()


@case("stop-signals", A, "SIGTERM (kill, SLURM), SIGINT (Ctrl-C) or SIGHUP (closed terminal) to a training dermkohya",
      "stops kohya's whole process group; SIGTERM's run is recorded as stopped by SIGTERM, exit 143")
def _(project: Project) -> None:
    project.freeze()
    dermkohya = start_train(project.root)
    kohya = int((project.root / "output/tiny/stand-in.pid").read_text())
    group = os.getpgid(kohya)
    dermkohya.send_signal(signal.SIGTERM)
    out, _ = dermkohya.communicate(timeout=60)
    assert "ENDED stopped 143" in out, out
    assert not running(kohya) and _members(group) == []
    manifest = json.loads((project.root / "output/tiny/manifest.json").read_text())
    stopped = manifest["stopped"]
    assert (stopped["cause"], stopped["signal"], manifest["state"]) == ("signal", "SIGTERM", "stopped"), manifest
    for sig in (signal.SIGINT, signal.SIGHUP):
        folder = project.tmp / sig.name
        folder.mkdir()
        process, grandchild = _launch_with_grandchild(folder)
        group = os.getpgid(grandchild)
        process.send_signal(sig)
        out, _ = process.communicate(timeout=60)
        assert json.loads(out.splitlines()[-1]) == {"stop_signal": sig.name, "interrupted": True}
        assert not running(grandchild) and _members(group) == []


@case("sigkill-no-orphan", A, "SIGKILL of a training dermkohya (it runs no code at all)",
      "kohya's group is gone within 10 s (its watchdog), the run reads as failed, the next train takes the lock over")
def _(project: Project) -> None:
    project.freeze()
    dermkohya = start_train(project.root)
    kohya = int((project.root / "output/tiny/stand-in.pid").read_text())
    group = os.getpgid(kohya)
    dermkohya.kill()
    dermkohya.wait(timeout=10)
    assert _gone_within(kohya, 10) is not None, "train_network.py still runs 10 s after dermkohya was killed"
    assert _gone_within_group(group, 5)
    assert runstate.run_state(project.root, "tiny") == runstate.RunState.FAILED
    with locks.hold_run(project.root, "tiny", "train") as held:
        assert held.warnings and f"pid {dermkohya.pid}" in held.warnings[0]
