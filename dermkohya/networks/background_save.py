"""kohya's LoRA file written on a thread of its own while training goes on (lora_fast `save_copy=background`).

At each epoch end kohya stops training to save the LoRA: cast to the save precision, serialise, hash
(sshs_model_hash: the whole file through sha256), write. The weights are copied to the host first, in one
transfer (host_copy.py), so the copy is the epoch's weights whatever the optimizer does next; the rest runs
on a writer thread, kohya's own `save_weights` code on that copy, into a hidden folder beside the file,
then moved into place (`os.replace`): a file under its final name is always whole, even if the process dies
while writing.

One write at a time: the next save waits for the one before and raises its failure, if any. Python waits
for the writer before the process ends (a non-daemon thread); a failure nobody was left to raise ends the
process with exit status 1 once the interpreter has finished, so a run whose last file failed does not
exit 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

WRITING_DIR = ".dermkohya-writing"  # beside the file: the same filesystem, so the move is atomic


class BackgroundSaver:
    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.failure: tuple[str, BaseException] | None = None
        atexit.register(self._at_exit)

    def submit(self, write: Callable[[str], None], file: str) -> None:
        """Run `write(path)` on the writer thread, then move `path` to `file`."""
        self.wait()
        final = Path(file)
        folder = final.parent / WRITING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / final.name

        def run() -> None:
            try:
                write(str(partial))
                os.replace(partial, final)
            except BaseException as exc:  # raised by the next save, or reported at exit
                self.failure = (file, exc)
                logger.error("dermkohya lora_fast: writing %s failed:\n%s", file, traceback.format_exc())
                partial.unlink(missing_ok=True)
            finally:
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    pass

        self.thread = threading.Thread(target=run, name="dermkohya-lora-save", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        """Until the write in flight is done; raises its failure."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failure is not None:
            file, exc = self.failure
            self.failure = None
            raise RuntimeError(f"dermkohya lora_fast: saving {file} failed: {type(exc).__name__}: {exc}") from exc

    def _at_exit(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.failure is not None:
            file, exc = self.failure
            print(f"dermkohya lora_fast: saving {file} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
