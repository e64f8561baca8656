"""kohya's LoRA file written on a writer thread (dermkohya/networks/background_save.py): whole files under their
final names only, a failure raised by the next save, and a failure at the end of a run an exit status of 1."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from dermkohya.networks.background_save import WRITING_DIR, BackgroundSaver


def test_the_file_appears_whole_under_its_name_after_the_write(tmp_path: Path) -> None:
    saver = BackgroundSaver()
    release = threading.Event()
    seen: dict[str, object] = {}

    def write(path: str) -> None:
        Path(path).write_bytes(b"half")
        release.wait(10)  # the writer is still busy here: the final name must not exist yet
        seen["final_exists_while_writing"] = (tmp_path / "out" / "lora.safetensors").exists()
        with open(path, "ab") as f:
            f.write(b" and whole")

    saver.submit(write, str(tmp_path / "out" / "lora.safetensors"))
    assert saver.thread is not None and saver.thread.name == "dermkohya-lora-save"
    release.set()
    saver.wait()
    assert seen["final_exists_while_writing"] is False
    assert (tmp_path / "out" / "lora.safetensors").read_bytes() == b"half and whole"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora.safetensors"]  # no writing folder left


def test_a_failed_write_is_raised_by_the_next_save_and_leaves_no_file(tmp_path: Path) -> None:
    saver = BackgroundSaver()

    def fail(path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    saver.submit(fail, str(tmp_path / "a.safetensors"))
    with pytest.raises(RuntimeError, match=r"saving .*a\.safetensors failed: OSError: .*No space left"):
        saver.submit(lambda path: Path(path).write_bytes(b"b"), str(tmp_path / "b.safetensors"))
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / WRITING_DIR).exists()
    saver.submit(lambda path: Path(path).write_bytes(b"b"), str(tmp_path / "b.safetensors"))  # the failure was said once
    saver.wait()
    assert (tmp_path / "b.safetensors").read_bytes() == b"b"


SCRIPT = """
import sys, time
from pathlib import Path
from dermkohya.networks.background_save import BackgroundSaver
saver = BackgroundSaver()
def write(path):
    time.sleep(0.3)  # still writing when the main program ends
    if sys.argv[2] == "fail":
        raise OSError("disk gone")
    Path(path).write_bytes(b"lora")
saver.submit(write, sys.argv[1])
print("main program done", flush=True)
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_the_process_waits_for_the_last_write_and_a_failure_exits_1(tmp_path: Path, outcome: str) -> None:
    target = tmp_path / "last.safetensors"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(target), outcome],
                          capture_output=True, text=True, timeout=60)
    assert "main program done" in done.stdout
    if outcome == "ok":
        assert done.returncode == 0 and target.read_bytes() == b"lora"
    else:
        assert done.returncode == 1 and not target.exists()
        assert f"saving {target} failed: OSError: disk gone" in done.stderr
