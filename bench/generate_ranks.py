"""`dermkohya generate` across machines: one plan made by two launches of one process each (node ranks 0
and 1 of one torchrun job, each with its own device: what two nodes sharing a filesystem do), and by one
process alone; the files compared byte for byte, images/s of each.

GPU (bench/gpu_generate_ranks.sh on nvidia-h200-x2): python bench/generate_ranks.py --model random:sd15 --random-lora
CPU smoke: python bench/generate_ranks.py --model random:sd15 --random-lora --size 64 --steps 2 --count 8 --batch-size 2
Each launch gets CUDA_VISIBLE_DEVICES=<its node rank> where CUDA is, so each sees one GPU as cuda:0. On a CPU
every process runs with the same OMP_NUM_THREADS (torchrun would set 1 for several processes per node, and
the thread count changes a CPU's rounding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate_levers import NEGATIVE, PLAN  # noqa: E402 (the one plan template of the generation benchmarks)
from generate_throughput import resolve_model, write_random_kohya_lora  # noqa: E402


def write_plan(work: Path, model: Path, lora: Path | None, args: argparse.Namespace) -> Path:
    lora_block = f'[[lora]]\npath = "{lora}"\nweight = 1.0' if lora else ""
    plan = work / "ranks.toml"
    plan.write_text(
        PLAN.format(name="ranks", model=model, lora=lora_block, count=args.count, negative=NEGATIVE, scheduler=args.scheduler,
                    steps=args.steps, guidance=args.guidance, size=args.size, batch=args.batch_size,
                    compile=str(args.compile).lower(), engine_options="", filter="false"),
        encoding="utf-8",
    )  # fmt: skip
    return plan


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(device: int | None, threads: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = threads
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    return env


def generate_argv(plan: Path, out: Path) -> list[str]:
    return ["-m", "dermkohya", "generate", str(plan), "--out", str(out), "--no-progress"]


def one_process(plan: Path, out: Path, gpu: bool, threads: str, timeout: float) -> dict[str, Any]:
    """The plan in one process (on GPU 0 where CUDA is)."""
    argv = [sys.executable, *generate_argv(plan, out)]
    return _wait([subprocess.Popen(argv, env=_env(0 if gpu else None, threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)], out, timeout)  # fmt: skip


def two_launches(plan: Path, out: Path, gpu: bool, threads: str, timeout: float) -> dict[str, Any]:
    """Node ranks 0 and 1 of one torchrun job, started as two separate commands (as on two machines)."""
    port = free_port()
    launches = []
    for node in (0, 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port), *generate_argv(plan, out)]  # fmt: skip
        launches.append(subprocess.Popen(argv, env=_env(node if gpu else None, threads), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True))  # fmt: skip
    return _wait(launches, out, timeout)


def _wait(processes: list[subprocess.Popen[str]], out: Path, timeout: float) -> dict[str, Any]:
    """Their outcome; past `timeout` seconds every one is stopped (with its children) and the run says so."""
    start = time.perf_counter()
    outputs, timed_out = [], False
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))[0])
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            outputs.append(process.communicate()[0] + "\n(timed out)")
    record = _outcome(out, [process.returncode for process in processes], outputs, time.perf_counter() - start)
    return record | {"timed_out": True} if timed_out else record


def _outcome(out: Path, codes: list[int], outputs: list[str], wall_s: float) -> dict[str, Any]:
    record: dict[str, Any] = {"exit_codes": codes, "wall_s": wall_s}
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        record |= {key: summary[key] for key in ("processes", "device", "finished", "made", "images_per_s", "steady_images_per_s", "load_s")}
        record["generate_wall_s"] = summary["wall_s"]
    if any(codes) or not summary_path.is_file():
        record["output_tail"] = [text[-2000:] for text in outputs]
    return record


def file_hashes(out: Path) -> dict[str, str]:
    """Every file generate wrote except summary.json (timings): images, index.csv, plan.json, rejected/."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "summary.json"}  # fmt: skip


def compare(one: Path, ranks: Path) -> dict[str, Any]:
    a, b = file_hashes(one), file_hashes(ranks)
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    images = [k for k in a if k.endswith(".png")]
    return {"files": len(a), "images": len(images), "identical": bool(a) and not differing, "differing": differing[:20]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers SD 1.5 folder, or random:sd15 (built offline)")
    parser.add_argument("--random-lora", action="store_true", help="a random rank-16 kohya-format LoRA for the model")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--count", type=int, default=96, help="images in the plan")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (adds its compile time to each process)")
    parser.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "1"), help="OMP_NUM_THREADS of every process")
    parser.add_argument("--budget", type=float, default=180, help="seconds for the two runs together (after the model and LoRA are made)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate-h200x2-ranks.json")
    args = parser.parse_args(argv)

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="dk-generate-ranks-"))
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    lora = write_random_kohya_lora(model, work / "random_lora.safetensors") if args.random_lora else None
    plan = write_plan(work, model, lora, args)
    gpu = torch.cuda.is_available()
    if gpu and torch.cuda.device_count() < 2:
        raise SystemExit("bench/generate_ranks.py needs two GPUs (or none, on a CPU)")
    results: dict[str, Any] = {
        "benchmark": "generate_ranks",
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": args.model, "lora": "a random rank-16 kohya-format LoRA (--random-lora)" if lora else None,
        "size": args.size, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
        "count": args.count, "batch_size": args.batch_size, "compile": args.compile,
        "how": "two launches of one process each: torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1 "
               "--master_addr 127.0.0.1 -m dermkohya generate (one GPU each via CUDA_VISIBLE_DEVICES), then the "
               "same plan in one process on one GPU into another folder; every file but summary.json compared by sha256",
    }  # fmt: skip
    deadline = time.perf_counter() + args.budget
    results["ranks"] = two_launches(plan, work / "ranks", gpu, args.threads, deadline - time.perf_counter())
    results["one_process"] = one_process(plan, work / "one", gpu, args.threads, max(1.0, deadline - time.perf_counter()))
    results["files"] = compare(work / "one", work / "ranks")
    results["identical_files"] = results["files"]["identical"]
    one_rate, two_rate = results["one_process"].get("steady_images_per_s"), results["ranks"].get("steady_images_per_s")
    results["scaling_2_ranks_vs_1_process"] = two_rate / one_rate if one_rate and two_rate else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"two ranks {two_rate} images/s, one process {one_rate} images/s, identical files: "
          f"{'yes' if results['identical_files'] else 'no'} ({results['files']['images']} images) → {args.out}", flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
