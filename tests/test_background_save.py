"""kohya's LoRA file written on a writer thread (dermkohya/networks/background_save.py): whole files under their
final names only, writes in the order submitted, a failure raised by the next save, a failure at the end of a run
an exit status of 1, and safetensors' bytes written without holding the GIL."""

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
    saver.threads[-1].join()  # the write has failed: the next save says so
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


def test_writes_run_in_the_order_submitted_and_at_most_two_wait(tmp_path: Path) -> None:
    saver = BackgroundSaver()
    order: list[str] = []
    release = threading.Event()
    saver.submit_job(lambda: (release.wait(10), order.append("lora")), "lora")
    saver.submit_job(lambda: order.append("state"), "state")
    assert len(saver.threads) == 2 and order == []  # both pending behind the held write
    release.set()
    saver.submit_job(lambda: order.append("next lora"), "next lora")  # waited for the oldest, not for all
    saver.wait()
    assert order == ["lora", "state", "next lora"] and not saver.threads


def test_safetensors_on_the_writer_thread_are_the_same_bytes_as_save_file(tmp_path: Path) -> None:
    import safetensors.torch as st
    import torch

    BackgroundSaver()  # routes save_file on the writer thread
    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(4)}
    st.save_file(tensors, str(tmp_path / "caller.safetensors"), {"k": "v"})
    saver = BackgroundSaver()
    saver.submit(lambda path: st.save_file(tensors, path, {"k": "v"}), str(tmp_path / "writer.safetensors"))
    saver.wait()
    assert st.save_file.__wrapped__ is not st.save_file
    assert (tmp_path / "writer.safetensors").read_bytes() == (tmp_path / "caller.safetensors").read_bytes()
