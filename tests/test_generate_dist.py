"""generate under a launcher (dermkohya/generate/dist.py): the environment read, the refusals, and real
`torchrun` jobs on this CPU against the tiny random pipeline — `--nproc_per_node 2`, and two launches of
one process each (`--nnodes 2 --node_rank 0|1`, as two machines sharing a filesystem) — making the same
files as one process; the folder's lock held once for a launch; a killed rank named, and a rerun finishing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dermkohya import locks
from dermkohya.errors import DermkohyaError
from dermkohya.generate import generate
from dermkohya.generate.dist import launch_from_env

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def load_ranks_bench() -> Any:
    """bench/generate_ranks.py as a module: its launches, one-process run and file comparison."""
    spec = importlib.util.spec_from_file_location("generate_ranks", ROOT / "bench" / "generate_ranks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the environment --------------------------------------------------------------------------------------


def test_no_launcher_or_a_world_of_one_is_one_process() -> None:
    assert launch_from_env({}) is None
    assert launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None


def test_a_launchers_environment_gives_the_rank() -> None:
    launch = launch_from_env(LAUNCH)
    assert (launch.rank, launch.world, launch.local_rank) == (1, 2, 1) and launch.where == "rank 1 of 2"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"MASTER_PORT": None}, r"WORLD_SIZE=2 but MASTER_PORT is not set: start dermkohya generate with torchrun"),
        ({"RANK": None, "LOCAL_RANK": None}, r"RANK, LOCAL_RANK are not set"),
        ({"RANK": "2"}, r"RANK=2, LOCAL_RANK=1 do not fit WORLD_SIZE=2: check the launcher's --nnodes"),
        ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' in the environment is not a whole number"),
    ],
)
def test_a_broken_launch_environment_is_named(changes: dict[str, str | None], message: str) -> None:
    environ = {k: v for k, v in (LAUNCH | changes).items() if v is not None}
    with pytest.raises(DermkohyaError, match=message):
        launch_from_env(environ)


def test_processes_under_a_launcher_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in LAUNCH.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DermkohyaError, match=r"--processes 2 under a launcher \(rank 1 of 2\).*--nproc_per_node"):
        generate(tmp_path / "plan.toml", out=tmp_path / "out", processes=2)


# --- real torchrun jobs on the tiny pipeline ------------------------------------------------------------------

PLAN = """\
name = "ranks"
[model]
base = "{model}"
[[lora]]
path = "{lora}"
weight = 0.8
[classes]
diagnoses = ["melanoma", "basal cell carcinoma"]
skin_types = ["I", "VI"]
count = 8
[sampler]
steps = 2
width = 64
height = 64
seed = 11
[engine]
batch_size = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny pipeline, a plan over it (8 images, 4 batches: two per rank), and its one-process output."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_generate import build_tiny_sd, write_kohya_lora

    root = tmp_path_factory.mktemp("ranks")
    model = build_tiny_sd(root / "model", root / "tokenizers")
    lora = write_kohya_lora(model, root / "lora.safetensors")
    plan = root / "ranks.toml"
    plan.write_text(PLAN.format(model=model, lora=lora), encoding="utf-8")
    bench = load_ranks_bench()
    one = bench.one_process(plan, root / "one", False, "1", 600)
    assert one["exit_codes"] == [0] and one["finished"] == 8, one
    return {"root": root, "plan": plan, "bench": bench, "reference": bench.file_hashes(root / "one")}


def torchrun(args: list[str], plan: Path, out: Path, **popen: Any) -> subprocess.Popen[str]:
    env = load_ranks_bench()._env(None, "1")  # every process one thread, as the reference: CPU rounding follows it
    argv = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "dermkohya", "generate", str(plan), "--out", str(out), "--no-progress"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def signal_family(pid: int, sig: signal.Signals) -> None:
    """Signal a process and its descendants (torchrun starts each rank in a session of its own)."""
    family, todo = [], [pid]
    while todo:
        member = todo.pop()
        family.append(member)
        for task in Path(f"/proc/{member}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    for member in family:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            continue


@pytest.mark.slow
def test_torchrun_two_processes_make_the_files_of_one_process(setup: dict[str, Any]) -> None:
    out = setup["root"] / "nproc2"
    run = torchrun(["--nproc_per_node", "2", "--master_port", str(setup["bench"].free_port())], setup["plan"], out)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert setup["bench"].file_hashes(out) == setup["reference"]
    assert output.count("done 8/8 images") == 1, output  # rank 0 prints the summary
    summary = (out / "summary.json").read_text()
    assert '"processes": 2' in summary and not (out / ".staging").exists()
    assert not locks.record_path(locks.folder_lock(out)).exists()


@pytest.mark.slow
def test_the_ranks_benchmark_runs_two_launches_on_cpu(setup: dict[str, Any], tmp_path: Path) -> None:
    """bench/generate_ranks.py's CPU smoke: two launches of one process each (`--nnodes 2 --node_rank 0|1`,
    as two nodes) and one process, the same files, images/s of each."""
    out = tmp_path / "ranks.json"
    args = ["--model", str(setup["root"] / "model"), "--random-lora", "--size", "64", "--steps", "2", "--count", "8",
            "--batch-size", "2", "--threads", "1", "--budget", "900", "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    results = setup["bench"].main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    ranks, one = results["ranks"], results["one_process"]
    assert ranks["exit_codes"] == [0, 0] and ranks["processes"] == 2 and ranks["made"] == 8, ranks
    assert one["exit_codes"] == [0] and one["processes"] == 1 and one["made"] == 8, one
    assert results["identical_files"] is True and results["files"]["images"] == 8 and results["files"]["differing"] == []
    assert results["scaling_2_ranks_vs_1_process"] == ranks["steady_images_per_s"] / one["steady_images_per_s"]


@pytest.mark.slow
def test_a_held_folder_refuses_the_launch_on_every_rank(setup: dict[str, Any]) -> None:
    """The ranks of one launch are one writer, and another generate already writes here: all ranks stop."""
    out = setup["root"] / "held"
    with locks.holding(locks.folder_lock(out), f"generate output {out}", "generate"):
        run = torchrun(["--nproc_per_node", "2", "--master_port", str(setup["bench"].free_port())], setup["plan"], out)
        output = run.communicate(timeout=600)[0]
    assert run.returncode != 0
    assert f"generate output {out} is in use: generate by pid {os.getpid()}" in output
    assert "rank 1 of 2: rank 0 stopped: generate output" in output
    assert not (out / "plan.json").exists()


@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_same_launch_again_finishes(setup: dict[str, Any]) -> None:
    out = setup["root"] / "killed"
    port = str(setup["bench"].free_port())
    nodes = [
        torchrun(["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port],
                 setup["plan"], out, start_new_session=True)
        for node in (0, 1)
    ]  # fmt: skip
    # node 1 stops (frozen) once the ranks have met and rank 0 has prepared the folder; rank 0 makes its
    # share (images 0, 1, 4, 5) and waits for it; then node 1 is lost, launcher and rank, as a dead machine
    deadline = time.monotonic() + 600
    while not (out / "plan.json").exists() and nodes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_family(nodes[1].pid, signal.SIGSTOP)
    mine = [out / ".staging" / f"{n}-0.png" for n in (0, 1, 4, 5)]
    while not all(p.exists() for p in mine) and nodes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_family(nodes[1].pid, signal.SIGKILL)
    output = nodes[0].communicate(timeout=600)[0]
    nodes[1].communicate()
    assert nodes[0].returncode != 0
    assert "rank 0 of 2: another rank stopped or could not be reached" in output, output
    assert "run the same launch again to continue" in output
    assert not locks.record_path(locks.folder_lock(out)).exists()

    again = setup["bench"].two_launches(setup["plan"], out, False, "1", 600)
    assert again["exit_codes"] == [0, 0] and again["finished"] == 8 and again["made"] <= 4, again  # rank 0's were kept
    assert setup["bench"].file_hashes(out) == setup["reference"]
