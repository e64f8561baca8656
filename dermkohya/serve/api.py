"""The read side of the JSON API: runs, artifacts, plans, synthetic sets, reports and files.

Why it reads the project's files on every request and keeps no cache: the files are the truth (a CLI
command may change them at any moment), and each answer is a few small reads. Runs come from
`queue.project_runs` and states from `runstate`, the same answers as `dermkohya runs`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse

from dermkohya.serve.security import AREAS, NotFound, check_name, safe_dir, safe_file

router = APIRouter(prefix="/api")
T = TypeVar("T")
LOG_READ = 8 * 1024 * 1024  # the end of train.log read for the loss curve
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def root_of(request: Request) -> Path:
    return request.app.state.root


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _rel(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def found(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, with NotFound (missing, or outside what may be read) answered as a plain 404."""
    try:
        return call(*args)
    except NotFound:
        raise HTTPException(status_code=404, detail="not found") from None


# --- runs -----------------------------------------------------------------------------------------------


def runs_list(root: Path) -> list[dict[str, Any]]:
    from dermkohya import queue

    return [queue.run_info_dict(info) for info in queue.project_runs(root)]


def loss_curve(root: Path, name: str) -> list[dict[str, float]]:
    """(step, running loss) from kohya's tqdm lines in output/<run>/train.log, one point per step."""
    from dermkohya import kohya

    log = root / "output" / check_name(name) / "train.log"
    if not log.is_file():
        return []
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - LOG_READ))
        text = f.read().decode("utf-8", errors="replace").replace("\r", "\n")
    points: dict[int, float] = {}
    for line in text.splitlines():
        progress = kohya.parse_progress(line)
        if progress is not None and progress.loss is not None and progress.loss == progress.loss:
            points[progress.step] = progress.loss
    return [{"step": step, "loss": loss} for step, loss in sorted(points.items())]


def run_samples(root: Path, name: str) -> list[str]:
    folder = root / "output" / check_name(name) / "sample"
    if not folder.is_dir():
        return []
    return sorted(_rel(root, p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def run_detail(root: Path, name: str) -> dict[str, Any]:
    check_name(name)
    info = next((run for run in runs_list(root) if run["name"] == name), None)
    if info is None:
        raise NotFound(name)
    run_file = root / info["run_file"] if info["run_file"] else None
    return {
        **info,
        "run_toml": _text(run_file) if run_file else None,
        "manifest": _json(root / "runs" / name / "manifest.json"),
        "launch": _json(root / "output" / name / "manifest.json"),
        "config_toml": _text(root / "runs" / name / "config.toml"),
        "samples": run_samples(root, name),
        "has_log": (root / "output" / name / "train.log").is_file(),
    }


@router.get("/runs")
def get_runs(request: Request) -> list[dict[str, Any]]:
    """Every run: state (runstate's vocabulary), steps, last loss, artifact, evaluation headline."""
    return runs_list(root_of(request))


@router.get("/runs/{name}")
def get_run(name: str, request: Request) -> dict[str, Any]:
    return found(run_detail, root_of(request), name)


@router.get("/runs/{name}/loss")
def get_loss(name: str, request: Request) -> list[dict[str, float]]:
    return found(loss_curve, root_of(request), name)


@router.get("/runs/{name}/samples")
def get_samples(name: str, request: Request) -> list[str]:
    return found(run_samples, root_of(request), name)


# --- artifacts ------------------------------------------------------------------------------------------


def file_entry(root: Path, path: Path) -> dict[str, Any]:
    """A downloadable file: its project path, size and sha256 (the `.sha256` sidecar where collect wrote one)."""
    from dermkohya.files import sha256_file

    sidecar = path.with_name(path.name + ".sha256")
    sha = sidecar.read_text().split()[0] if sidecar.is_file() else sha256_file(path)
    return {"path": _rel(root, path), "size": path.stat().st_size, "sha256": sha}


def artifacts_list(root: Path) -> list[dict[str, Any]]:
    from dermkohya import queue

    found = []
    for path in listed_dirs(root, "artifacts"):
        latest = queue.latest_artifact(root, path.name)
        found.append({"name": path.name, "adapter": None if latest is None else _rel(root, latest),
                      "has_card": (path / "model_card.md").is_file()})
    return found


def listed_dirs(root: Path, area: str) -> list[Path]:
    """The folders of an area that the server may read (a symlink leading out of it is left out)."""
    base = root / area
    found = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            found.append(safe_dir(root, area, path.name))
        except NotFound:
            continue
    return found


def artifact_detail(root: Path, name: str) -> dict[str, Any]:
    folder = safe_dir(root, "artifacts", name)
    files = [file_entry(root, p) for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.endswith(".sha256") and p.resolve().is_relative_to(folder)]
    metadata: dict[str, str] = {}
    adapters = [f for f in files if f["path"].endswith(".safetensors")]
    if adapters:
        try:
            from safetensors import safe_open

            with safe_open(str(root / adapters[-1]["path"]), framework="numpy") as f:
                metadata = {k: v for k, v in (f.metadata() or {}).items() if len(v) < 2000}
        except Exception:  # a file safetensors cannot read: show the rest
            metadata = {}
    return {"name": name, "model_card": _text(folder / "model_card.md"), "manifest": _json(folder / "manifest.json"),
            "files": files, "adapters": [f["path"] for f in adapters], "metadata": metadata}


@router.get("/artifacts")
def get_artifacts(request: Request) -> list[dict[str, Any]]:
    return artifacts_list(root_of(request))


@router.get("/artifacts/{name}")
def get_artifact(name: str, request: Request) -> dict[str, Any]:
    return found(artifact_detail, root_of(request), name)


# --- plans and synthetic sets ---------------------------------------------------------------------------


def plans_list(root: Path) -> list[dict[str, Any]]:
    from dermkohya.errors import DermkohyaError
    from dermkohya.generate import load_plan

    plans = []
    for path in sorted((root / "plans").glob("*.toml")):
        entry: dict[str, Any] = {"file": _rel(root, path), "name": path.stem, "error": None}
        try:
            plan, entry["name"] = load_plan(path)
            entry |= {"description": plan.description, "count": plan.classes.count, "base": plan.model.base,
                      "loras": [lora.path for lora in plan.lora]}
        except DermkohyaError as exc:
            entry["error"] = str(exc)
        plans.append(entry)
    return plans


def read_index(folder: Path) -> list[dict[str, str]]:
    index = folder / "index.csv"
    if not index.is_file():
        return []
    with open(index, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def synthetic_list(root: Path) -> list[dict[str, Any]]:
    sets = []
    for path in listed_dirs(root, "synthetic"):
        sets.append({"name": path.name, "images": len(read_index(path)), "plan": _json(path / "plan.json") is not None})
    return sets


def synthetic_detail(root: Path, name: str, diagnosis: str | None, fst: str | None, limit: int) -> dict[str, Any]:
    folder = safe_dir(root, "synthetic", name)
    rows = read_index(folder)
    cells = Counter((row["diagnosis"], row["fst"]) for row in rows)
    chosen = [row for row in rows if (diagnosis is None or row["diagnosis"] == diagnosis) and (fst is None or row["fst"] == fst)]
    images = [{"n": row["n"], "diagnosis": row["diagnosis"], "fst": row["fst"], "seed": row["seed"], "prompt": row["prompt"],
               "path": f"synthetic/{name}/{row['path']}"} for row in chosen[:limit]]
    plan = _json(folder / "plan.json") or {}
    return {"name": name, "images_total": len(rows), "matching": len(chosen), "images": images,
            "cells": [{"diagnosis": d, "fst": t, "count": c} for (d, t), c in sorted(cells.items())],
            "diagnoses": sorted({d for d, _ in cells}), "skin_types": sorted({t for _, t in cells}),
            "planned": plan.get("count") or plan.get("images"), "plan": plan}


@router.get("/plans")
def get_plans(request: Request) -> list[dict[str, Any]]:
    return plans_list(root_of(request))


@router.get("/plans/{name}")
def get_plan(name: str, request: Request) -> dict[str, Any]:
    root = root_of(request)
    path = found(safe_file, root, "plans", f"{found(check_name, name)}.toml")
    entry = next((p for p in plans_list(root) if p["file"] == _rel(root, path)), {})
    return {**entry, "toml": _text(path)}


@router.get("/synthetic")
def get_synthetic_sets(request: Request) -> list[dict[str, Any]]:
    return synthetic_list(root_of(request))


@router.get("/synthetic/{name}")
def get_synthetic(name: str, request: Request, diagnosis: str | None = None, fst: str | None = None,
                  limit: int = Query(500, ge=1, le=5000)) -> dict[str, Any]:
    """A set's per-cell counts and its images (filtered by diagnosis and skin type), each with seed and prompt."""
    return found(synthetic_detail, root_of(request), name, diagnosis, fst, limit)


# --- reports --------------------------------------------------------------------------------------------


def reports_list(root: Path) -> list[dict[str, Any]]:
    folder = root / "reports"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = _json(path) or {}
        found.append({"name": path.stem, "kind": data.get("kind"), "plan": data.get("plan"), "created": data.get("created")})
    return found


def report_detail(root: Path, name: str) -> dict[str, Any]:
    path = safe_file(root, "reports", f"{check_name(name)}.json")
    data = _json(path)
    if data is None:
        raise NotFound(name)
    plots = data.get("plots") if isinstance(data.get("plots"), dict) else {}
    return {"name": name, "report": data, "markdown": _text(path.with_suffix(".md")),
            "rows": data.get("rows") if isinstance(data.get("rows"), list) else [],
            "plots": {k: f"reports/{v}" for k, v in plots.items() if isinstance(v, str)}}


@router.get("/reports")
def get_reports(request: Request) -> list[dict[str, Any]]:
    return reports_list(root_of(request))


@router.get("/reports/{name}")
def get_report(name: str, request: Request) -> dict[str, Any]:
    """A report's record and its per-skin-type rows (group, label, diagnosis, fst, n, each metric)."""
    return found(report_detail, root_of(request), name)


# --- files ----------------------------------------------------------------------------------------------


@router.get("/files/{area}/{relative:path}")
def get_file(area: str, relative: str, request: Request) -> FileResponse:
    """A file inside runs/, output/ (logs, samples, manifests), artifacts/, plans/, synthetic/ or reports/,
    with its sha256 in `X-Content-SHA256` for artifacts (what a download is checked against)."""
    root = root_of(request)
    path = found(safe_file, root, area, relative)
    headers = {}
    if area == "artifacts":
        headers["X-Content-SHA256"] = file_entry(root, path)["sha256"]
    return FileResponse(path, headers=headers, filename=path.name if area == "artifacts" else None)


__all__ = ["router", "AREAS"]
