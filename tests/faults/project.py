"""A tiny dermkohya project for one fault case: a dataset, a run file, a base checkpoint, and a stand-in
for sd-scripts' train_network.py that `dermkohya train` launches through the real `accelerate launch`.

The stand-in (STAND_IN below) does what kohya does as far as dermkohya can see — parses kohya's options,
prints kohya's progress lines and messages, writes the LoRA and state folders — and fails the way kohya
fails when STAND_IN_FAULT says so. It proves what dermkohya does around kohya, never that training works
(tests/test_train.py trains with kohya itself).

`Project.freeze()` records a checksum of the user's files; the corpus test checks it after every case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dermkohya import basemodel, render

from _stand_in import STAND_IN_HEAD

RUN = """\
[model]
base = "models/base.safetensors"
[dataset]
train_data_dir = "data"
[network]
dim = 4
alpha = 4
[train]
resolution = 64
mixed_precision = "no"
epochs = 2
data_loader_workers = 0
persistent_data_loader_workers = false
"""

STAND_IN = STAND_IN_HEAD + r'''
def progress(loss):
    for step in (1, 2):
        sys.stderr.write(f"\rsteps: {step * 50}%|##| {step}/2 [00:01<00:00, 2.00it/s, avr_loss={loss}]")
        sys.stderr.flush()
    print()

def save_state(out, name, epoch):
    state = out / f"{name}-state"
    state.mkdir(exist_ok=True)
    shutil.copyfile(os.environ["STAND_IN_LORA"], state / "model.safetensors")
    for part in ("optimizer.bin", "scheduler.bin"):
        with zipfile.ZipFile(state / part, "w") as z:
            z.writestr("archive/data.pkl", b"kohya state")
    (state / "random_states_0.pkl").write_bytes(b"rng")
    (state / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": 2 * epoch}))

if __name__ == "__main__":
    flat = read_config(lenient=True)  # --resume and the like: not in known_keys.json
    out, name = Path(flat["output_dir"]), flat["output_name"]
    (out / "stand-in.argv.json").write_text(json.dumps(sys.argv[1:]))
    (out / "stand-in.pid").write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("STAND_IN_STARTUP_S", "0")))
    fault = os.environ.get("STAND_IN_FAULT", "ok")
    if fault == "oom":
        progress(0.1)
        print("Traceback (most recent call last):\n  File \"train_network.py\", line 1430, in train\n"
              "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 23.65 GiB")
        sys.exit(1)
    if fault == "nodata":
        print("No data found. Please verify arguments (train_data_dir must be the parent of folders with images)")
        sys.exit(0)
    if fault == "module":
        print("Traceback (most recent call last):\n  File \"train_network.py\", line 13, in <module>\n"
              "ModuleNotFoundError: No module named 'imagesize'")
        sys.exit(1)
    if fault == "xformers":
        print("Traceback (most recent call last):\n  File \"library/train_util.py\", line 3369, in replace_unet_modules\n"
              "ImportError: No xformers / xformersがインストールされていないようです")
        sys.exit(1)
    progress("nan" if fault == "nan" else 0.1)
    epochs = int(flat.get("max_train_epochs") or 1)
    if flat.get("save_state"):
        save_state(out, name, epochs)
    final = out / f"{name}.safetensors"
    with open(os.environ["STAND_IN_LORA"], "rb") as src, open(final, "wb") as dst:
        while chunk := src.read(65536):
            dst.write(chunk)  # kohya writes in place: a full disk fails half-way
    print("model saved.")
    if fault == "crash-after-save":
        raise RuntimeError("CUDA error: an illegal memory access was encountered (while freeing the cache)")
'''

# dermkohya's own CLI in its own process; kohya's environment is the stand-in's (accelerate only).
DRIVER = ("import sys\nfrom dermkohya import kohya\nkohya.REQUIRED_MODULES = ('accelerate',)\n"
          "from dermkohya.cli import main\nmain(prog_name='dermkohya')\n")

# Files dermkohya writes and rewrites itself: not the user's.
OWN = re.compile(r"^(\.dermkohya/|runs/[^/]+/|models/tokenizers/|output/[^/]+/(manifest\.json|train\.log|stand-in\.))")


def base_checkpoint() -> bytes:
    """A .safetensors file whose header names an SD 1.5 text-encoder key (what identifies the family)."""
    header = json.dumps({"cond_stage_model.transformer.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0\0\0\0"


@dataclass
class Ran:
    """One dermkohya command: exit code, output, and both streams with whitespace folded for matching."""

    code: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return " ".join((self.stdout + "\n" + self.stderr).split())


class Project:
    def __init__(self, tmp_path: Path, lora: Path) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "project"
        self.lora = lora
        self.sums: dict[str, str] | None = None
        self.dataset_files: set[str] = set()

    # --- building --------------------------------------------------------------------------------
    def build(self) -> Project:
        """The project's files and the stand-in sd-scripts (once per session: cases get a copy)."""
        root = self.root
        (root / "runs").mkdir(parents=True)
        (root / "models").mkdir()
        (root / "dermkohya.toml").write_text("format = 1\n")
        (root / "models" / "base.safetensors").write_bytes(base_checkpoint())
        folder = root / "data" / "1_derm"
        folder.mkdir(parents=True)
        for i, colour in enumerate(((190, 120, 110), (120, 80, 60))):
            Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("clinical dermatology photograph, plaque psoriasis")
        (root / "runs" / "tiny.toml").write_text(RUN)
        sd_scripts = self.tmp / "sd-scripts"
        sd_scripts.mkdir()
        (sd_scripts / "train_network.py").write_text(textwrap.dedent(STAND_IN))
        keys = set(render.render(Path("runs/tiny.toml"), project_root=root, check_keys=False).config_keys)
        keys |= {"resume", "max_train_steps", "save_every_n_steps", "sample_every_n_epochs", "sample_every_n_steps",
                 "sample_prompts", "sample_sampler", "save_last_n_epochs"}
        (sd_scripts / "known_keys.json").write_text(json.dumps(sorted(keys - {"config_file", "dataset_config"})))
        basemodel.build_tokenizer_cache(basemodel.tokenizer_cache_dir(root))
        return self

    def copy(self, tmp_path: Path) -> Project:
        """This project and its stand-in, copied into `tmp_path` for one case."""
        shutil.copytree(self.root, tmp_path / "project", symlinks=True)
        shutil.copytree(self.tmp / "sd-scripts", tmp_path / "sd-scripts")
        return Project(tmp_path, self.lora)

    def configure(self, setenv: Callable[[str, str], None], cache: Path) -> Project:
        """The environment dermkohya (and the stand-in) read: this project's stand-in as sd-scripts."""
        env = dict(SD_SCRIPTS_DIR=str(self.tmp / "sd-scripts"), KOHYA_PYTHON=sys.executable, DERMKOHYA_CACHE=str(cache),
                   STAND_IN_LORA=str(self.lora), STAND_IN_FAULT="ok", COLUMNS="200", TERM="dumb", NO_COLOR="1")
        for key, value in env.items():
            setenv(key, value)
        return self

    def write(self, relative: str, text: str | bytes) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    # --- running ---------------------------------------------------------------------------------
    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120, process: bool = False) -> Ran:
        """`dermkohya ARGS` from the project root: in this process through Click's runner (kohya is still a
        real process), or with `process` in a dermkohya process of its own. A traceback (a bug, not a user
        error) lands in stderr either way."""
        if process:
            done = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=self.root, capture_output=True, text=True,
                                  env=dict(os.environ, **(env or {})), timeout=timeout)
            return Ran(done.returncode, done.stdout, done.stderr)
        from click.testing import CliRunner

        from dermkohya.cli import main

        previous = os.getcwd()
        os.chdir(self.root)
        try:
            result = CliRunner().invoke(main, list(args), env=env, prog_name="dermkohya")
        finally:
            os.chdir(previous)
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "".join(traceback.format_exception(result.exception))
        return Ran(result.exit_code, result.stdout, stderr)

    # --- the user's files ------------------------------------------------------------------------
    def checksums(self) -> dict[str, str]:
        sums = {}
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root).as_posix()
            if path.is_file() and not path.is_symlink() and not OWN.match(relative):
                sums[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        return sums

    def freeze(self) -> None:
        """The user's files are in place: from here on the case may not change one byte of them."""
        self.sums = self.checksums()
        self.dataset_files = {p for p in self.sums if p.startswith("data/")}

    def verify(self) -> None:
        assert self.sums is not None, "the case never called project.freeze()"
        now = self.checksums()
        changed = sorted(p for p, digest in self.sums.items() if now.get(p) != digest)
        assert not changed, f"the user's files changed or vanished: {changed}"
        added = sorted(p for p in now if p.startswith("data/") and p not in self.dataset_files)
        assert not added, f"dermkohya wrote into the dataset: {added}"


def refused(ran: Ran, *needles: str, code: int | None = None) -> None:
    """A user error: non-zero exit, no traceback of dermkohya's (kohya's log lines are shown indented), one
    message naming what `needles` say (file, key, fix)."""
    assert ran.code != 0 if code is None else ran.code == code, f"exit {ran.code}:\n{ran.stdout}\n{ran.stderr}"
    assert not re.search(r"^Traceback", ran.stderr, re.M), ran.stderr
    for needle in needles:
        assert needle in ran.text, f"{needle!r} not in:\n{ran.stdout}\n{ran.stderr}"


def succeeded(ran: Ran, *needles: str) -> None:
    assert ran.code == 0, f"exit {ran.code}:\n{ran.stdout}\n{ran.stderr}"
    for needle in needles:
        assert needle in ran.text, f"{needle!r} not in:\n{ran.stdout}\n{ran.stderr}"


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True)
