"""dermkohya serve under load: latency of 200 concurrent GETs while a generation job runs.

Starts `dermkohya serve` (a subprocess, as a user would) on a fresh project with the demo files the API
reads, queues an ad-hoc generation on the smoke model (CPU, 64 px) so a worker is busy, then sends
--requests GETs over the API and the pages from --concurrency threads at once and records every
request's latency; p50/p99/max and the status codes go to bench/results/serve.json. The job is
cancelled at the end (a process-group stop). The figures depend on the machine's load: they are
measured, not asserted (tests/test_serve_jobs.py asserts only that all are answered).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PATHS = ["/api/runs", "/api/jobs", "/api/runs/demo", "/api/runs/demo/loss", "/api/artifacts/demo", "/api/synthetic/set",
         "/api/reports/set", "/api/files/synthetic/set/melanoma/I/000000.png", "/", "/synthetic/set"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()

    from _serve import Server, make_project
    from _smoke import link_smoke_model

    with tempfile.TemporaryDirectory() as scratch:
        root = make_project(Path(scratch))
        link_smoke_model(root)
        server = Server(root).wait_ready()
        try:
            job = server.client.post("/api/jobs", json={"kind": "generate", "name": "bench", "diagnosis": "melanoma", "count": 500,
                                                        "steps": 2, "width": 64, "height": 64}).json()
            while server.client.get(f"/api/jobs/{job['id']}").json()["status"] != "running":
                time.sleep(0.2)

            # one client for all threads (a new httpx client per request costs ~150 ms of the client's CPU for its TLS context)
            client = httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=args.concurrency))

            def one(path: str) -> tuple[int, float]:
                start = time.perf_counter()
                status = client.get(path).status_code
                return status, time.perf_counter() - start

            paths = [PATHS[i % len(PATHS)] for i in range(args.requests)]
            wall = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                results = list(pool.map(one, paths))
            wall = time.perf_counter() - wall
            client.close()
            job_state = server.client.get(f"/api/jobs/{job['id']}").json()
            server.client.delete(f"/api/jobs/{job['id']}")
            server.wait_job(job["id"], ("cancelled", "finished", "failed"), timeout=120)
        finally:
            server.stop()
    latencies = [seconds * 1000 for _, seconds in results]
    codes: dict[str, int] = {}
    for status, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    record = {
        "what": "dermkohya serve: concurrent GETs (API and pages) while one generation job runs on the same machine",
        "requests": args.requests, "concurrency": args.concurrency, "status_codes": codes,
        "p50_ms": round(statistics.median(latencies), 1), "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies), 1), "wall_s": round(wall, 2), "requests_per_s": round(args.requests / wall, 1),
        "job_running_during_load": job_state["status"] == "running", "job_images_at_end": job_state["done"],
        "machine": {"cpus": __import__("os").cpu_count(), "load_avg_1m": __import__("os").getloadavg()[0],
                    "python": platform.python_version(), "platform": platform.platform()},
        "paths": PATHS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("status_codes", "p50_ms", "p99_ms", "max_ms", "requests_per_s")}))


if __name__ == "__main__":
    main()
