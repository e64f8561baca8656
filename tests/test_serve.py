"""dermkohya serve: the read API, the files it hands out (and refuses), the token, and the pages, against a
real server process (uvicorn on a free localhost port) and a real HTTP client."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serve import CLI, Server, free_port, make_project  # noqa: E402

from dermkohya.files import sha256_file  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = make_project(tmp_path_factory.mktemp("serve"))
    outside = root.parent / "secret.txt"
    outside.write_text("outside the project")
    (root / "synthetic" / "set" / "leak.png").symlink_to(outside)
    (root / "synthetic" / "escape").symlink_to(root.parent, target_is_directory=True)
    (root / "runs" / "up.toml").symlink_to(root / "dermkohya.toml")  # inside the project, outside runs/
    s = Server(root).wait_ready()
    yield s
    s.stop()


def test_runs_and_run(server: Server) -> None:
    runs = server.client.get("/api/runs").json()
    demo = next(r for r in runs if r["name"] == "demo")
    assert demo["state"] == "collected" and demo["steps"] == "10/10" and demo["loss"] == 0.4
    run = server.client.get("/api/runs/demo").json()
    assert run["manifest"] == {"run": "demo", "rendered": True} and run["launch"]["state"] == "finished"
    assert run["samples"] == ["output/demo/sample/demo_000010_00.png"]
    loss = server.client.get("/api/runs/demo/loss").json()
    assert [p["step"] for p in loss] == list(range(1, 11)) and loss[-1]["loss"] == pytest.approx(0.4)
    assert server.client.get("/api/runs/demo/samples").json() == run["samples"]
    assert server.client.get("/api/runs/nope").status_code == 404


def test_artifacts_and_download_sha(server: Server) -> None:
    assert server.client.get("/api/artifacts").json()[0]["adapter"] == "artifacts/demo/demo.safetensors"
    art = server.client.get("/api/artifacts/demo").json()
    expected = sha256_file(server.project / "artifacts" / "demo" / "demo.safetensors")
    entry = next(f for f in art["files"] if f["path"] == "artifacts/demo/demo.safetensors")
    assert entry["sha256"] == expected and art["model_card"].startswith("# demo")
    download = server.client.get("/api/files/artifacts/demo/demo.safetensors")
    assert download.status_code == 200 and download.headers["x-content-sha256"] == expected
    assert download.content == (server.project / "artifacts" / "demo" / "demo.safetensors").read_bytes()


def test_plans_synthetic_reports(server: Server) -> None:
    plans = server.client.get("/api/plans").json()
    assert any(p["file"] == "plans/demo.toml" for p in plans)
    assert "count" in server.client.get("/api/plans/demo").json()["toml"]
    assert server.client.get("/api/synthetic").json() == [{"name": "set", "images": 3, "plan": False}]
    sset = server.client.get("/api/synthetic/set", params={"fst": "VI"}).json()
    assert {(c["diagnosis"], c["fst"], c["count"]) for c in sset["cells"]} == {("melanoma", "I", 1), ("melanoma", "VI", 1), ("scaly plaque", "VI", 1)}
    assert [(i["diagnosis"], i["seed"]) for i in sset["images"]] == [("melanoma", "1001"), ("scaly plaque", "1002")]
    image = server.client.get("/api/files/" + sset["images"][0]["path"])
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    report = server.client.get("/api/reports/set").json()
    assert [r["label"] for r in report["rows"]] == ["all", "VI"] and report["markdown"] == "# set\n"
    assert server.client.get("/api/reports").json()[0]["name"] == "set"


def _raw_get(server: Server, path: str) -> int:
    """A GET with the path sent exactly as written (httpx would normalise the dot segments away)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.parametrize("path", [
    "/api/files/synthetic/../dermkohya.toml", "/api/files/synthetic/%2e%2e/%2e%2e/secret.txt", "/api/files/synthetic/..%2f..%2fsecret.txt",
    "/api/files/synthetic//etc/passwd", "/api/files/synthetic/%2Fetc%2Fpasswd", "/api/files/etc/passwd", "/api/files/models/x",
    "/api/files/synthetic/set/leak.png", "/api/files/synthetic/escape/secret.txt", "/api/files/runs/up.toml",
    "/api/files/output/demo/demo.safetensors", "/api/files/synthetic/set/..%5c..%5csecret.txt", "/api/runs/..%2f..", "/api/synthetic/..",
    "/api/reports/..%2fsecret", "/api/artifacts/%2e%2e", "/api/plans/..%2fdermkohya", "/api/runs/..%2f..%2fetc/loss",
    "/api/runs/%2e%2e/samples", "/runs/..%2f..", "/synthetic/%2e%2e", "/adapters/..%2fdemo",
])  # fmt: skip
def test_traversal_and_symlink_escapes_are_404(server: Server, path: str) -> None:
    assert _raw_get(server, path) == 404


def test_files_inside_are_served(server: Server) -> None:
    assert _raw_get(server, "/api/files/output/demo/train.log") == 200
    assert _raw_get(server, "/api/files/plans/demo.toml") == 200


def test_pages_render(server: Server) -> None:
    for path in ("/", "/runs/demo", "/adapters/demo", "/synthetic/set?diagnosis=melanoma&fst=VI", "/reports/set", "/jobs", "/docs"):
        page = server.client.get(path)
        assert page.status_code == 200, path
    card = server.client.get("/adapters/demo").text
    assert "<table>" in card and "<script>alert(1)" not in card  # markdown rendered, raw HTML escaped
    assert "<polyline" in server.client.get("/runs/demo").text
    assert "scaly plaque" in server.client.get("/synthetic/set?fst=VI").text
    assert server.client.get("/runs/nope").status_code == 404


def test_non_local_bind_without_token_is_refused(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "DERMKOHYA_TOKEN"}
    done = subprocess.run([sys.executable, "-c", CLI, "serve", "--host", "0.0.0.0", "--port", str(free_port())], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "DERMKOHYA_TOKEN" in done.stderr


def test_token_is_required_when_set(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    s = Server(root, token="s3cret-token", host="0.0.0.0").wait_ready()
    try:
        assert httpx.get(s.url + "/api/runs").status_code == 401
        assert httpx.get(s.url + "/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert s.client.get("/api/runs").status_code == 200
        assert httpx.get(s.url + "/api/runs", cookies={"dermkohya_token": "s3cret-token"}).status_code == 200
        page = httpx.get(s.url + "/")
        assert page.status_code == 401 and "DERMKOHYA_TOKEN" in page.text
        assert httpx.get(s.url + "/docs").status_code == 401
    finally:
        s.stop()
