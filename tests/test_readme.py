"""The README's shell commands, run as a reader would run them, in a copy of this repository.

Every `dermkohya …` line of a ```bash block is either run here (it needs no GPU, no sd-scripts and no
weights) and must exit 0, or its subcommand is listed in NOT_RUN with the reason and the test that covers
it instead. A new README command therefore forces a decision; a line with a placeholder (DATA, […], …), an
input file the reader brings (my_lora.json, sweeps/lr.toml) or a sweep that trains is shown, not run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

RUN = {"check", "render", "init", "demo-data", "adopt", "sweep", "runs", "inspect", "base info"}
NOT_RUN = {
    "train": "trains with kohya (tests/test_train.py, kohya-marked; make train)",
    "generate": "a diffusion model run (tests/test_generate.py)",
    "evaluate": "needs the metric weights (tests/test_evaluate.py)",
    "utility": "trains classifiers (tests/test_utility.py)",
    "serve": "a server process (tests/test_serve*.py)",
    "prepare": "needs a downloaded public dataset (tests/test_prepare.py)",
    "collect": "needs a trained run (tests/test_collect.py)",
    "merge": "runs sd-scripts' tools (tests/test_merge.py, kohya-marked)",
    "resize": "runs sd-scripts' tools (tests/test_merge.py, kohya-marked)",
    "base random-sd15": "builds a 2 GB model (tests/test_basemodel.py)",
    "base random-sdxl": "builds a 7 GB model (tests/test_basemodel.py, slow)",
    "base hash": "hashes a checkpoint the reader brings (tests/test_basemodel.py)",
}
PLACEHOLDER = re.compile(r"(^|\s)([A-Z][A-Z_]{2,}|\[.*\]|<[^>]+>)(\s|$)|…")


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks: continuations joined, comments dropped, `&&` chains kept."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def subcommand(argv: list[str]) -> str:
    words = [a for a in argv[1:] if not a.startswith("-")]
    if words[:1] == ["base"] and len(words) > 1:
        return f"base {words[1]}"
    return words[0] if words else ""


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tracked files (sd-scripts aside), plus the demo data a reader makes first."""
    root = tmp_path_factory.mktemp("readme")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        if source.is_file() and not name.startswith("vendor/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    for folder in ("datasets/demo/data", "data"):  # the demo's folder, and the card's data/ in its layout
        subprocess.run([_dermkohya(), "demo-data", folder, "--per-cell", "1", "--size", "64"], cwd=root, check=True,
                       capture_output=True)
    return root


def _dermkohya() -> str:
    return str(Path(sys.executable).with_name("dermkohya"))


def test_every_readme_command_is_run_or_says_why_not(copy: Path) -> None:
    ran, shown = [], []
    env = dict(os.environ, COLUMNS="200")
    for line in readme_commands():
        cwd = copy
        for part in (p.strip() for p in line.split("&&")):
            argv = shlex.split(part)
            if argv[0] == "cd" and len(argv) == 2:
                cwd = cwd / argv[1]
                continue
            if argv[0] != "dermkohya":
                shown.append(part)  # make, pip, git: the README's setup lines, run by CI and by hand
                continue
            name = subcommand(argv)
            assert name in RUN or name in NOT_RUN, f"README runs `{part}`: add `{name}` to RUN or NOT_RUN in {__file__}"
            inputs = [a for a in argv[2:] if not a.startswith("-") and Path(a).suffix in (".json", ".toml", ".sh")]
            trains = name == "sweep" and ("--render-only" not in argv and "--slurm" not in argv or "--submit" in argv)
            if name in NOT_RUN or trains or PLACEHOLDER.search(part) or any(not (cwd / a).exists() for a in inputs):
                shown.append(part)
                continue
            result = subprocess.run([_dermkohya(), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"README command `{part}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            assert "Traceback" not in result.stderr
            ran.append(part)
    assert len(ran) >= 4, f"only {ran} ran; shown: {shown}"
    assert any(r.startswith("dermkohya render") for r in ran) and any(r.startswith("dermkohya init") for r in ran)
