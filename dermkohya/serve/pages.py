"""The web UI: server-rendered pages (jinja2, dermkohya/templates/serve/) over the same functions as the API.

Why server-rendered with a little vanilla JS and no front-end build: the pages show files that already
exist (tables, a loss curve, images, a model card), so the server can render each in one pass; the only
live parts, job progress and the generate form, are a few lines of `fetch` against the JSON API. Nothing
to compile, nothing for the wheel to ship but templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dermkohya.paths import TEMPLATES_DIR
from dermkohya.serve import api

router = APIRouter()
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR / "serve"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def markdown(text: str | None) -> str:
    """A model card or report as HTML; raw HTML in the markdown is escaped, not passed through."""
    if not text:
        return ""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def loss_svg(points: list[dict[str, float]], width: int = 640, height: int = 220) -> dict[str, Any] | None:
    """The loss curve as an SVG polyline's points and axis labels (no plotting library in the page)."""
    if len(points) < 2:
        return None
    steps = [p["step"] for p in points]
    losses = [p["loss"] for p in points]
    lo, hi = min(losses), max(losses)
    span_x, span_y = (max(steps) - min(steps)) or 1, (hi - lo) or 1.0
    pad = 30
    coords = " ".join(f"{pad + (s - min(steps)) / span_x * (width - 2 * pad):.1f},"
                      f"{height - pad - (v - lo) / span_y * (height - 2 * pad):.1f}" for s, v in zip(steps, losses))
    return {"points": coords, "width": width, "height": height, "lo": lo, "hi": hi, "first": min(steps), "last": max(steps)}


def _page(name: str, **context: Any) -> HTMLResponse:
    return HTMLResponse(_env.get_template(name).render(**context))


def login_page() -> str:
    return _env.get_template("login.html.j2").render(title="token")


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request) -> HTMLResponse:
    root: Path = request.app.state.root
    return _page("runs.html.j2", title="runs", root=str(root), runs=api.runs_list(root), artifacts=api.artifacts_list(root),
                 plans=api.plans_list(root), sets=api.synthetic_list(root), reports=api.reports_list(root))


@router.get("/runs/{name}", response_class=HTMLResponse)
def run_page(name: str, request: Request) -> HTMLResponse:
    root = request.app.state.root
    run = api.found(api.run_detail, root, name)
    return _page("run.html.j2", title=f"run {name}", run=run, loss=loss_svg(api.loss_curve(root, name)),
                 card=markdown(api._text(root / "artifacts" / name / "model_card.md")))


@router.get("/adapters/{name}", response_class=HTMLResponse)
def adapter_page(name: str, request: Request) -> HTMLResponse:
    artifact = api.found(api.artifact_detail, request.app.state.root, name)
    return _page("adapter.html.j2", title=f"adapter {name}", a=artifact, card=markdown(artifact["model_card"]))


@router.get("/synthetic/{name}", response_class=HTMLResponse)
def synthetic_page(name: str, request: Request, diagnosis: str | None = None, fst: str | None = None) -> HTMLResponse:
    data = api.found(api.synthetic_detail, request.app.state.root, name, diagnosis or None, fst or None, 500)
    return _page("synthetic.html.j2", title=f"synthetic {name}", s=data, diagnosis=diagnosis or "", fst=fst or "")


@router.get("/reports/{name}", response_class=HTMLResponse)
def report_page(name: str, request: Request) -> HTMLResponse:
    data = api.found(api.report_detail, request.app.state.root, name)
    columns = [k for k in (data["rows"][0] if data["rows"] else {}) if k not in ("group",)]
    return _page("report.html.j2", title=f"report {name}", r=data, columns=columns, md=markdown(data["markdown"]))


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    root = request.app.state.root
    return _page("jobs.html.j2", title="jobs", plans=api.plans_list(root), artifacts=api.artifacts_list(root))
