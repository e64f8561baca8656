"""kohya's keeper: the leader of kohya's process group, which takes the whole group down when dermkohya dies.

Why a process of its own. kohya runs in its own process group (so a terminal's Ctrl-C reaches dermkohya
first, which stops kohya in order and records why). But when dermkohya dies by SIGKILL (the OOM killer,
a closed terminal, `kill -9`) it runs no code, and nothing would stop kohya; a parent-death signal would
reach only accelerate's launcher, not `train_network.py` below it. So dermkohya starts this script as the
group's leader and it starts kohya as its child, in the same group. It watches two things, each enough
alone: a pipe whose write end only dermkohya holds (end of file: dermkohya is gone) and its parent pid.
When dermkohya is gone it sends the group SIGTERM, waits a few seconds for kohya, then SIGKILL (itself
included). Otherwise it waits for kohya and leaves with kohya's exit status, a signal death included.

Run with dermkohya's Python as `python -I watchdog.py FD -- ARGV...`; standard library only (starts in
milliseconds, imports nothing of dermkohya).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

GRACE_S = 5.0  # between SIGTERM and SIGKILL once dermkohya is gone


def _note(signum: int, frame: object) -> None:
    """Signals sent to the group are for kohya; the keeper stays until kohya has gone."""


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    command = argv[3:] if argv[2:3] == ["--"] else argv[2:]
    parent = os.getppid()
    # Handled, not ignored: an ignored signal would stay ignored in kohya after exec.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _note)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"dermkohya could not start {command[0]}: {exc}", file=sys.stderr, flush=True)
        return 127
    os.set_blocking(fd, False)
    while True:
        status = child.poll()
        # Checked after kohya's launcher ended too: with dermkohya gone it may die of a broken pipe first,
        # leaving train_network.py below it running.
        if _orphaned(fd, parent, wait=0.5 if status is None else 0):
            _stop_group(child)
        if status is not None:
            return _leave(status)


def _orphaned(fd: int, parent: int, wait: float) -> bool:
    """dermkohya is gone: the pipe's write end closed (end of file) or this process has a new parent."""
    if os.getppid() != parent:
        return True
    ready, _, _ = select.select([fd], [], [], wait)
    if not ready:
        return False
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """dermkohya is gone: nobody reads kohya's output or will collect its result. Stop everything."""
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # kohya's own children, if any, see their parent go
    os.killpg(0, signal.SIGKILL)  # whatever is left, and this keeper


def _leave(status: int) -> int:
    if status < 0:  # kohya died of a signal: so does its keeper, so dermkohya sees the same status
        try:
            signal.signal(-status, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP are never handled anyway
        os.kill(os.getpid(), -status)
        time.sleep(1)
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
