"""Sweeps: the sweep file's schema, the rendered variant run files, the SLURM job array, a sweep through the
queue with the stand-in kohya (tests/test_queue.py's), and the demo sweep with the real kohya (`kohya`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from dermkohya import kohya, queue, sweep
from dermkohya.cli import main
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.spec import load_run

from test_queue import project  # noqa: F401  (the stand-in project fixture)

REPO = Path(__file__).resolve().parents[1]
SWEEP = """
name = "lr"
base = "runs/good.toml"

[grid]
network.dim = [8, 16]
train.learning_rate = [5e-5, 1e-4]

[[variants]]
name = "seed7"
train.seed = 7

[slurm]
partition = "gpu"
gpus = 2
time = "02:00:00"
setup = ["export SETUP_RAN=1"]
"""


def _write(root: Path, text: str = SWEEP, name: str = "lr.toml") -> Path:
    (root / "sweeps").mkdir(exist_ok=True)
    path = root / "sweeps" / name
    path.write_text(text)
    return path


def test_a_grid_and_a_list_render_one_committed_run_file_per_variant(project: Path) -> None:  # noqa: F811
    loaded = sweep.load_sweep(_write(project), project)
    assert list(loaded.variants) == ["dim8-learning_rate5e-05", "dim8-learning_rate0.0001", "dim16-learning_rate5e-05",
                                     "dim16-learning_rate0.0001", "seed7"]
    files = sweep.render_variants(loaded, project)
    assert files[0] == Path("runs/lr-dim8-learning_rate5e-05.toml") and files[-1] == Path("runs/lr-seed7.toml")
    spec, name = load_run(project / files[0])
    assert name == "lr-dim8-learning_rate5e-05" and spec.network.dim == 8 and spec.train.learning_rate == 5e-5
    assert spec.train.resolution == 64 and spec.dataset.train_data_dir == "data"  # the rest is the base's
    text = (project / files[0]).read_text()
    assert text.startswith("# Rendered by `dermkohya sweep sweeps/lr.toml` from runs/good.toml") and "#   network.dim = 8" in text
    assert load_run(project / files[-1])[0].train.seed == 7
    assert sweep.render_variants(loaded, project) == files  # its own files are rewritten, never a user's:
    (project / files[-1]).write_text((project / "runs" / "good.toml").read_text())
    with pytest.raises(DermkohyaError, match="was not written by .*lr.toml: rename the sweep"):
        sweep.render_variants(loaded, project)


def test_every_mistake_of_a_sweep_file_at_once_with_lines_and_nearest_keys(project: Path) -> None:  # noqa: F811
    text = SWEEP.replace("network.dim = [8, 16]", "network.dimm = [8, 16]").replace("train.seed = 7", 'train.seed = "seven"')
    with pytest.raises(ProblemsError) as raised:
        sweep.load_sweep(_write(project, text), project)
    problems = raised.value.problems
    assert any("unknown key `[grid network] dimm` (line 6): did you mean `dim`?" in p for p in problems), problems
    with pytest.raises(ProblemsError) as raised:
        sweep.load_sweep(_write(project, SWEEP.replace("train.seed = 7", 'train.seed = "seven"')), project)
    assert any(p.startswith('variant seed7 (train.seed = "seven"): `[train] seed`') for p in raised.value.problems), raised.value.problems
    with pytest.raises(ProblemsError, match="needs a \\[grid\\]"):
        sweep.load_sweep(_write(project, 'base = "runs/good.toml"\n'), project)
    with pytest.raises(DermkohyaError, match="base run file runs/nope.toml not found"):
        sweep.load_sweep(_write(project, SWEEP.replace("runs/good.toml", "runs/nope.toml")), project)


def test_slurm_writes_a_job_array_that_bash_accepts_and_submits_only_when_asked(project: Path, tmp_path: Path,  # noqa: F811
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _write(project, SWEEP.replace("[slurm]", "[slurm]\ndermkohya = \"echo dermkohya\""))
    done = CliRunner().invoke(main, ["sweep", "sweeps/lr.toml", "--slurm"])
    assert done.exit_code == 0, done.output
    script = project / "runs" / "lr.sbatch.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    options = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert "--array=0-4" in options and "--partition=gpu" in options and "--gres=gpu:2" in options
    assert "--time=02:00:00" in options and f"--chdir={project}" in options and "--output=output/slurm/lr-%A_%a.log" in options
    assert (project / "output" / "slurm").is_dir()
    assert not list((project / queue.QUEUE_DIR).glob("slurm-*.json")), "submitted without --submit"
    for task, run in ((0, "lr-dim8-learning_rate5e-05"), (4, "lr-seed7")):  # what each array task runs
        ran = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(task)),
                             capture_output=True, text=True)
        assert ran.returncode == 0 and ran.stdout.strip() == f"dermkohya train runs/{run}.toml", ran.stderr
    assert subprocess.run(["bash", str(script)], capture_output=True).returncode == 2  # not under SLURM

    bin_dir = tmp_path / "bin"  # a stand-in sbatch: prints a job id as `sbatch --parsable` does
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch-args\necho "777;cluster"\n')
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = CliRunner().invoke(main, ["sweep", "sweeps/lr.toml", "--slurm", "--submit"])
    assert done.exit_code == 0 and "submitted job 777" in done.output, done.output
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]
    runs = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["runs", "--json"]).output)}
    assert runs["lr-seed7"]["state"] == "queued" and runs["lr-seed7"]["queued_by"] == "slurm job 777"


def test_a_sweep_trains_its_variants_and_reports_them(project: Path) -> None:  # noqa: F811
    _write(project, 'name = "s"\nbase = "runs/good.toml"\n[grid]\ntrain.seed = [1, 2]\n', "s.toml")
    done = CliRunner().invoke(main, ["sweep", "sweeps/s.toml"])
    assert done.exit_code == 0, done.output
    report = sweep.SweepReport.read(project / "reports" / "sweep-s.json")
    assert [v.run for v in report.variants] == ["s-seed1", "s-seed2"]
    assert all(v.state == "collected" and v.loss == 0.2 and v.artifact == f"artifacts/{v.run}/{v.run}.safetensors"
               for v in report.variants)
    assert report.variants[0].overrides == {"train.seed": 1} and report.plot == "sweep-s.png"
    assert (project / "reports" / "sweep-s.png").stat().st_size > 0
    md = (project / "reports" / "sweep-s.md").read_text()
    assert "| seed1 | `train.seed = 1` | collected |" in md
    again = CliRunner().invoke(main, ["sweep", "sweeps/s.toml"])  # collected variants are kept, not retrained
    assert again.exit_code == 0 and "training" not in again.output, again.output


def _evaluation(root: Path, run: str, fid: float) -> None:
    """reports/<run>.json as `dermkohya evaluate` writes it for images made with the run's artifact."""
    from dermkohya.evaluation_report import EvaluationReport
    from dermkohya.lora import file_sha256

    sha = file_sha256(root / "artifacts" / run / f"{run}.safetensors")
    rows = [{"group": "overall", "label": "overall", "diagnosis": None, "fst": None, "n_real": 10, "n_synthetic": 10,
             "fid": fid, "kid": 0.01},
            *({"group": "fst", "label": fst, "diagnosis": None, "fst": fst, "n_real": 5, "n_synthetic": 5,
               "fid": fid + i, "kid": 0.01 * (i + 1)} for i, fst in enumerate(("I", "VI")))]
    EvaluationReport(plan=run, synthetic=f"synthetic/{run}", real="heldout", train=None, created="2026-11-30T12:00:00+00:00",
                     dermkohya_version="test", base_model=None, loras=[{"path": "x", "sha256": sha, "weight": 1.0}],
                     metrics=["fid"], weights={}, options={}, device="cpu", rows=rows, memorisation=None, plots={},
                     notes=[]).write(root / "reports" / f"{run}.json")


def test_evaluated_variants_report_their_metrics_per_skin_type(project: Path) -> None:  # noqa: F811
    text = 'name = "s"\nbase = "runs/good.toml"\n[grid]\ntrain.seed = [1, 2]\n'
    _write(project, text, "s.toml")
    assert CliRunner().invoke(main, ["sweep", "sweeps/s.toml"]).exit_code == 0
    for run, fid in (("s-seed1", 80.0), ("s-seed2", 90.0)):  # newer than the artifacts: not evaluated again
        _evaluation(project, run, fid)
    _write(project, text + '[evaluate]\nplan = "plans/p.toml"\nheldout = "heldout"\n', "s.toml")
    done = CliRunner().invoke(main, ["sweep", "sweeps/s.toml"])
    assert done.exit_code == 0 and "generating" not in done.output, done.output
    report = sweep.SweepReport.read(project / "reports" / "sweep-s.json")
    first = report.variants[0]
    assert first.evaluation == "reports/s-seed1.json" and first.headline == {"fid": 80.0, "kid": 0.01}
    assert first.per_skin_type == {"I": {"fid": 80.0, "kid": 0.01}, "VI": {"fid": 81.0, "kid": 0.02}}
    md = (project / "reports" / "sweep-s.md").read_text()
    assert "## Per Fitzpatrick skin type" in md and "| seed2 | 90 | 91 |" in md
    runs = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["runs", "--json"]).output)}
    assert runs["s-seed1"]["evaluation"] == {"fid": 80.0, "kid": 0.01}


@pytest.mark.kohya
@pytest.mark.slow
def test_the_demo_sweep_trains_two_variants_on_the_cpu(tmp_path: Path) -> None:
    """sweeps/demo.toml in a copy of this project, with the real kohya: two variants, one report."""
    copy = tmp_path / "project"
    (copy / "runs").mkdir(parents=True)
    (copy / "sweeps").mkdir()
    for name in ("dermkohya.toml", "runs/demo.toml", "sweeps/demo.toml"):
        shutil.copy2(REPO / name, copy / name)
    (REPO / "models").mkdir(exist_ok=True)
    (copy / "models").symlink_to(REPO / "models")  # the smoke model, built once
    env = dict(os.environ, SD_SCRIPTS_DIR=str(kohya.find_sd_scripts(REPO)), KOHYA_PYTHON=str(kohya.find_python(REPO)))
    dk = str(REPO / ".venv" / "bin" / "dermkohya")
    subprocess.run([dk, "demo-data", "datasets/demo/data", "--per-cell", "1"], cwd=copy, env=env, check=True)
    done = subprocess.run([dk, "sweep", "sweeps/demo.toml"], cwd=copy, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = sweep.SweepReport.read(copy / "reports" / "sweep-demo-sweep.json")
    assert [(v.run, v.state) for v in report.variants] == [("demo-sweep-dim8", "collected"), ("demo-sweep-dim16", "collected")]
    assert all(v.loss is not None and v.seconds for v in report.variants)
    dims = [json.loads((copy / "artifacts" / v.run / "manifest.json").read_text())["network"]["dim"] for v in report.variants]
    assert dims == [8, 16]
    assert (copy / "reports" / "sweep-demo-sweep.md").is_file() and (copy / "reports" / "sweep-demo-sweep.png").is_file()
