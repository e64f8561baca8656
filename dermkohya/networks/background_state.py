"""accelerate's state written on the writer thread (lora_fast `save_copy=background`), moved into place when whole.

With `save_state` (dermkohya's default: what `--resume` continues from) kohya calls accelerate's
`save_state` at every epoch end, and training waits while it writes the network's weights (safetensors),
Adam's state (torch.save: twice the weights, in fp32), the scheduler, the scaler and the RNG states: an
SDXL state is ~0.7 GB. This takes the writing out of the epoch end.

`install(accelerator, saver, args)` wraps that accelerator's `save_state` (on the instance). The wrapper
runs accelerate's own `save_state`, unchanged, into a hidden folder beside the state's
(`.dermkohya-writing-state/<name>`), with its writes deferred: every object accelerate hands to its
`save` or to `torch.save` is copied to the host there and then (device tensors in one transfer per device
and dtype, host tensors the same way: Adam steps some in place), so the files hold this epoch's state
whatever training does next. What accelerate reads when (the RNG states, the step, kohya's `train_state.json`,
written by kohya's own hook) is unchanged. The writer thread (background_save.py) then writes the files,
in accelerate's order, and moves the folder to its name (`os.replace`): a state folder under its final
name is always whole, so `--resume` never finds a half-written one.

accelerate's own, synchronous `save_state` runs instead when: more than one process saves, kohya uploads
states to the Hub (`save_state_to_huggingface`: it uploads as soon as `save_state` returns), kohya removes
older states after each save (`save_last_n_epochs_state` / `save_last_n_epochs`: a crash between that
removal and the end of the write would leave no state), the folder exists already, or this accelerate has
no `accelerate.checkpointing.save`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dermkohya.networks import host_copy
from dermkohya.networks.background_save import BackgroundSaver, make_folder, remove_if_empty, write_safetensors

logger = logging.getLogger(__name__)

WRITING_DIR = ".dermkohya-writing-state"
_TORCH_SAVE = torch.save
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


def synchronous_reason(accelerator: Any, args: Any) -> str | None:
    """Why the state must be written by accelerate in the caller, or None."""
    if getattr(accelerator, "num_processes", 1) != 1:
        return "more than one process"
    if getattr(args, "save_state_to_huggingface", False):
        return "kohya uploads each state to the Hub when it is saved"
    if getattr(args, "save_last_n_epochs_state", None) or getattr(args, "save_last_n_epochs", None) \
            or getattr(args, "save_last_n_steps_state", None) or getattr(args, "save_last_n_steps", None):
        return "kohya removes older states after each save"
    try:
        import accelerate.checkpointing as checkpointing
    except ImportError:
        return "no accelerate.checkpointing"
    if not callable(getattr(checkpointing, "save", None)):
        return "this accelerate has no accelerate.checkpointing.save"
    return None


def install(accelerator: Any, saver: BackgroundSaver, args: Any) -> str | None:
    """Wrap `accelerator.save_state` to write on `saver`'s thread. Returns None when installed, else why not."""
    why = synchronous_reason(accelerator, args)
    if why is not None:
        return why
    original = accelerator.save_state

    def save_state(output_dir: Any = None, safe_serialization: bool = True, **kwargs: Any) -> Any:
        if output_dir is None:  # accelerate's automatic naming: its own way
            saver.wait()
            return original(output_dir, safe_serialization=safe_serialization, **kwargs)
        final = Path(output_dir)
        hidden = final.parent / WRITING_DIR / final.name
        if final.exists() or hidden.exists():
            saver.wait()  # a write of this very folder may be pending
        if final.exists():  # accelerate writes into the folder there, as it would without dermkohya
            return original(output_dir, safe_serialization=safe_serialization, **kwargs)
        if hidden.exists():  # left by a write of ours that failed
            shutil.rmtree(hidden)
        make_folder(hidden)  # accelerate's own makedirs then finds it
        writes: list[tuple[str, Any, str, dict[str, Any]]] = []
        with _signals_held(), _deferred(writes):
            original(str(hidden), safe_serialization=safe_serialization, **kwargs)
            # queued inside: a Ctrl-C once accelerate has logged "saved" finds the write queued, and the
            # process waits for it before it ends
            saver.submit_job(_writer(writes, hidden, final), str(final))
        return str(final)

    accelerator.save_state = save_state
    return None


def _writer(writes: list[tuple[str, Any, str, dict[str, Any]]], hidden: Path, final: Path) -> Callable[[], None]:
    """The writer thread's job: accelerate's files in its order, then the folder to its name."""

    def job() -> None:
        try:
            for kind, obj, path, extra in writes:
                if kind == "safetensors":
                    write_safetensors(obj, path, {"format": "pt"})
                else:
                    _TORCH_SAVE(obj, path, **extra)
            os.replace(hidden, final)
            logger.info("dermkohya lora_fast: state written to %s", final)
        except BaseException:
            shutil.rmtree(hidden, ignore_errors=True)
            raise
        finally:
            remove_if_empty(hidden.parent)

    return job


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside are delivered as it ends (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: set outside Python, and could not be put back
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


@contextlib.contextmanager
def _deferred(writes: list[tuple[str, Any, str, dict[str, Any]]]) -> Iterator[None]:
    """While accelerate's `save_state` runs: its `save` and `torch.save` record a host copy and the path."""
    import accelerate.checkpointing as checkpointing
    from accelerate.utils import clean_state_dict_for_safetensors

    accelerate_save, torch_save_before = checkpointing.save, torch.save
    caller = threading.current_thread()  # the writer thread may call torch.save meanwhile (a .pt LoRA): as it was

    def save(obj: Any, f: Any, save_on_each_node: bool = False, safe_serialization: bool = False) -> None:
        if threading.current_thread() is not caller:
            return accelerate_save(obj, f, save_on_each_node=save_on_each_node, safe_serialization=safe_serialization)
        if isinstance(obj, host_copy.HostCopy):  # the network's weights, copied for this save by the hook
            writes.append(("safetensors" if safe_serialization else "torch", dict(obj), os.fspath(f), {}))
        elif safe_serialization:
            if isinstance(obj, OrderedDict):  # as accelerate's save: tensors sharing a storage saved once
                obj = clean_state_dict_for_safetensors(obj)
            writes.append(("safetensors", dict(to_host_tree(obj, own_storage=True)), os.fspath(f), {}))
        else:
            writes.append(("torch", to_host_tree(obj), os.fspath(f), {}))

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not caller or args or not isinstance(f, (str, os.PathLike)):
            # not a call of accelerate's: as it was
            return torch_save_before(obj, f, *args, **kwargs)
        writes.append(("torch", to_host_tree(obj), os.fspath(f), kwargs))

    checkpointing.save = save
    torch.save = torch_save
    try:
        yield
    finally:
        checkpointing.save = accelerate_save
        torch.save = torch_save_before


def to_host_tree(obj: Any, own_storage: bool = False) -> Any:
    """A copy of `obj` (dicts, lists and tuples of tensors and values) that nothing in training changes: its
    tensors on the host in one copy per device and dtype (host_copy.to_host; views of it, or with `own_storage`
    each its own storage), other values deep-copied unless immutable. Containers keep their types (an
    OrderedDict stays one). Adam's state laid out in one buffer per kind (flat_state.py) stays in few records."""
    found: dict[str, torch.Tensor] = {}

    def collect(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            found.setdefault(str(id(o)), o)
        elif isinstance(o, dict):
            for value in o.values():
                collect(value)
        elif isinstance(o, (list, tuple)):
            for value in o:
                collect(value)

    collect(obj)
    host = host_copy.to_host(found, own_storage=own_storage, copy_host=True) if found else {}

    def rebuild(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return host[str(id(o))]
        if isinstance(o, dict):
            out = copy.copy(o)  # the same mapping type
            for key, value in o.items():
                out[key] = rebuild(value)
            return out
        if isinstance(o, tuple) and hasattr(o, "_fields"):
            return type(o)(*(rebuild(v) for v in o))
        if isinstance(o, (list, tuple)):
            return type(o)(rebuild(v) for v in o)
        return o if isinstance(o, _IMMUTABLE) else copy.deepcopy(o)

    return rebuild(obj)
