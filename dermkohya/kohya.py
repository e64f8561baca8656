"""Find and verify sd-scripts and kohya's Python, ask kohya's own parser what it accepts, launch kohya as a
subprocess in its own process group, and follow its progress.

Nothing of kohya is imported here: kohya lives in its own environment and is only ever run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermkohya.files import write_atomic
from dermkohya.errors import DermkohyaError
from dermkohya import project
from dermkohya.paths import cache_root

PINNED_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
# What kohya's scripts import at start-up; a missing one is named before a GPU hour is spent.
REQUIRED_MODULES = ("torch", "torchvision", "accelerate", "diffusers", "transformers", "safetensors",
                    "voluptuous", "toml", "imagesize", "cv2", "einops")


def find_sd_scripts(project_root: Path | None = None) -> Path:
    """SD_SCRIPTS_DIR if set, else where the project's dermkohya.toml puts it (vendor/sd-scripts)."""
    env = os.environ.get("SD_SCRIPTS_DIR")
    folder = Path(env) if env else project.kohya_paths(project_root)[0]
    if not (folder / "train_network.py").is_file():
        where = f"SD_SCRIPTS_DIR={env}" if env else str(folder)
        raise DermkohyaError(
            f"sd-scripts not found ({where} has no train_network.py): run `make setup` "
            "or set SD_SCRIPTS_DIR to a kohya-ss/sd-scripts checkout"
        )
    return folder.resolve()


def find_python(project_root: Path | None = None) -> Path:
    """KOHYA_PYTHON if set, else where the project's dermkohya.toml puts it (.venv-kohya, built by `make setup`)."""
    env = os.environ.get("KOHYA_PYTHON")
    python = Path(env) if env else project.kohya_paths(project_root)[1]
    if not python.exists():
        where = f"KOHYA_PYTHON={env}" if env else str(python)
        raise DermkohyaError(
            f"kohya's Python not found ({where}): run `make setup` or set KOHYA_PYTHON "
            "to the python of an environment with sd-scripts' requirements"
        )
    return python


def sd_scripts_commit(folder: Path) -> str | None:
    """The checkout's commit, or None when it is not a git checkout (kohya then records none either).

    A plain copy of sd-scripts inside another repository is not a checkout: git would answer with the
    enclosing repository's commit, so the answer counts only when `folder` is the work tree's top.
    """
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, check=True
        )
        toplevel, commit = out.stdout.split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None
    return commit if Path(toplevel).resolve() == Path(folder).resolve() else None


def verify_commit(folder: Path, *, strict: bool = False) -> str | None:
    """The pinned commit is what dermkohya was verified against; another one is a warning (error if strict)."""
    commit = sd_scripts_commit(folder)
    if commit == PINNED_COMMIT:
        return None
    found = commit or "no git commit (not a git checkout)"
    message = (
        f"sd-scripts at {folder} is at {found}, not the pinned {PINNED_COMMIT[:12]}: "
        f"`git -C {folder} checkout {PINNED_COMMIT}` or accept the difference"
    )
    if strict:
        raise DermkohyaError(message + " (--strict makes this an error)")
    return message


def _cache_file(name: str, key: str) -> Path:
    return cache_root() / name / f"{key}.json"


def _cached(name: str, key: str, compute: Callable[[], object]) -> object:
    path = _cache_file(name, key)
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(value))
    return value


def verify_python(python: Path) -> None:
    """kohya's interpreter has kohya's requirements installed (found, not imported: ~0.1 s, not ~15 s)."""
    code = (
        "import importlib.util, json\n"
        f"print(json.dumps([m for m in {list(REQUIRED_MODULES)!r} if importlib.util.find_spec(m) is None]))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise DermkohyaError(f"kohya's Python {python} does not run: {out.stderr.strip()[-300:]} (rebuild it with `make setup`)")
    missing = json.loads(out.stdout.strip().splitlines()[-1])
    if missing:
        raise DermkohyaError(
            f"kohya's Python {python} lacks: {', '.join(missing)} — install sd-scripts' requirements "
            "into it (`make setup` builds .venv-kohya) or point KOHYA_PYTHON at a working kohya environment"
        )


def verify_network_module(module: str, project_root: Path | None = None) -> None:
    """kohya's Python imports `[network] module` as train_network.py will: from sd-scripts' folder, with
    kohya_env's PYTHONPATH (a dermkohya module from the copy render writes outside the source checkout)."""
    folder, python = find_sd_scripts(project_root), find_python(project_root)
    code = f"import importlib, sys\nsys.path.insert(0, '.')\nimportlib.import_module({module!r})"
    out = subprocess.run([str(python), "-c", code], cwd=folder, capture_output=True, text=True,
                         env=kohya_env(project_root=project_root))
    if out.returncode != 0:
        raise DermkohyaError(
            f"kohya's Python {python} cannot import [network] module {module!r}: {out.stderr.strip()[-300:]} "
            "(render the run first for a dermkohya module; for another, install it into kohya's environment)"
        )


def _arguments_key(script: str, project_root: Path | None = None) -> str:
    folder = find_sd_scripts(project_root)
    sources = [folder / script, folder / "library" / "train_util.py", folder / "train_network.py"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources if p.is_file())).hexdigest()[:24]
    return f"{Path(script).stem}-{digest}"


def cached_argument_names(script: str, project_root: Path | None = None) -> set[str] | None:
    """The option list when an earlier call already asked kohya's parser (no subprocess), else None."""
    path = _cache_file("kohya-args", _arguments_key(script, project_root))
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def argument_names(script: str, project_root: Path | None = None) -> set[str]:
    """Every option `script`'s own argparse parser knows (cached by the script and train_util contents).

    The first call imports the script in kohya's environment (torch, diffusers: ~15 s cold); later calls
    read the cache.
    """
    folder = find_sd_scripts(project_root)
    python = find_python(project_root)

    def compute() -> list[str]:
        code = (
            "import importlib, json, sys\nsys.path.insert(0, '.')\n"
            f"parser = importlib.import_module({Path(script).stem!r}).setup_parser()\n"
            "print('DERMKOHYA-ARGS ' + json.dumps(sorted(a.dest for a in parser._actions)))"
        )
        out = subprocess.run([str(python), "-c", code], cwd=folder, capture_output=True, text=True,
                             env=kohya_env())
        lines = [line for line in out.stdout.splitlines() if line.startswith("DERMKOHYA-ARGS ")]
        if out.returncode != 0 or not lines:
            raise DermkohyaError(f"could not read {script}'s options with {python}: {out.stderr.strip()[-400:]}")
        return json.loads(lines[-1].removeprefix("DERMKOHYA-ARGS "))

    return set(_cached("kohya-args", _arguments_key(script, project_root), compute))  # type: ignore[arg-type]


def kohya_env(*, online: bool = False, project_root: Path | None = None) -> dict[str, str]:
    """kohya's environment: offline unless the user opts in, unbuffered so progress arrives as it happens.

    The project's kohya import folder goes first on PYTHONPATH, so kohya's `--network_module` can import
    dermkohya's own modules by name (`dermkohya.networks.lora_fast`): the project root in the dermkohya
    source checkout, else the copy of the package's kohya-side files that render writes
    (`project.kohya_import_dir`). Never an installed site-packages folder: that would put dermkohya's
    environment in front of kohya's.
    """
    env = dict(os.environ)
    if not online:
        env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    root = project_root if project_root is not None else project.resolve_root()
    folder = project.kohya_import_dir(root)
    if (folder / "dermkohya" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    return env


_PROGRESS = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^\]]*)\]")
_RATE = re.compile(r"([\d.]+)\s*(it/s|s/it)")
_LOSS = re.compile(r"avr_loss=([-\d.eE+naif]+)")


@dataclass
class Progress:
    step: int
    total: int
    it_per_s: float | None
    loss: float | None


def parse_progress(line: str) -> Progress | None:
    """kohya's tqdm line `steps:  50%|█▌ | 1/2 [00:10<00:10, 0.10it/s, avr_loss=0.123]`, or None."""
    match = _PROGRESS.search(line)
    if not match:
        return None
    inside = match.group(3)
    rate = _RATE.search(inside)
    it_per_s = None
    if rate:
        value = float(rate.group(1))
        it_per_s = value if rate.group(2) == "it/s" else (1.0 / value if value else None)
    return Progress(int(match.group(1)), int(match.group(2)), it_per_s, parse_loss(inside))


def parse_loss(text: str) -> float | None:
    """kohya's running loss (`avr_loss=0.123`) anywhere in a line, or None (`nan` is a float: NaN)."""
    match = _LOSS.search(text)
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


@dataclass
class LaunchResult:
    returncode: int
    interrupted: bool  # stopped by a signal to dermkohya (SIGINT, SIGTERM, SIGHUP): `stop_signal` says which
    tail: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by: BaseException | None = None  # what the guard raised; kohya was stopped for it
    guard_seconds: float | None = None  # when the guard finished, in seconds after kohya started
    first_step_seconds: float | None = None  # when kohya's first progress line arrived (its training loop began)
    stop_signal: str | None = None  # "SIGTERM" when dermkohya was told to stop and stopped kohya for it


WATCHDOG = Path(__file__).with_name("watchdog.py")
# Signals that stop a run: Ctrl-C, `kill`/SLURM's end of a job, a closed terminal. Each stops kohya's whole
# group and is recorded; SIGKILL runs no code, and kohya's watchdog stops the group instead.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(BaseException):
    """A stop signal, raised in the main thread where the output is read."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _signal_name(exc: BaseException) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, _Stop) else "SIGINT"


def launch(
    argv: list[str],
    *,
    cwd: Path,
    log_path: Path,
    env: dict[str, str],
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 40,
    guard: Callable[[], None] | None = None,
    hold_fds: tuple[int, ...] = (),
) -> LaunchResult:
    """Run kohya in its own process group, teeing every byte to log_path and every line to on_line.
    (Long: the start, the reading loop, the signal handlers and the stop are one supervision, and every
    exit path must restore the handlers and reap the group.)

    The group's leader is dermkohya's watchdog (watchdog.py), which runs kohya as its child and stops the
    whole group if dermkohya dies, SIGKILL included. SIGINT (Ctrl-C, or a KeyboardInterrupt from on_line),
    SIGTERM and SIGHUP to dermkohya stop kohya's whole group in order (SIGINT, which accelerate passes
    on, first only for Ctrl-C; then SIGTERM, then SIGKILL), and `stop_signal` names the signal, so no
    orphaned worker keeps the GPU. Signal handlers are installed only when called from the main thread.
    The watchdog also keeps `hold_fds` open (a run's lock): what they hold outlives dermkohya until
    kohya's group has gone.

    `guard` runs in a thread while kohya starts (checks that take seconds, overlapped with kohya's own
    imports and model loading); if it raises, kohya's group is stopped at once (SIGTERM, then SIGKILL)
    and the exception is returned as `stopped_by`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    start = time.monotonic()
    stop_signal: str | None = None
    alive_read, alive_write = os.pipe()  # the write end stays here: its end of file tells the watchdog we died
    handlers = {}
    try:
        with log_path.open("ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            keeper = [sys.executable, "-I", str(WATCHDOG), str(alive_read), "--", *argv]
            try:
                process = subprocess.Popen(keeper, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           pass_fds=(alive_read, *hold_fds))
            finally:
                os.close(alive_read)
            assert process.stdout is not None
            guarded: dict[str, Any] = {}
            watcher = None
            if guard is not None:
                def watch() -> None:
                    try:
                        guard()
                    except BaseException as exc:  # noqa: BLE001 - handed back to the caller, who raises it
                        guarded["error"] = exc
                        _stop_group(process, signals=_TERMINATE)
                    guarded["seconds"] = time.monotonic() - start

                watcher = threading.Thread(target=watch, name="dermkohya-checks", daemon=True)
                watcher.start()
            if threading.current_thread() is threading.main_thread():
                # From here a stop signal is handled and recorded; one before this ends dermkohya as usual,
                # and the watchdog, seeing dermkohya gone, stops kohya.
                handlers = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
            first_step = None
            log_error: OSError | None = None
            buffer = b""
            try:
                while True:
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    if log_error is None:
                        try:
                            log.write(chunk)
                            log.flush()
                        except OSError as exc:  # a full disk: keep following kohya, which fails on it too
                            log_error = exc
                            tail.append(f"dermkohya: {log_path} could not be written further: {exc.strerror}")
                    buffer += chunk
                    *lines, buffer = re.split(rb"[\r\n]", buffer)
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip()
                        if line:
                            tail.append(line)
                            if first_step is None and parse_progress(line):
                                first_step = time.monotonic() - start
                            if on_line:
                                on_line(line)
                if buffer.strip():
                    tail.append(buffer.decode("utf-8", "replace").rstrip())
                returncode = process.wait()
            except (KeyboardInterrupt, _Stop) as exc:
                stop_signal = _signal_name(exc)
                _stop_group(process, signals=_INTERRUPT if stop_signal == "SIGINT" else _TERMINATE)
                returncode = process.wait()
            _kill_stragglers(process.pid)
    finally:
        os.close(alive_write)
        for sig, previous in handlers.items():
            if previous is not None:
                signal.signal(sig, previous)
    seconds = time.monotonic() - start
    if watcher is not None and stop_signal is None:
        watcher.join()  # kohya finished before the checks did: their verdict still counts
    return LaunchResult(returncode=returncode, interrupted=stop_signal is not None, tail=list(tail), seconds=seconds,
                        stopped_by=guarded.get("error"), guard_seconds=guarded.get("seconds"),
                        first_step_seconds=first_step, stop_signal=stop_signal)


_INTERRUPT = ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 5))
_TERMINATE = ((signal.SIGTERM, 10), (signal.SIGKILL, 5))


def _stop_group(process: subprocess.Popen[bytes], signals: tuple[tuple[int, float], ...] = _INTERRUPT) -> None:
    """Each signal in turn to kohya's whole group, until its leader has gone; another stop signal meanwhile
    moves on to the next, harder one."""
    for sig, grace in signals:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except (KeyboardInterrupt, _Stop):
            continue


def _kill_stragglers(group: int) -> None:
    """Whatever is left of kohya's group once its leader has gone (a worker that ignored the stop)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_HUB_HINT = ("kohya tried to download {what} from the Hugging Face hub, which dermkohya keeps offline (HF_HUB_OFFLINE=1): "
             "give local paths in {file}, or pass --online")

# The memory savers, as `train`'s pre-launch memory check names them (memory.py)
_OOM_HINT = ("out of GPU memory: set [train] gradient_checkpointing = true and [network] module = \"networks.lora\" "
             "(the memory saver: runs/derm-sdxl-24gb.toml for SDXL on 24 GB cards, 13 GiB; SD 1.5 then fits 12–16 GB cards), "
             "keep cache_latents = true, or lower [train] batch_size or resolution")


HINTS: tuple[tuple[str, str], ...] = (
    ("No space left on device", "the disk is full (kohya writes its LoRA, states and samples into output/<run>/): "
     "free space there, or lower [train] save_every_n_epochs / set save_state = false, then train again (--resume continues "
     "from the last complete state)"),
    ("CUDA out of memory", _OOM_HINT),
    ("OutOfMemoryError", _OOM_HINT),
    ("avr_loss=nan", "the loss became NaN, so the LoRA is useless: with mixed_precision = \"fp16\" set [train] "
     "mixed_precision = \"bf16\" (GPUs since Ampere), or lower learning_rate; then train again with --new"),
    ("No data found", "kohya found no images: [dataset] must point at the parent of the `N_concept` folders"),
    ("fp16 mixed precision requires a GPU", "fp16 needs a GPU: set [train] mixed_precision = \"no\" (or \"bf16\") on a CPU"),
    ("xformers", "xformers is not installed in kohya's environment: set [train] attention = \"sdpa\""),
    ("cannot identify image file", "an image does not decode: run `dermkohya check --decode` on the dataset"),
    ("image file is truncated", "an image is truncated: run `dermkohya check --decode` on the dataset"),
    # kohya loads the CLIP tokenizer from the hub unless --tokenizer_cache_dir holds it; offline
    # (HF_HUB_OFFLINE=1) transformers then opens a vocab file it never got
    ("open(vocab_file", "kohya looked for the CLIP tokenizer on the Hugging Face hub, which dermkohya keeps offline "
     "(HF_HUB_OFFLINE=1): runs/<run>/config.toml's tokenizer_cache_dir must hold openai_clip-vit-large-patch14/ "
     "(SDXL also laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/); `dermkohya train` builds models/tokenizers/ offline "
     "for every base, so re-run it rather than kohya by hand, or pass --online"),
    ("We couldn't connect to 'https://huggingface.co'", _HUB_HINT.format(what="a file", file="[model] base and the rendered config.toml")),
    ("cannot find the requested files in the local cache", _HUB_HINT.format(what="a file", file="[model] base and the rendered config.toml")),
    ("You are trying to load the model files of the `variant=fp16`",
     "kohya loads a diffusers SDXL folder as variant fp16 under fp16, and this folder has no *.fp16.safetensors files: "
     "use the single-file .safetensors checkpoint, or mixed_precision = \"bf16\""),
    ("does not appear to have a file named", "the base model path is not a model kohya can read: check [model] base"),
    ("No module named 'dermkohya'", "kohya cannot import dermkohya's network module: `dermkohya render RUN` writes the project's "
     ".dermkohya/kohya-path/ copy that train and train_command.sh put on PYTHONPATH (re-render, then train), "
     "or use [network] module = \"networks.lora\""),
    ("No module named", "kohya's Python lacks a package: rebuild it with `make setup` (or install sd-scripts' requirements into KOHYA_PYTHON)"),
    ("No such file or directory", "a path kohya was given does not exist: check the paths in the rendered config.toml"),
)


def hint_for(lines: list[str]) -> str | None:
    """A fix for the known failures, from the tail of kohya's log."""
    text = "\n".join(lines)
    for needle, hint in HINTS:
        if needle in text:
            return hint
    return None
