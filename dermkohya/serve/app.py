"""The FastAPI application of `dermkohya serve`: the API, the job queue and the web pages, one project.

Why one process holds everything: a project is one folder on one machine, and the queue's workers must
outlive requests; uvicorn serves requests on its event loop while the workers (threads, one per GPU)
watch their job subprocesses. The token check sits in one middleware in front of everything, /docs too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from dermkohya import __version__
from dermkohya.errors import DermkohyaError
from dermkohya.serve import api, pages, requests, security
from dermkohya.serve.jobs import MAX_QUEUED, JobStore, QueueFull, Workers, tail

jobs_router = APIRouter(prefix="/api/jobs")


def _job_view(request: Request, job: dict[str, Any]) -> dict[str, Any]:
    root = request.app.state.root
    return {**{k: v for k, v in job.items() if k not in ("pid_start",)}, "log_tail": tail(root / job["log"], 20)}


@jobs_router.get("")
def list_jobs(request: Request) -> list[dict[str, Any]]:
    return [{k: v for k, v in job.items() if k != "pid_start"} for job in request.app.state.store.all()]


@jobs_router.post("", status_code=201)
def create_job(request: Request, body: requests.JobRequest = Body(...)) -> dict[str, Any]:
    """Queue `generate` (a plan of plans/, or an ad-hoc request written to plans/), `evaluate` or `train`."""
    state = request.app.state
    try:
        argv, params = requests.to_command(state.root, body)
        job_id = state.store.add(body.kind, params, argv, state.max_queued)
    except QueueFull as exc:
        raise HTTPException(status_code=429, detail=str(exc)) from None
    except DermkohyaError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    state.workers.wake.set()
    return _job_view(request, state.store.get(job_id))


def _existing(job: dict[str, Any] | None) -> dict[str, Any]:
    if job is None:
        raise HTTPException(status_code=404, detail="no such job")
    return job


@jobs_router.get("/{job_id}")
def get_job(job_id: int, request: Request) -> dict[str, Any]:
    return _job_view(request, _existing(request.app.state.store.get(job_id)))


@jobs_router.delete("/{job_id}")
def cancel_job(job_id: int, request: Request) -> dict[str, Any]:
    """Cancel: a queued job at once; a running one by stopping its process group (as Ctrl-C)."""
    return _job_view(request, _existing(request.app.state.store.cancel(job_id)))


@jobs_router.post("/{job_id}/resume", status_code=201)
def resume_job(job_id: int, request: Request) -> dict[str, Any]:
    """A stopped or failed train job, continued from kohya's last saved state (`dermkohya train --resume`)."""
    job = _existing(request.app.state.store.get(job_id))
    if job["kind"] != "train" or job["status"] not in ("stopped", "failed", "cancelled"):
        raise HTTPException(status_code=409, detail="only a stopped, failed or cancelled train job can be resumed")
    return create_job(request, requests.TrainRequest(kind="train", run=job["params"]["run"], resume=True))


def create_app(root: Path, *, token: str | None = None, gpus: list[str] | None = None, workers: bool = True,
               max_queued: int = MAX_QUEUED) -> FastAPI:
    """The application for the project at `root`; `workers=False` serves without running jobs (tests of reads)."""
    root = Path(root).resolve()
    store = JobStore(root)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.requeued = store.recover()
        if workers:
            app.state.workers.start()
        yield
        app.state.workers.close()

    app = FastAPI(title="dermkohya", version=__version__, lifespan=lifespan,
                  description="Runs, adapters, synthetic sets, reports and jobs of one dermkohya project.")
    app.state.root, app.state.store, app.state.max_queued = root, store, max_queued
    app.state.workers = Workers(store, gpus, lambda job: requests.progress(root, job))

    @app.middleware("http")
    async def require_token(request: Request, call_next):  # noqa: ANN001, ANN202
        if security.authorised(token, request.headers.get("authorization"), request.cookies.get(security.COOKIE)):
            return await call_next(request)
        if request.url.path.startswith("/api") or request.url.path.startswith("/openapi"):
            return JSONResponse({"detail": "a token is needed: send `Authorization: Bearer $DERMKOHYA_TOKEN`"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return HTMLResponse(pages.login_page(), status_code=401)

    app.include_router(api.router)
    app.include_router(jobs_router)
    app.include_router(pages.router)
    return app


def serve(root: Path, host: str, port: int, gpus: list[str] | None = None) -> None:
    """Run the server in the foreground until Ctrl-C (which stops running jobs; the next start recovers them)."""
    import uvicorn

    token = security.token_from_env()
    security.check_bind(host, token)
    uvicorn.run(create_app(root, token=token, gpus=gpus), host=host, port=port, log_level="warning")
