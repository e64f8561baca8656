"""A real `dermkohya serve` for tests: a project in tmp_path and the server as a subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CLI = "import sys; from dermkohya.cli import main; sys.exit(main(prog_name='dermkohya'))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dermkohya serve` in `project`, its own process group; `stop()` is Ctrl-C."""

    def __init__(self, project: Path, *args: str, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.project, self.port, self.host = project, free_port(), host
        env = {k: v for k, v in os.environ.items() if k != "DERMKOHYA_TOKEN"}
        if token:
            env["DERMKOHYA_TOKEN"] = token
        self.log = open(project / f"serve-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--host", host, "--port", str(self.port), *args],
                                     cwd=project, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {token}"} if token else {})

    def wait_ready(self, timeout: float = 60) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                httpx.get(self.url + "/openapi.json", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"server not ready: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.project / f"serve-{self.port}.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.client.close()
        self.log.close()
        return self.proc.returncode

    def wait_job(self, job_id: int, statuses: tuple[str, ...], timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} never reached {statuses}: {json.dumps(job)[:2000]}")


def make_project(tmp_path: Path) -> Path:
    """A project with one run of each kind of file the server reads (written as the stages write them)."""
    from PIL import Image

    from dermkohya import project

    root = tmp_path / "proj"
    project.init(root)
    (root / "runs" / "demo").mkdir(parents=True, exist_ok=True)
    (root / "runs" / "demo" / "manifest.json").write_text(json.dumps({"run": "demo", "rendered": True}))
    out = root / "output" / "demo"
    (out / "sample").mkdir(parents=True)
    lines = [f"steps:  {s * 10}%|█ | {s}/10 [00:0{s}<00:01, 1.00it/s, avr_loss={0.5 - s * 0.01:.3f}]" for s in range(1, 11)]
    (out / "train.log").write_text("\r".join(lines) + "\n")
    (out / "manifest.json").write_text(json.dumps({"state": "finished", "exit_code": 0, "started": "2026-11-30T10:00:00+00:00", "loss_last": 0.4}))
    Image.new("RGB", (16, 16), (200, 120, 90)).save(out / "sample" / "demo_000010_00.png")
    (out / "demo.safetensors").write_bytes(b"not for the server")
    art = root / "artifacts" / "demo"
    art.mkdir(parents=True)
    (art / "model_card.md").write_text("# demo\n\n| FST | images |\n|---|---|\n| I | 2 |\n\n<script>alert(1)</script>\n")
    (art / "manifest.json").write_text(json.dumps({"started": "2026-11-30T10:00:00+00:00"}))
    (art / "demo.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    syn = root / "synthetic" / "set"
    rows = ["n,diagnosis,fst,prompt,seed,path"]
    for n, (d, f) in enumerate([("melanoma", "I"), ("melanoma", "VI"), ("scaly plaque", "VI")]):
        folder = syn / d.replace(" ", "-") / f
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (n * 60, 80, 80)).save(folder / f"{n:06d}.png")
        rows.append(f"{n},{d},{f},photo of {d} FST {f},{1000 + n},{d.replace(' ', '-')}/{f}/{n:06d}.png")
    (syn / "index.csv").write_text("\n".join(rows) + "\n")
    (root / "plans").mkdir(exist_ok=True)
    (root / "plans" / "demo.toml").write_text((Path(__file__).resolve().parent.parent / "plans" / "demo.toml").read_text())
    (root / "reports").mkdir()
    (root / "reports" / "set.json").write_text(json.dumps({"kind": "evaluation", "plan": "set", "rows": [
        {"group": "all", "label": "all", "fst": None, "n_real": 4, "n_synthetic": 3, "fid": 12.5},
        {"group": "fst", "label": "VI", "fst": "VI", "n_real": 2, "n_synthetic": 2, "fid": 20.25}], "plots": {}}))
    (root / "reports" / "set.md").write_text("# set\n")
    return root
