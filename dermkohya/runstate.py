"""One vocabulary for where a run stands, and one function that reads it from the run's files.

Why from files: every stage leaves files a person can read, so the state needs no daemon or database and
any command (train, collect, a future status page or job queue) derives the same answer:

    rendered   runs/<run>/manifest.json exists (render ran), nothing launched yet
    queued     waiting in the job queue (the queue's own record says so; never derived here)
    running    a live dermkohya holds the run's lock to train it
    finished   kohya ended with the LoRA written (output/<run>/manifest.json)
    failed     kohya or a check failed, or dermkohya died without recording an end (SIGKILL, OOM killer)
    stopped    a signal or a failed check stopped kohya (the launch manifest's `stopped` says which)
    collected  the finished run's LoRA is filed in artifacts/<run>/

`train` records the state it ended in (and `running` while it runs) in the launch manifest.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dermkohya import locks
from dermkohya.manifests import LaunchStatus, launch_status


class RunState(StrEnum):
    RENDERED = "rendered"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    COLLECTED = "collected"


class Stop(BaseModel):
    """Why kohya was stopped before it ended by itself: the launch manifest's one `stopped` field."""

    model_config = ConfigDict(extra="forbid")

    cause: Literal["signal", "check"]
    signal: str | None = None  # "SIGTERM", "SIGINT", "SIGHUP" (cause "signal")
    message: str | None = None  # the failed check's error (cause "check")


def ended(returncode: int, wrote_lora: bool, stopped: Stop | None) -> RunState:
    """The state a launch ended in."""
    if stopped is not None:
        return RunState.STOPPED
    return RunState.FINISHED if returncode == 0 and wrote_lora else RunState.FAILED


def _collected(root: Path, name: str, launch: LaunchStatus | None) -> bool:
    """An artifact filed from this launch (its manifest carries the launch's start time), or any artifact
    when no launch manifest is left to compare with."""
    folder = root / "artifacts" / name
    if not folder.is_dir():
        return False
    for path in folder.glob("manifest*.json"):
        record = launch_status(path)
        if record is not None and (launch is None or record.started == launch.started):
            return True
    return False


def run_state(root: Path, name: str) -> RunState | None:
    """Where run `name` of the project at `root` stands; None when it has not even been rendered."""
    root = Path(root)
    holder = locks.holder(locks.run_lock(root, name))
    if holder is not None and holder.purpose == "train" and locks.alive(holder) is not False:
        return RunState.RUNNING
    launch = launch_status(root / "output" / name / "manifest.json")
    if launch is not None and (launch.state is not None or launch.exit_code is not None):
        if _collected(root, name, launch):
            return RunState.COLLECTED
        recorded = launch.state
        if recorded == RunState.RUNNING:
            return RunState.FAILED  # no live holder: dermkohya died without recording how it ended
        if recorded in set(RunState):
            return RunState(recorded)
        if launch.exit_code == 0:  # written before states were recorded
            return RunState.FINISHED
        return RunState.STOPPED if launch.interrupted else RunState.FAILED
    if _collected(root, name, None):
        return RunState.COLLECTED
    if (root / "runs" / name / "manifest.json").is_file():
        return RunState.RENDERED
    return None

