"""The queue (`dermkohya train A.toml B.toml …`, `--gpus`) and `dermkohya runs`.

Driven through the CLI and the real `accelerate launch`, with a stand-in for sd-scripts' train_network.py
that writes a kohya-format LoRA (tests/_lora_fixture.py) or fails on purpose: it proves the queue's
orchestration (order, failures, the table, GPU ids, states), never that training works — the `kohya`
test at the end trains the demo twice with the real kohya.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from dermkohya import kohya, locks, queue, runstate, train
from dermkohya.cli import main
from dermkohya.errors import DermkohyaError, ProblemsError

from _lora_fixture import write_kohya_lora
from _stand_in import STAND_IN_HEAD, make_project

pytest.importorskip("accelerate", reason="the stand-in is launched through accelerate, as kohya is")

# train_network.py as far as the queue sees it: the LoRA in --output_dir, or exit 1 for STAND_IN_FAIL's run.
STAND_IN = STAND_IN_HEAD + '''
if __name__ == "__main__":
    flat = read_config()
    out, name = Path(flat["output_dir"]), flat["output_name"]
    (out / "cuda.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    if name == os.environ.get("STAND_IN_FAIL"):
        print("RuntimeError: failing on purpose", file=sys.stderr)
        sys.exit(1)
    for step in (1, 2):
        sys.stderr.write(f"\\rsteps: {step * 50}%|##| {step}/2 [00:01<00:00, 2.00it/s, avr_loss=0.{step}]")
        sys.stderr.flush()
    shutil.copyfile(os.environ["STAND_IN_LORA"], out / (name + ".safetensors"))
    print("\\nsaved")
'''


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path, monkeypatch, runs=("good", "bad"))
    (root / "dermkohya.toml").write_text("format = 1\n")
    (Path(os.environ["SD_SCRIPTS_DIR"]) / "train_network.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("STAND_IN_LORA", str(write_kohya_lora(tmp_path / "lora.safetensors", rank=16, alpha=16.0)))
    monkeypatch.setenv("STAND_IN_FAIL", "bad")
    # What kohya's environment must import, as empty stand-ins, for the `dermkohya train` processes of --gpus.
    stubs = tmp_path / "kohya-modules"
    stubs.mkdir()
    for module in ("voluptuous", "toml", "imagesize", "cv2", "einops"):
        (stubs / f"{module}.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(root)
    return root


def _manifest(root: Path, run: str) -> dict:
    return json.loads((root / "output" / run / "manifest.json").read_text())


def test_a_failing_run_does_not_stop_the_queue_and_the_table_says_so(project: Path) -> None:
    done = CliRunner().invoke(main, ["train", "runs/bad.toml", "runs/good.toml"], terminal_width=200)
    assert done.exit_code == 1, done.output
    assert (project / "artifacts" / "good" / "good.safetensors").is_file(), done.output
    assert runstate.run_state(project, "good") == runstate.RunState.COLLECTED
    assert runstate.run_state(project, "bad") == runstate.RunState.FAILED
    table = done.output[done.output.index("queue"):]
    for column in ("run", "result", "time", "final loss", "artifact"):
        assert column in table
    lines = {line.split()[1]: line for line in table.splitlines() if line.strip().startswith("│ ") and "│" in line[2:]}
    assert "failed" in lines["bad"] and "collected" in lines["good"] and "0.2000" in lines["good"]
    assert "artifacts/good/good.safetensors" in lines["good"]
    assert "bad: kohya exit 1: RuntimeError: failing on purpose" in done.output  # why it failed, under the table
    assert not list((project / queue.QUEUE_DIR).glob("*.json")), "the queue's record outlived it"


def test_every_run_file_is_checked_before_the_first_trains(project: Path) -> None:
    (project / "runs" / "typo.toml").write_text((project / "runs" / "good.toml").read_text().replace("[train]", "[trian]"))
    with pytest.raises(ProblemsError) as raised:
        queue.run_queue([Path("runs/good.toml"), Path("runs/typo.toml"), Path("runs/good.toml")], project_root=project)
    problems = " ".join(raised.value.problems)
    assert "unknown key `trian`" in problems and "queued twice" in problems
    assert not (project / "output" / "good").exists()


def test_gpus_run_one_run_per_gpu_and_the_manifest_says_which(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_FAIL", "none")
    rows = queue.run_queue([Path("runs/good.toml"), Path("runs/bad.toml")], project_root=project, gpus=["0", "1"])
    assert [r.result for r in rows] == ["collected", "collected"], [r.message for r in rows]
    assert {r.gpu for r in rows} == {"0", "1"}
    for row in rows:
        manifest = _manifest(project, row.run)
        assert manifest["gpu_override"] == {"gpu_ids": row.gpu, "run_file_gpu_ids": None, "by": "--gpus"}
        command = manifest["command"]
        assert command[command.index("--gpu_ids") + 1] == row.gpu
        assert (project / "output" / row.run / "cuda.txt").read_text() == row.gpu  # accelerate passed it on
        assert row.log is not None and row.log.is_file() and row.artifact == project / "artifacts" / row.run / f"{row.run}.safetensors"


def test_gpus_replace_the_run_files_gpu_ids_and_refuse_a_multi_process_run(project: Path) -> None:
    args = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--gpu_ids", "3", "--mixed_precision", "no"]
    assert train._with_gpu_ids(args, "1", 1, Path("runs/a.toml")) == [
        "-m", "accelerate.commands.launch", "--num_processes", "1", "--gpu_ids", "1", "--mixed_precision", "no"]
    with pytest.raises(DermkohyaError, match=r"runs/a.toml: \[launch\] asks for 2 processes but --gpus gives this run GPU 1"):
        train._with_gpu_ids(args, "1", 2, Path("runs/a.toml"))
    with pytest.raises(DermkohyaError, match="digits separated by commas"):
        train._with_gpu_ids(args, "cuda:0", 1, Path("runs/a.toml"))


def test_runs_lists_every_state(project: Path) -> None:
    CliRunner().invoke(main, ["train", "runs/bad.toml", "runs/good.toml"])
    for name in ("waiting", "live", "fresh"):
        (project / "runs" / f"{name}.toml").write_text((project / "runs" / "good.toml").read_text())
    CliRunner().invoke(main, ["render", "runs/fresh.toml", "--no-kohya-check"])
    # A queue (this process) that has not started `waiting` yet, and a dermkohya training `live` (this process too).
    owner = queue._owner(["dermkohya", "train"])
    queue.QueueRecord(source="dermkohya", owner=owner, since=owner.since,
                      runs=[queue.QueuedRun(name="waiting", run_file="runs/waiting.toml")]).write(queue.record_path(project, "t"))
    with locks.hold_run(project, "live", "train"):
        done = CliRunner().invoke(main, ["runs", "--json"])
        table = CliRunner().invoke(main, ["runs"], terminal_width=200)
    assert done.exit_code == 0, done.output
    runs = {r["name"]: r for r in json.loads(done.output)}
    assert runs["good"]["state"] == "collected" and runs["good"]["steps"] == "2/2" and runs["good"]["loss"] == 0.2
    assert runs["good"]["artifact"].endswith("artifacts/good/good.safetensors")
    assert runs["bad"]["state"] == "failed" and runs["bad"]["artifact"] is None
    assert runs["waiting"]["state"] == "queued" and runs["waiting"]["queued_by"] == f"queue pid {os.getpid()}"
    assert runs["live"]["state"] == "running" and runs["live"]["pid"] == os.getpid()
    assert runs["fresh"]["state"] == "rendered"
    assert f"running (pid {os.getpid()}" in table.output and "queued (queue pid" in table.output


def test_a_slurm_jobs_runs_are_queued_until_they_start(project: Path) -> None:
    queue.write_slurm_record(project, "4242", [("good", Path("runs/good.toml"))])
    assert queue.queued_runs(project) == {"good": "slurm job 4242"}
    train.train(Path("runs/good.toml"), project_root=project)
    assert queue.queued_runs(project) == {}


@pytest.mark.kohya
@pytest.mark.slow
def test_make_train_runs_two_run_files_with_the_real_kohya(tmp_path: Path) -> None:
    """`make train RUN="runs/demo.toml runs/<a copy with another seed>.toml"`, in a copy of this project."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "project"
    (copy / "runs").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "dermkohya.toml", "runs/demo.toml"):
        shutil.copy2(repo / name, copy / name)  # mtimes kept: make sees the environment as built
    (copy / "runs" / "seed7.toml").write_text((repo / "runs" / "demo.toml").read_text().replace(
        "learning_rate = 1e-4", "learning_rate = 1e-4\nseed = 7"))
    (repo / "models").mkdir(exist_ok=True)
    (copy / "models").symlink_to(repo / "models")  # the smoke model, built once
    env = dict(os.environ, SD_SCRIPTS_DIR=str(kohya.find_sd_scripts(repo)), KOHYA_PYTHON=str(kohya.find_python(repo)))
    # -o: this checkout's environment is used as it is (never rebuilt from the copied pyproject.toml)
    done = subprocess.run(["make", "-o", f"{repo / '.venv'}/.installed", "train", "RUN=runs/demo.toml runs/seed7.toml",
                           f"VENV={repo / '.venv'}"],
                          cwd=copy, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in ("demo", "seed7"):
        assert runstate.run_state(copy, run) == runstate.RunState.COLLECTED
        assert (copy / "artifacts" / run / f"{run}.safetensors").is_file()
    a, b = (json.loads((copy / "output" / run / "manifest.json").read_text()) for run in ("demo", "seed7"))
    assert a["state"] == b["state"] == "finished" and a["command"] != b["command"]
    assert "seed7" in done.stdout and "collected" in done.stdout
