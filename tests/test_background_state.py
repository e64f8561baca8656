"""accelerate's state written on the writer thread (dermkohya/networks/background_state.py), with real accelerate:
the same files as accelerate's own save, this epoch's values whatever training does next, a folder under its
final name only when whole, a resume that loads it, and accelerate's own save where a background one is unsafe."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dermkohya.networks import background_state, host_copy
from dermkohya.networks.background_save import BackgroundSaver


def _training(tmp_path: Path, seed: int = 0) -> SimpleNamespace:
    """A network trained two steps under a real Accelerator, with kohya's state hook (train_state.json) and
    dermkohya's host-copy hook, as lora_fast sets them up."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    epoch = {"value": 1}

    def kohya_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:  # train_network.py's, in short
        with open(Path(output_dir) / "train_state.json", "w", encoding="utf-8") as f:
            json.dump({"current_epoch": epoch["value"], "current_step": 2}, f)

    host_copy.install_state_hook(accelerator, accelerator.unwrap_model(net))
    accelerator.register_save_state_pre_hook(kohya_hook)
    run = SimpleNamespace(accelerator=accelerator, net=net, optimizer=optimizer, scheduler=scheduler, epoch=epoch)
    for _ in range(2):
        step(run)
    return run


def step(run: SimpleNamespace) -> None:
    loss = run.net(torch.randn(5, 6)).square().mean()
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()


def _files(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = load_file(str(path))
        elif path.suffix in (".bin", ".pkl"):
            out[path.name] = torch.load(path, weights_only=False)
        else:
            out[path.name] = path.read_text()
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy's RNG state
        return bool((a == b).all())
    return a == b


def test_the_state_is_accelerates_own_files_with_this_epochs_values(tmp_path: Path) -> None:
    plain = _training(tmp_path / "plain")
    plain.accelerator.save_state(str(tmp_path / "plain" / "run-000001-state"))
    expected = _files(tmp_path / "plain" / "run-000001-state")

    run = _training(tmp_path / "bg")
    saver = BackgroundSaver()
    assert background_state.install(run.accelerator, saver, SimpleNamespace()) is None
    hold = threading.Event()
    saver.submit_job(lambda: hold.wait(30), "an earlier write")  # the writer is busy: the state waits its turn
    final = tmp_path / "bg" / "run-000001-state"
    assert run.accelerator.save_state(str(final)) == str(final)
    assert not final.exists()  # nothing under the final name while it is being written
    hidden = tmp_path / "bg" / background_state.WRITING_DIR / final.name
    assert sorted(p.name for p in hidden.iterdir()) == ["train_state.json"]  # kohya's hook wrote when it ran
    step(run)  # training goes on and changes weights, Adam's state (its CPU steps in place) and the scheduler
    run.epoch["value"] = 2
    hold.set()
    saver.wait()
    assert not (tmp_path / "bg" / background_state.WRITING_DIR).exists()
    got = _files(final)
    assert list(got) == list(expected)  # the same files
    for name in expected:
        assert _same(got[name], expected[name]), name  # and the values as they were when save_state was called


def test_a_resume_loads_the_background_state(tmp_path: Path) -> None:
    run = _training(tmp_path)
    saver = BackgroundSaver()
    background_state.install(run.accelerator, saver, SimpleNamespace())
    run.accelerator.save_state(str(tmp_path / "s"))
    saved = {k: v.clone() for k, v in run.accelerator.unwrap_model(run.net).state_dict().items()}
    adam = {k: v.clone() for k, v in run.optimizer.state_dict()["state"][0].items()}
    saver.wait()
    step(run)
    run.accelerator.load_state(str(tmp_path / "s"))
    assert _same(run.accelerator.unwrap_model(run.net).state_dict(), saved)
    assert _same(run.optimizer.state_dict()["state"][0], adam)


def test_a_failed_write_leaves_no_state_and_is_raised_by_the_next_save(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = _training(tmp_path)
    saver = BackgroundSaver()
    background_state.install(run.accelerator, saver, SimpleNamespace())

    def full_disk(obj: Any, path: str, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(background_state, "_TORCH_SAVE", full_disk)
    run.accelerator.save_state(str(tmp_path / "e1-state"))
    saver.threads[-1].join()
    assert not (tmp_path / "e1-state").exists() and not (tmp_path / background_state.WRITING_DIR).exists()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"saving .*e1-state failed: OSError: .*No space left"):
        run.accelerator.save_state(str(tmp_path / "e2-state"))
    run.accelerator.save_state(str(tmp_path / "e2-state"))  # said once; the next save is whole
    saver.wait()
    assert (tmp_path / "e2-state" / "optimizer.bin").is_file()


def test_an_existing_folder_is_saved_into_by_accelerate_itself(tmp_path: Path) -> None:
    run = _training(tmp_path)
    saver = BackgroundSaver()
    background_state.install(run.accelerator, saver, SimpleNamespace())
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    run.accelerator.save_state(str(folder))
    assert saver.thread is None  # nothing went to the writer
    assert (folder / "optimizer.bin").is_file() and (folder / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize(("args", "processes", "why"), [
    ({}, 2, "more than one process"),
    ({"save_state_to_huggingface": True}, 1, "Hub"),
    ({"save_last_n_epochs_state": 2}, 1, "removes older states"),
    ({"save_last_n_epochs": 1}, 1, "removes older states"),
])
def test_accelerates_own_save_where_a_background_one_is_unsafe(args: dict[str, Any], processes: int,
                                                               why: str) -> None:
    accelerator = SimpleNamespace(num_processes=processes, save_state=lambda *a, **k: None)
    original = accelerator.save_state
    assert why in background_state.install(accelerator, BackgroundSaver(), SimpleNamespace(**args))
    assert accelerator.save_state is original


def test_host_tree_copies_what_training_changes_and_keeps_container_types() -> None:
    from collections import OrderedDict

    step = torch.tensor(3.0)
    state = {"state": {0: {"step": step, "exp_avg": torch.ones(2)}}, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}],
             "od": OrderedDict(a=torch.zeros(1))}
    copy = background_state.to_host_tree(state)
    step += 1  # Adam's CPU step, in place
    state["groups"][0]["lr"] = 0.2
    assert copy["state"][0]["step"].item() == 3.0 and copy["groups"][0]["lr"] == 0.1
    assert type(copy["od"]) is OrderedDict and copy["groups"][0]["betas"] == (0.9, 0.99)


def test_a_ctrl_c_while_accelerate_saves_comes_after_the_write_is_queued(tmp_path: Path) -> None:
    import os
    import signal

    run = _training(tmp_path)
    saver = BackgroundSaver()
    background_state.install(run.accelerator, saver, SimpleNamespace())
    run.accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        run.accelerator.save_state(str(tmp_path / "e1-state"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    saver.wait()  # what the process does before it ends
    assert (tmp_path / "e1-state" / "optimizer.bin").is_file() and (tmp_path / "e1-state" / "train_state.json").is_file()


def test_another_threads_torch_save_writes_at_once_while_accelerates_are_deferred(tmp_path: Path) -> None:
    run = _training(tmp_path)
    saver = BackgroundSaver()
    background_state.install(run.accelerator, saver, SimpleNamespace())
    lora = tmp_path / "epoch1.pt"  # kohya's LoRA as .pt, written on the writer thread meanwhile
    seen: dict[str, bool] = {}

    def meanwhile(models: list[Any], weights: list[Any], output_dir: str) -> None:
        writer = threading.Thread(target=lambda: torch.save({"w": torch.ones(2)}, lora))
        writer.start()
        writer.join()
        seen["written_at_once"] = lora.is_file()

    run.accelerator.register_save_state_pre_hook(meanwhile)
    run.accelerator.save_state(str(tmp_path / "e1-state"))
    saver.wait()
    assert seen == {"written_at_once": True} and torch.equal(torch.load(lora)["w"], torch.ones(2))
    assert (tmp_path / "e1-state" / "optimizer.bin").is_file() and torch.save is background_state._TORCH_SAVE
