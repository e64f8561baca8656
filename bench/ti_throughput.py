"""GPU throughput of FairSkin's two-phase recipe (runs/derm-sd15-ti.toml) beside the LoRA-only default.

One call on one GPU trains, through `dermkohya.train.train` (what `dermkohya train` runs: render, checks,
locks, the launch under the watchdog, the derived base between the phases):

- `ti_then_lora`: a copy of runs/derm-sd15-ti.toml (512 px, fp16, batch 4) pointed at the random-weight
  full-size SD 1.5 (`random:sd15`) and the demo generator's images; phase 1 is one kohya
  `train_textual_inversion.py` run per token, phase 2 `train_network.py` on the derived base;
- `lora_only`: a copy of runs/derm-sd15.toml on the same model, images and number of LoRA steps.

Step counts are cut so everything fits about five minutes (the recipe's 1,500 TI steps per token would not);
it/s does not depend on how many steps follow. The dataset keeps `--diagnoses` of the demo's three
diagnoses (each is one phase-1 kohya run with token_scope = "diagnosis"; each run pays kohya's start-up),
and `cell_scope_estimate` says what the recipe's token_scope = "cell" costs from the measured numbers.

`--family sdxl` runs runs/derm-sdxl-ti.toml's two phases alone on `random:sdxl` at 1024 px (one diagnosis by
default): the check that kohya's sdxl_train_network.py trains on the derived base with two text encoders,
and both phases' it/s (the SDXL LoRA-only numbers are train-throughput-sdxl's).

Every kohya launch is timed (the harness wraps `kohya.launch`, which train and ti call for each phase), and
kohya's progress lines of that launch give its steady it/s (warm-up steps skipped) as in
bench/train_throughput.py. Writes one JSON (`ti-sd15-h200.json` from bench/gpu_ti.sh). `--smoke` runs the
same plumbing on a CPU: 64 px, fp32, a few steps.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dermkohya import kohya, render  # noqa: E402
from train_throughput import (  # noqa: E402
    GpuSampler, Progress, Watchdog, _commit, _write, bench_run_data, machine, steady_state, versions, write_run_file,
)

# family → (two-phase run file, LoRA-only run file or None, resolution, default diagnoses kept)
FAMILIES: dict[str, tuple[str, str | None, int, int]] = {
    "sd15": ("derm-sd15-ti.toml", "derm-sd15.toml", 512, 2),
    "sdxl": ("derm-sdxl-ti.toml", None, 1024, 1),
}
RECIPE_TOKENS_CELL = 18  # 3 demo diagnoses × 6 Fitzpatrick types; the recipe's 1,500 steps each
RECIPE_TI_STEPS = 1500


@dataclass
class Launch:
    """One kohya launch: its script, start and end (monotonic), and its progress lines."""

    script: str
    start: float
    progress: Progress
    end: float | None = None
    returncode: int | None = None


@dataclass
class LaunchTimer:
    """Wraps `kohya.launch` so each phase's launch gets its own progress record and times."""

    launches: list[Launch] = field(default_factory=list)

    def install(self) -> None:
        real = kohya.launch

        def timed(argv: list[str], *args: Any, **kwargs: Any) -> Any:
            script = next((Path(a).name for a in argv if a.endswith(".py")), "?")
            launch = Launch(script, time.monotonic(), Progress())
            self.launches.append(launch)
            try:
                result = real(argv, *args, **kwargs)
                launch.returncode = result.returncode
                return result
            finally:
                launch.end = time.monotonic()

        kohya.launch = timed

    def on_line(self, line: str) -> None:
        if self.launches and self.launches[-1].end is None:
            self.launches[-1].progress(line)


def describe(launch: Launch, warmup: int) -> dict[str, Any]:
    points = launch.progress.points
    steady = steady_state(points, warmup)
    first = min(points) if points else None
    return {
        "script": launch.script,
        "returncode": launch.returncode,
        "wall_s": round((launch.end or time.monotonic()) - launch.start, 1),
        "startup_s": round(points[first][0] - launch.start, 1) if first else None,  # launch to its first step
        "steps": max(points) if points else 0,
        "total_steps": launch.progress.total,
        **steady,
        "final_loss": launch.progress.last_loss,
    }


def limit_diagnoses(data_dir: Path, keep: int) -> list[str]:
    """Keep the first `keep` diagnoses of a demo dataset (images, captions and metadata.csv rows)."""
    text = (data_dir / "metadata.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    kept = list(dict.fromkeys(r["diagnosis"] for r in rows))[:keep]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if row["diagnosis"] in kept:
            writer.writerow(row)
        else:
            image = data_dir / row["image"]
            image.unlink()
            image.with_suffix(".txt").unlink()
    (data_dir / "metadata.csv").write_text(out.getvalue(), encoding="utf-8")
    return kept


@dataclass
class Setup:
    root: Path
    work: Path
    data_dir: Path
    smoke: bool
    ti_steps: int
    lora_steps: int
    family: str = "sd15"


def run_file(setup: Setup, source: str, name: str) -> Path:
    """A copy of a shipped run file on the random model and the bench data, with the bench's step counts."""
    data = bench_run_data(ROOT / "runs" / source, setup.family, setup.data_dir, setup.smoke)
    data["name"] = name
    data["train"].pop("epochs", None)
    data["train"]["max_steps"] = setup.lora_steps
    data.pop("sample", None)  # sampling is not training throughput
    if "textual_inversion" in data:
        # one kohya run per diagnosis (the cell scope's 18 runs would not fit a device call; estimated instead)
        data["textual_inversion"] |= {"token_scope": "diagnosis", "max_steps": setup.ti_steps}
        data["textual_inversion"].pop("token_template", None)
    return write_run_file(setup.work, data)


def measure(setup: Setup, timer: LaunchTimer, path: Path, timeout: float, warmup: int) -> dict[str, Any]:
    """Train one run file through dermkohya.train.train; its launches, wall time and outcome."""
    from dermkohya import train

    before = len(timer.launches)
    started = time.monotonic()
    result: dict[str, Any] = {"run_file": path.name, "ok": False}
    try:
        with Watchdog(timeout) as watchdog:
            trained = train.train(path, project_root=setup.root, new=True, on_line=timer.on_line)
        result |= {"ok": trained.returncode == 0 and not watchdog.fired, "returncode": trained.returncode,
                   "timed_out": watchdog.fired}
        if trained.returncode != 0:
            result["error"] = trained.hint or "\n".join(trained.tail[-15:])
    except Exception as exc:  # the JSON still says what broke
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["wall_s"] = round(time.monotonic() - started, 1)
    launches = timer.launches[before:]
    result["launches"] = [describe(launch, warmup) for launch in launches]
    return result


def summarise(report: dict[str, Any]) -> None:
    """Both phases' it/s beside the LoRA-only default, and what the recipe's cell scope would cost."""
    two, alone = report.get("ti_then_lora") or {}, report.get("lora_only") or {}
    launches = two.get("launches", [])
    ti_runs = [l for l in launches if l["script"].endswith("train_textual_inversion.py")]  # sdxl_… for SDXL
    lora = next((l for l in launches if l["script"].endswith("train_network.py")), None)
    rates = [l["it_per_s"] for l in ti_runs if l.get("it_per_s")]
    phase1 = {"runs": len(ti_runs), "steps": sum(l["steps"] for l in ti_runs),
              "it_per_s": round(statistics.median(rates), 3) if rates else None,
              "wall_s": round(sum(l["wall_s"] for l in ti_runs), 1),
              "startup_s_median": _median([l["startup_s"] for l in ti_runs])}
    report["phase1_textual_inversion"] = phase1
    report["phase2_lora"] = None if lora is None else {k: lora[k] for k in ("it_per_s", "steps", "wall_s", "startup_s")}
    if launches:  # dermkohya's own time: render, checks, the derived base between the phases
        report["dermkohya_outside_kohya_s"] = round(two["wall_s"] - sum(l["wall_s"] for l in launches), 1)
    only = next((l for l in alone.get("launches", []) if l["script"].endswith("train_network.py")), None)
    report["lora_only_default"] = None if only is None else {k: only[k] for k in ("it_per_s", "steps", "wall_s", "startup_s")}
    if only and only.get("it_per_s"):
        if lora and lora.get("it_per_s"):
            report["phase2_vs_lora_only_it_per_s"] = round(lora["it_per_s"] / only["it_per_s"], 3)
        if phase1["it_per_s"]:
            report["phase1_vs_lora_only_it_per_s"] = round(phase1["it_per_s"] / only["it_per_s"], 3)
    if phase1["it_per_s"] and phase1["startup_s_median"] is not None and report.get("family", "sd15") == "sd15":
        per_token = phase1["startup_s_median"] + RECIPE_TI_STEPS / phase1["it_per_s"]
        report["cell_scope_estimate"] = {
            "tokens": RECIPE_TOKENS_CELL, "steps_per_token": RECIPE_TI_STEPS,
            "phase1_s": round(RECIPE_TOKENS_CELL * per_token), "diagnosis_scope_phase1_s": round(3 * per_token),
            "how": "tokens × (median phase-1 start-up + 1,500 steps ÷ phase-1 it/s), one kohya run per token"}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The random model (once per machine) and the demo images; their build times."""
    from dermkohya import basemodel, demo

    device = args.device_dir.resolve()
    if (device / "sd-scripts" / "train_network.py").is_file():
        os.environ["SD_SCRIPTS_DIR"] = str(device / "sd-scripts")
    os.environ.setdefault("KOHYA_PYTHON", sys.executable)
    os.environ.setdefault("DERMKOHYA_CACHE", str(work / "cache"))
    os.environ["TQDM_MININTERVAL"] = "0"  # a progress line per step
    models = args.project_root.resolve() / render.SMOKE_MODELS_DIR
    if (device / "tokenizers").is_dir() and not (models / "tokenizers").exists():
        shutil.copytree(device / "tokenizers", models / "tokenizers")
    started = time.monotonic()
    basemodel.ensure_smoke_model(args.family, cache_root=models)
    model_s = time.monotonic() - started
    started = time.monotonic()
    per_cell, size = (1, 64) if args.smoke else (args.per_cell, FAMILIES[args.family][2])
    data_dir = demo.make_demo_dataset(work / "data", seed=0, per_cell=per_cell, size=size)
    kept = limit_diagnoses(data_dir, args.diagnoses)
    images = len(list(data_dir.glob("*/*.png")))
    return data_dir, {"model": f"random:{args.family} — full-size architecture, random weights (speed does not "
                      "depend on values)", "model_build_s": round(model_s, 1),
                      "dataset": {"generator": "dermkohya.demo.make_demo_dataset", "diagnoses": kept,
                                  "images": images, "size": size, "build_s": round(time.monotonic() - started, 1)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15", help="sd15 (with the LoRA-only default) "
                        "or sdxl (the two phases alone)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ti-sd15-h200.json")
    parser.add_argument("--device-dir", type=Path, default=ROOT / ".device", help="what bench/gpu_prepare.sh made")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dermkohya-bench-ti")
    parser.add_argument("--project-root", type=Path, default=ROOT)
    parser.add_argument("--diagnoses", type=int, help="demo diagnoses kept, one phase-1 run each (default SD 1.5 2, "
                        "SDXL 1; smoke 1)")
    parser.add_argument("--per-cell", type=int, default=6, help="images per diagnosis × skin type (2 × 6 × 6 = 72)")
    parser.add_argument("--ti-steps", type=int, help="phase-1 steps per token (default SD 1.5 50, SDXL 30; smoke 2)")
    parser.add_argument("--lora-steps", type=int, help="LoRA steps, phase 2 and the LoRA-only run (default SD 1.5 60, "
                        "SDXL 40; smoke 2)")
    parser.add_argument("--budget", type=float, help="seconds for the whole harness (default 420; smoke 1500)")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: 64 px, fp32, 2 steps a phase")
    args = parser.parse_args()
    two_phase, lora_only, resolution, diagnoses = FAMILIES[args.family]
    steps, warmup = (50, 10) if args.family == "sd15" else (30, 6)  # SDXL: fewer, slower steps (1024 px)
    args.diagnoses = args.diagnoses or (1 if args.smoke else diagnoses)
    args.budget = args.budget or (1500 if args.smoke else 420)
    t0 = time.monotonic()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict[str, Any] = {
        "benchmark": f"{args.family}: textual inversion then LoRA (runs/{two_phase})"
                     + (f" vs the LoRA-only default (runs/{lora_only})" if lora_only else "") + ", through dermkohya train",
        "family": args.family,
        "harness": "bench/ti_throughput.py (run by bench/gpu_ti.sh)",
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
    }
    try:
        data_dir, report["setup"] = prepare(args, work)
    except Exception as exc:
        _write(args.out, report | {"setup_error": f"{type(exc).__name__}: {exc}", "versions": versions()})
        raise
    sampler = GpuSampler()
    device = args.device_dir.resolve()
    report["machine"] = machine(sampler)
    report["versions"] = versions() | {
        "sd_scripts_commit": kohya.sd_scripts_commit(kohya.find_sd_scripts()) or _commit(device / "sd-scripts.commit"),
        "dermkohya_commit": _commit(device / "repo.commit")}
    setup = Setup(args.project_root.resolve(), work, data_dir, args.smoke,
                  args.ti_steps or (2 if args.smoke else steps), args.lora_steps or (2 if args.smoke else steps + 10), args.family)
    warmup = 1 if args.smoke else warmup
    report["setup"] |= {"ti_steps_per_token": setup.ti_steps, "lora_steps": setup.lora_steps, "batch_size": 4,
                        "resolution": 64 if args.smoke else resolution, "mixed_precision": "no" if args.smoke else "fp16",
                        "warmup_steps_skipped": warmup, "token_scope": "diagnosis",
                        "progress": "kohya's tqdm lines of each launch (TQDM_MININTERVAL=0), time-stamped on arrival"}
    timer = LaunchTimer()
    timer.install()
    places = {str(work): "<work>", str(setup.root): "<repo>"}
    runs = [("ti_then_lora", two_phase, 0.65 if lora_only else 1.0)] + ([("lora_only", lora_only, 1.0)] if lora_only else [])
    for key, source, share in runs:
        left = args.budget - (time.monotonic() - t0)
        print(f"[{time.monotonic() - t0:6.0f} s] {key} ({left:.0f} s left) …", flush=True)
        path = run_file(setup, source, f"bench-{key.replace('_', '-')}")
        report[key] = measure(setup, timer, path, max(30.0, left * share - 5), warmup)
        summarise(report)
        _write(args.out, report, places)
        print(f"[{time.monotonic() - t0:6.0f} s] {key}: ok={report[key]['ok']} wall={report[key]['wall_s']} s "
              + " ".join(f"{l['script']}={l.get('it_per_s')}it/s" for l in report[key]["launches"])
              + ("" if report[key]["ok"] else f"\n  error: {str(report[key].get('error'))[-600:]}"), flush=True)
    report["harness_seconds"] = round(time.monotonic() - t0, 1)
    _write(args.out, report, places)
    print(json.dumps({k: report.get(k) for k in ("phase1_textual_inversion", "phase2_lora", "lora_only_default",
                                                  "phase2_vs_lora_only_it_per_s", "cell_scope_estimate")}, indent=1))
    return 0 if all(report[key]["ok"] for key, _, _ in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
