"""kohya's epoch-end files written on a thread of their own while training goes on (lora_fast `save_copy=background`).

At each epoch end kohya stops training to save the LoRA (cast to the save precision, serialise, hash:
sshs_model_hash runs the whole file through sha256, write) and, with `save_state` (dermkohya's default),
accelerate's state (background_state.py). What is saved is copied to the host first, in one transfer per
dtype (host_copy.py), so it is the epoch's whatever the optimizer does next; the writing runs on a writer
thread, into a hidden folder beside the final name, then moved into place (`os.replace`): a file or state
folder under its final name is always whole, even if the process dies while writing.

Writes run one after another, in the order they were submitted: a LoRA file, then its epoch's state. A
submit waits only while two writes are already pending (the host copies they hold are bounded) and raises
the failure of any write before it. Python waits for the writer before the process ends (non-daemon
threads); a failure nobody was left to raise ends the process with exit status 1 once the interpreter has
finished, so a run whose last file failed does not exit 0.

safetensors' `save_file` holds the GIL while it writes (measured: the training thread stood still for 0.45 s
of a 400 MB file); on the writer thread it is served by `safetensors.torch.save` (the same bytes) and a plain
file write, which lets the training thread run. Callers on any other thread get `save_file` itself.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WRITING_DIR = ".dermkohya-writing"  # beside the file: the same filesystem, so the move is atomic
THREAD_NAME = "dermkohya-lora-save"
MAX_PENDING = 2
_FOLDERS = threading.Lock()  # a writing folder made by the caller is never removed by the writer meanwhile


class BackgroundSaver:
    def __init__(self) -> None:
        self.threads: collections.deque[threading.Thread] = collections.deque()
        self.failure: tuple[str, BaseException] | None = None
        _serve_save_file_without_gil()
        atexit.register(self._at_exit)

    @property
    def thread(self) -> threading.Thread | None:
        """The write submitted last, while it may still run."""
        return self.threads[-1] if self.threads else None

    def submit(self, write: Callable[[str], None], file: str) -> None:
        """Run `write(path)` on the writer thread, then move `path` to `file`."""
        self._raise_failure()
        final = Path(file)
        folder = final.parent / WRITING_DIR
        make_folder(folder)
        partial = folder / final.name

        def job() -> None:
            try:
                write(str(partial))
                os.replace(partial, final)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            finally:
                remove_if_empty(folder)

        self.submit_job(job, file)

    def submit_job(self, job: Callable[[], None], what: str) -> None:
        """Run `job()` on the writer thread after the writes submitted before it; `what` names it in a failure."""
        self._raise_failure()
        while len(self.threads) >= MAX_PENDING:
            self.threads.popleft().join()
            self._raise_failure()
        before = self.threads[-1] if self.threads else None

        def run() -> None:
            if before is not None:
                before.join()
            try:
                job()
            except BaseException as exc:  # raised by the next save, or reported at exit
                self.failure = (what, exc)
                logger.error("dermkohya lora_fast: writing %s failed:\n%s", what, traceback.format_exc())

        thread = threading.Thread(target=run, name=THREAD_NAME, daemon=False)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> None:
        """Until every write submitted is done; raises a failure."""
        while self.threads:
            self.threads.popleft().join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        while self.threads and not self.threads[0].is_alive():
            self.threads.popleft()
        if self.failure is not None:
            what, exc = self.failure
            self.failure = None
            raise RuntimeError(f"dermkohya lora_fast: saving {what} failed: {type(exc).__name__}: {exc}") from exc

    def _at_exit(self) -> None:
        for thread in list(self.threads):
            thread.join()
        if self.failure is not None:
            what, exc = self.failure
            print(f"dermkohya lora_fast: saving {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(1)


def make_folder(folder: Path) -> None:
    with _FOLDERS:
        folder.mkdir(parents=True, exist_ok=True)


def remove_if_empty(folder: Path) -> None:
    with _FOLDERS:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): another write uses it
            pass


def on_writer_thread() -> bool:
    return threading.current_thread().name == THREAD_NAME


def write_safetensors(tensors: dict[str, Any], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' own bytes for `tensors`, written by a plain file write (which releases the GIL)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


def _serve_save_file_without_gil() -> None:
    """Route `safetensors.torch.save_file` on the writer thread through `write_safetensors` (kohya's
    `save_weights` imports it when it runs); once per process."""
    import safetensors.torch as st

    if getattr(st.save_file, "_dermkohya_writer", False):
        return
    original = st.save_file

    def save_file(tensors: dict[str, Any], filename: Any, metadata: dict[str, str] | None = None) -> None:
        if on_writer_thread():
            write_safetensors(tensors, os.fspath(filename), metadata)
        else:
            original(tensors, filename, metadata)

    save_file._dermkohya_writer = True  # type: ignore[attr-defined]
    save_file.__wrapped__ = original  # type: ignore[attr-defined]
    st.save_file = save_file
