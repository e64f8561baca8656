"""The launcher: progress parsing, exit codes, logs, Ctrl-C, and the sd-scripts/Python checks.

The stand-in scripts here test subprocess handling only; that training works is proven by the
`kohya`-marked tests in test_train.py, which run the real train_network.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dermkohya import kohya
from dermkohya.errors import DermkohyaError

from _processes import running

TQDM_LINES = [
    "steps:   0%|          | 0/18 [00:00<?, ?it/s]",
    "steps:  50%|█████     | 9/18 [00:27<00:27, 3.05s/it, avr_loss=0.152]",
    "steps: 100%|██████████| 18/18 [00:20<00:00,  2.80it/s, avr_loss=0.0931]",
]


def test_parse_progress_reads_kohya_tqdm_lines() -> None:
    start, middle, end = (kohya.parse_progress(line) for line in TQDM_LINES)
    assert start and (start.step, start.total, start.it_per_s, start.loss) == (0, 18, None, None)
    assert middle and (middle.step, middle.total, middle.loss) == (9, 18, 0.152)
    assert middle.it_per_s == pytest.approx(1 / 3.05)
    assert end and (end.step, end.it_per_s, end.loss) == (18, 2.80, 0.0931)
    assert kohya.parse_progress("epoch 1/3") is None


def _stand_in(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "stand_in.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_launch_streams_lines_keeps_the_log_and_passes_the_exit_code(tmp_path: Path) -> None:
    argv = _stand_in(tmp_path, """
        import sys
        print("loading model")
        for i in range(1, 4):
            sys.stderr.write(f"\\rsteps:  {i*33}%|███| {i}/3 [00:01<00:01, 2.00it/s, avr_loss=0.{i}]")
            sys.stderr.flush()
        print("\\nCUDA out of memory. Tried to allocate 2.00 GiB")
        sys.exit(3)
    """)
    seen: list[str] = []
    log = tmp_path / "out" / "train.log"
    result = kohya.launch(argv, cwd=tmp_path, log_path=log, env=dict(os.environ), on_line=seen.append)
    assert result.returncode == 3 and not result.interrupted
    steps = [p for p in map(kohya.parse_progress, seen) if p]
    assert [p.step for p in steps] == [1, 2, 3] and steps[-1].loss == 0.3
    assert "avr_loss=0.3" in log.read_text() and log.read_text().startswith("$ ")
    assert kohya.hint_for(result.tail) and "batch_size" in kohya.hint_for(result.tail)


def test_ctrl_c_stops_kohyas_whole_process_group(tmp_path: Path) -> None:
    """SIGINT to dermkohya reaches kohya's group (accelerate and its workers), and nothing is left running."""
    pid_file = tmp_path / "grandchild.pid"
    child = _stand_in(tmp_path, f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        print("ready", flush=True)
        time.sleep(120)
    """)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        from dermkohya import kohya
        result = kohya.launch({child!r}, cwd=Path({str(tmp_path)!r}), log_path=Path({str(tmp_path / 'log.txt')!r}), env=dict(os.environ))
        print(json.dumps({{"interrupted": result.interrupted, "returncode": result.returncode}}))
    """))
    process = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert '"interrupted": true' in out
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not running(grandchild)


def test_missing_sd_scripts_and_python_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(tmp_path))
    with pytest.raises(DermkohyaError, match="SD_SCRIPTS_DIR=.*make setup"):
        kohya.find_sd_scripts()
    monkeypatch.setenv("KOHYA_PYTHON", str(tmp_path / "python"))
    with pytest.raises(DermkohyaError, match="KOHYA_PYTHON=.*make setup"):
        kohya.find_python()


def test_another_commit_warns_and_strict_refuses(tmp_path: Path) -> None:
    repo = tmp_path / "sd-scripts"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "train_network.py").write_text("# not kohya\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    warning = kohya.verify_commit(repo)
    assert warning and kohya.PINNED_COMMIT[:12] in warning and "checkout" in warning
    with pytest.raises(DermkohyaError, match="--strict"):
        kohya.verify_commit(repo, strict=True)
    assert "not a git checkout" in (kohya.verify_commit(tmp_path) or "")
    copy = repo / "copies" / "sd-scripts"  # a plain copy inside another repository is not that repository
    copy.mkdir(parents=True)
    (copy / "train_network.py").write_text("# not kohya\n")
    assert kohya.sd_scripts_commit(copy) is None and kohya.sd_scripts_commit(repo)
    assert "not a git checkout" in (kohya.verify_commit(copy) or "")


def test_a_python_without_kohyas_requirements_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMKOHYA_CACHE", str(tmp_path / "cache"))
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    with pytest.raises(DermkohyaError, match="lacks: torch"):
        kohya.verify_python(venv / "bin" / "python")
