"""dermkohya serve's job queue against a real server process: an ad-hoc generation on the smoke model
(CPU, 64 px, 2 steps, 2 images) written as a plan and run to completion, 200 concurrent GETs answered
while a job runs, a restart that resumes the interrupted job and runs the queued one, cancel as a process
group stop; and the queue's SQLite record (train recovery, the size limit) and request checks."""

from __future__ import annotations

import csv
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serve import Server, make_project  # noqa: E402

from dermkohya.generate import load_plan  # noqa: E402
from dermkohya.serve.jobs import JobStore, QueueFull  # noqa: E402

TINY = {"kind": "generate", "base": "random:sd15", "diagnosis": "melanoma", "skin_type": "VI", "count": 2,
        "steps": 2, "guidance": 5.0, "width": 64, "height": 64}


def _running(server: Server, job_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.client.get(f"/api/jobs/{job_id}").json()
        if job["status"] == "running" and job["pid"]:
            return job
        assert job["status"] in ("queued", "running"), job  # running without a pid: claimed, not yet started
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never started")


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_generate's tiny random SD pipeline: a CPU generation that takes seconds and little memory."""
    from test_generate import build_tiny_sd

    folder = tmp_path_factory.mktemp("tiny")
    return build_tiny_sd(folder / "model", folder / "tokenizers")


@pytest.mark.slow
def test_generation_on_the_smoke_model_to_completion(tmp_path: Path) -> None:
    from _smoke import link_smoke_model

    root = make_project(tmp_path)
    link_smoke_model(root)
    server = Server(root).wait_ready()
    try:
        job = server.client.post("/api/jobs", json={**TINY, "name": "serve-one", "seed": 1})
        assert job.status_code == 201, job.text
        job = job.json()
        assert job["argv"] == ["generate", "plans/serve-one.toml", "--no-progress"] and job["params"]["total"] == 2
        done = server.wait_job(job["id"], ("finished", "failed", "cancelled"))
        assert done["status"] == "finished" and done["done"] == done["total"] == 2, done
    finally:
        server.stop()
    plan, name = load_plan(root / "plans" / "serve-one.toml")  # the request, reproducible as a plan
    assert name == "serve-one" and plan.sampler.seed == 1 and plan.classes.skin_types == {"VI": 1.0}
    with open(root / "synthetic" / "serve-one" / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["diagnosis"], r["fst"], r["width"]) for r in rows] == [("melanoma", "VI", "64")] * 2


@pytest.mark.slow
def test_restart_resumes_load_is_answered_cancel_stops_the_group(tmp_path: Path, tiny_model: Path) -> None:
    root = make_project(tmp_path)
    shutil.copytree(tiny_model, root / "models" / "tiny")
    quick = {**TINY, "base": "models/tiny", "count": 12}
    first = Server(root).wait_ready()
    try:
        one = first.client.post("/api/jobs", json={**quick, "name": "serve-one", "seed": 1}).json()
        two = first.client.post("/api/jobs", json={**quick, "name": "serve-two", "seed": 2, "count": 4}).json()
        running = _running(first, one["id"])
        assert first.client.get(f"/api/jobs/{two['id']}").json()["status"] == "queued"
    finally:
        assert first.stop() == 0  # Ctrl-C: the job's group is stopped, its row stays running for the next start
    assert _gone(running["pid"])

    second = Server(root).wait_ready()
    try:
        one = second.client.get(f"/api/jobs/{one['id']}").json()
        assert one["resumed"] == 1 and one["status"] in ("queued", "running")
        _running(second, one["id"])
        paths = ["/api/runs", "/api/jobs", f"/api/jobs/{one['id']}", "/api/synthetic/set", "/"] * 40
        with httpx.Client(base_url=second.url, timeout=120, limits=httpx.Limits(max_connections=200)) as client, \
                ThreadPoolExecutor(max_workers=200) as pool:  # 200 GETs at once while the generation runs
            statuses = list(pool.map(lambda p: client.get(p).status_code, paths))
        assert statuses == [200] * 200
        for job, count in ((one, 12), (two, 4)):
            done = second.wait_job(job["id"], ("finished", "failed", "cancelled"))
            assert done["status"] == "finished" and done["done"] == done["total"] == count, done
        gallery = second.client.get("/api/synthetic/serve-two").json()
        assert len(gallery["images"]) == 4 and second.client.get("/api/files/" + gallery["images"][0]["path"]).status_code == 200

        big = second.client.post("/api/jobs", json={**quick, "name": "serve-big", "count": 5000}).json()
        started = _running(second, big["id"])
        queued = second.client.post("/api/jobs", json={**quick, "name": "serve-later"}).json()
        assert second.client.delete(f"/api/jobs/{queued['id']}").json()["status"] == "cancelled"
        second.client.delete(f"/api/jobs/{big['id']}")
        cancelled = second.wait_job(big["id"], ("cancelled", "finished", "failed"), timeout=120)
        assert cancelled["status"] == "cancelled" and _gone(started["pid"])
        assert second.client.get(f"/api/jobs/{queued['id']}").json()["status"] == "cancelled"
    finally:
        second.stop()


def test_requests_are_checked(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    server = Server(root).wait_ready()
    try:
        bad = [
            {**TINY, "extra_args": "--network_module evil"},
            {**TINY, "adapter": "/etc/passwd"},
            {**TINY, "adapter": "../outside.safetensors"},
            {**TINY, "adapter": "runs/demo.toml"},
            {**TINY, "base": "/etc"},
            {**TINY, "skin_type": "VII"},
            {**TINY, "count": 0},
            {**TINY, "width": 65},
            {"kind": "generate", "plan": "../demo"},
            {"kind": "generate", "plan": "missing"},
            {"kind": "train", "run": "missing"},
            {"kind": "train", "run": "demo", "args": ["--max_train_steps", "1"]},
            {"kind": "evaluate", "synthetic": "nope", "real": "datasets"},
            {"kind": "evaluate", "synthetic": "set", "real": "/etc"},
            {"kind": "evaluate", "synthetic": "set", "real": "datasets", "skip": ["fid", "nonsense"]},
            {"kind": "shell", "command": "rm -rf /"},
        ]
        for body in bad:
            answer = server.client.post("/api/jobs", json=body)
            assert answer.status_code == 422, (body, answer.text)
        assert server.client.get("/api/jobs").json() == []
        assert sorted(p.name for p in (root / "plans").glob("*.toml")) == ["demo.toml"]  # no plan written for a refused request
        # a train job runs `dermkohya train` itself: here it stops at the CLI's checks (no dataset; kohya is never launched)
        job = server.client.post("/api/jobs", json={"kind": "train", "run": "demo"}).json()
        assert job["argv"] == ["train", "runs/demo.toml"]
        failed = server.wait_job(job["id"], ("failed", "finished", "stopped"), timeout=120)
        assert failed["status"] == "failed" and failed["returncode"] == 1 and "error:" in " ".join(failed["log_tail"])
        resumed = server.client.post(f"/api/jobs/{job['id']}/resume").json()
        assert resumed["argv"] == ["train", "runs/demo.toml", "--resume"]
        server.wait_job(resumed["id"], ("failed", "finished", "stopped"), timeout=120)
        assert server.client.post(f"/api/jobs/{resumed['id'] + 99}/resume").status_code == 404
        assert server.client.get("/api/jobs/9999").status_code == server.client.delete("/api/jobs/9999").status_code == 404
        evaluation = server.client.post("/api/jobs", json={"kind": "evaluate", "synthetic": "set", "real": "datasets", "skip": ["fid", "clip"]}).json()
        assert evaluation["argv"] == ["evaluate", "--real", "datasets", "--synthetic", "synthetic/set", "--skip", "fid,clip"]
        assert server.wait_job(evaluation["id"], ("failed", "finished"), timeout=300)["returncode"] is not None
    finally:
        server.stop()


def test_store_recovers_a_train_job_as_stopped_and_limits_the_queue(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    train = store.add("train", {"run": "demo"}, ["train", "runs/demo.toml"])
    gen = store.add("generate", {"out": "synthetic/x"}, ["generate", "plans/x.toml"])
    assert store.claim("cpu")["id"] == train
    assert store.claim("gpu 1")["id"] == gen
    store.update(train, pid=2**22 + 12345, pid_start="1")  # a process the restart no longer finds
    assert JobStore(tmp_path).recover() == [gen]  # a fresh store: the same SQLite file, as after a restart
    assert store.get(train)["status"] == "stopped" and "--resume" in store.get(train)["message"]
    assert store.get(gen)["status"] == "queued" and store.get(gen)["resumed"] == 1
    store.add("generate", {}, ["generate"], max_queued=2)
    with pytest.raises(QueueFull):
        store.add("generate", {}, ["generate"], max_queued=2)
    assert (tmp_path / ".dermkohya" / "serve.sqlite").is_file()
