"""Two processes, CUDA graphs under DDP: the same training as eager DDP, and the 2-GPU scaling (issue #18).

`check` trains one LoRA for a few steps in 2 processes (torchrun; NCCL on GPUs, gloo on a CPU), in
kohya's step order: `accelerator.prepare(network, optimizer)` (DDP), text encoder and U-Net forward
under autocast, `accelerator.backward`, the trainer's `all_reduce_network`, clip, AdamW, gradients set
to None. It runs each mode from the same weights on the same per-rank data:

- `eager+kohya-sync`: `cuda_graph=off grad_sync=kohya`: kohya's own sync (what 2 GPUs ran before);
- `eager+bucket`: `cuda_graph=off`, one collective per dtype (dermkohya.networks.grad_sync);
- `graphs+bucket` / `graphs+kohya-sync` (CUDA only): the U-Net step replayed from CUDA graphs.

and reports, per mode and step, the losses, the gradients after sync against the mean of both ranks'
gradients before it (gathered), whether DDP itself synced anything (kohya never calls its forward),
whether the ranks hold the same gradients after sync, and the largest differences between modes (per
step gradients, losses, final weights). `--model sd15` uses kohya's own full-size SD 1.5 U-Net
(random weights, fp16, SDPA) and a 2-layer CLIP text encoder; `--model tiny` the toy models of
tests/_networks_check.py (graphs with `cuda_graph=on`: a toy class is not on the verified list).

Before the check, the same processes run a self-test on the GPUs (`selftest`, tiny models, seconds):
the capture under DDP as lora_fast makes it (over alias leaves of the LoRA weights) against eager DDP;
a U-Net whose capture always fails (it synchronises the device while capturing), which must fall back
to the eager path with a usable device (the random generator included); after the check, the capture
as it was before issue #18's fix (the DDP-held parameters in the capture), for the record. Every
failure is kept with its full traceback in the JSON (`check.selftest`, or `check.tracebacks` for a
process that died). On a CPU the same runs are eager (nothing to judge).

`throughput` runs `dermkohya train` on the random SD 1.5 through bench/train_throughput.py's Bench:
the default on 1 GPU, then `[launch] processes = 2` with graphs (the default), and, as time allows,
2 GPUs with kohya's per-tensor sync and 2 GPUs eager; `scaling_2gpu_vs_1gpu_default` is the 2-GPU
default's images/s over the 1-GPU default's, same call.

On nvidia-h200-x2: `bash bench/gpu_ddp.sh` (≤ 5 min). Here: `python bench/ddp_graphs.py --smoke`
(the check on a CPU with gloo, tiny models; no throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = {  # name: (cuda_graph, grad_sync, needs CUDA)
    "eager+kohya-sync": ("off", "kohya", False),
    "eager+bucket": ("off", "bucket", False),
    "graphs+bucket": ("on", "bucket", True),
    "graphs+kohya-sync": ("on", "kohya", True),
}
STEPS = 4
SELFTEST = {  # name: (mode, model, capture)
    "eager+bucket": ("eager+bucket", "tiny", "aliases"),
    "graphs+bucket": ("graphs+bucket", "tiny", "aliases"),
    "capture-fails": ("graphs+bucket", "tiny-failing", "aliases"),
}
BEFORE_FIX = ("graphs+bucket", "tiny", "module")  # run after the check: what it may leave cannot cost the check


# --- the check: one worker per rank, under torchrun ------------------------------------------------------


def _sd_scripts() -> Path:
    env = os.environ.get("SD_SCRIPTS_DIR")
    if env:
        return Path(env)
    device = ROOT / ".device" / "sd-scripts"
    return device if (device / "train_network.py").is_file() else ROOT / "vendor" / "sd-scripts"


def _models(kind: str, device: Any, dtype: Any) -> tuple[Any, Any]:
    """The same weights in every process and mode: built from seed 0."""
    import torch

    torch.manual_seed(0)
    if kind.startswith("tiny"):
        sys.path.insert(0, str(ROOT / "tests"))
        from _networks_check import TinyTextEncoder, TinyUNet

        te, unet = TinyTextEncoder(), (_capture_failing_unet() if kind == "tiny-failing" else TinyUNet())
    else:
        from library.original_unet import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device(device):
            unet = UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
            te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=2, max_position_embeddings=77))
        unet.set_use_sdpa(True)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    return te.to(device, dtype=dtype).eval(), unet.to(device, dtype=dtype).eval()


def _capture_failing_unet() -> Any:
    """A tiny U-Net that synchronises the device when its stream is capturing: every capture of it fails
    the way a real one can (an invalidated capture, capture_end raising)."""
    import torch
    from _networks_check import TinyUNet

    class CaptureFailingUNet(TinyUNet):
        def forward(self, x: Any, cond: Any) -> Any:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()
            return super().forward(x, cond)

    return CaptureFailingUNet()


def _module_capture(module: Any, sample_args: tuple[Any, ...], make_graphed: Any = None, **options: Any) -> Any:
    """lora_fast's capture before issue #18's fix: the module's own parameters, which DDP holds, in the capture."""
    import torch

    return torch.cuda.make_graphed_callables(module, sample_args, **options)


def _batch(kind: str, step: int, rank: int, device: Any) -> dict[str, Any]:
    """Different data on each rank (as DDP's sampler gives), the same in every mode."""
    import torch

    gen = torch.Generator().manual_seed(1000 * step + rank)
    if kind.startswith("tiny"):
        return {"tokens": torch.randn(2, 5, 16, generator=gen).to(device),
                "latents": torch.randn(2, 8, 6, 6, generator=gen).to(device)}
    return {"ids": torch.randint(0, 49408, (2, 77), generator=gen).to(device),
            "latents": torch.randn(2, 4, 64, 64, generator=gen).to(device),
            "timesteps": torch.randint(0, 1000, (2,), generator=gen).to(device),
            "target": torch.randn(2, 4, 64, 64, generator=gen).to(device)}


def _loss(kind: str, te: Any, unet: Any, batch: dict[str, Any]) -> Any:
    import torch.nn.functional as F

    if kind.startswith("tiny"):
        return unet(batch["latents"], te(batch["tokens"])).float().pow(2).mean()
    cond = te(batch["ids"])[0]
    pred = unet(batch["latents"], batch["timesteps"], cond).sample
    return F.mse_loss(pred.float(), batch["target"].float())


def _flat_grads(network: Any) -> Any:
    import torch

    return torch.cat([p.grad.detach().float().reshape(-1) for p in network.parameters() if p.grad is not None])


def _gather(tensor: Any) -> list[Any]:
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _run_mode(mode: str, kind: str, accelerator: Any, trainer: Any) -> dict[str, Any]:
    """Train STEPS steps in kohya's order; per step: loss, gradients before and after sync."""
    import torch

    from dermkohya.networks import lora_fast

    cuda_graph, sync, _ = MODES[mode]
    device = accelerator.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    te, unet = _models(kind, device, dtype)
    torch.manual_seed(1)
    dim, alpha = (4, 2.0) if kind.startswith("tiny") else (16, 16.0)
    network = lora_fast.create_network(1.0, dim, alpha, None, te, unet, cuda_graph=cuda_graph, grad_sync=sync)
    trainer.prepare(network, argparse.Namespace(gradient_accumulation_steps=1, gradient_checkpointing=False))
    network.apply_to(te, unet, True, True)
    with torch.no_grad():  # kohya's LoRA up weights start at zero: move them so every gradient is non-zero
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    if accelerator.scaler is not None:  # fp16: every mode starts from a fresh loss scale
        accelerator.scaler = torch.amp.GradScaler("cuda")
    wrapped, optimizer = accelerator.prepare(network, optimizer)
    network.prepare_grad_etc(te, unet)
    out: dict[str, Any] = {"losses": [], "grads": [], "pre_sync_rank_diff": [], "post_sync_rank_diff": [],
                           "sync_vs_mean_of_ranks": [], "ddp_type": type(wrapped).__name__, "skipped_steps": 0}
    for step in range(STEPS):
        batch = _batch(kind, step, accelerator.process_index, device)
        with accelerator.autocast():
            loss = _loss(kind, te, unet, batch)
        accelerator.backward(loss)
        before = _gather(_flat_grads(network))
        trainer.all_reduce_network(accelerator, wrapped)
        after = _flat_grads(network)
        ranks_after = _gather(after)
        mean = sum(before) / len(before)
        out["pre_sync_rank_diff"].append(float((before[0] - before[1]).abs().max()))
        out["post_sync_rank_diff"].append(float((ranks_after[0] - ranks_after[1]).abs().max()))
        out["sync_vs_mean_of_ranks"].append(float((after - mean).abs().max() / mean.abs().max()))
        out["grads"].append(after.cpu())
        accelerator.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        out["skipped_steps"] += bool(getattr(optimizer, "step_was_skipped", False))  # fp16 overflow
        optimizer.zero_grad(set_to_none=True)
        out["losses"].append([float(v) for v in _gather(loss.detach().float().reshape(1))])
    graphs = network.dk_unet_graphs
    out["graphs_installed"] = graphs is not None
    out["replays"] = graphs.replays if graphs else 0
    out["eager_calls"] = graphs.eager_calls if graphs else None
    out["off_reason"] = graphs.off_reason if graphs else None
    out["capture_error"] = graphs.capture_error if graphs else None  # the failed capture's full traceback
    out["synced_by"] = "bucket" if getattr(trainer.all_reduce_network, "dk_grad_sync", False) else "kohya"
    out["weights"] = torch.cat([p.detach().float().reshape(-1) for p in network.parameters()]).cpu()
    out["lora_params"] = sum(p.numel() for p in network.parameters())
    return out


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    grad_scale = max(float(g.abs().max()) for g in b["grads"])
    return {
        "grad_max_rel_diff": max(float((x - y).abs().max()) for x, y in zip(a["grads"], b["grads"])) / grad_scale,
        "loss_max_rel_diff": max(abs(x - y) / abs(y) for la, lb in zip(a["losses"], b["losses"]) for x, y in zip(la, lb)),
        "weight_max_abs_diff": float((a["weights"] - b["weights"]).abs().max()),
    }


def _selftest_case(mode: str, kind: str, capture: str, accelerator: Any, trainer: Any) -> dict[str, Any]:
    """One self-test run; its failure, whatever it is, becomes a traceback in the report."""
    import traceback

    import torch

    from dermkohya.networks import lora_fast

    started = time.monotonic()
    aliases = lora_fast.capture_over_aliases
    if capture == "module":
        lora_fast.capture_over_aliases = _module_capture
    try:
        run = _run_mode(mode, kind, accelerator, trainer)
    except Exception:
        run = {"error": traceback.format_exc()}
    finally:
        lora_fast.capture_over_aliases = aliases
    try:  # the device, its random generator included, still usable after the run (a failed capture undone)
        torch.randn(8, device=accelerator.device).sum().item()
        run["device_usable_after"] = True
    except Exception:
        run["device_usable_after"] = False
        run["device_error"] = traceback.format_exc()
    run["seconds"] = round(time.monotonic() - started, 1)
    return run


def selftest(accelerator: Any, trainer_type: type, out_path: Path) -> dict[str, Any]:
    """On the GPUs, before the check: lora_fast's capture under DDP, a capture that fails, the old capture."""
    runs = {name: _selftest_case(mode, kind, capture, accelerator, trainer_type())
            for name, (mode, kind, capture) in SELFTEST.items()}
    eager = runs["eager+bucket"]
    report: dict[str, Any] = {"cases": {name: {k: v for k, v in r.items() if k not in ("grads", "weights")}
                                        for name, r in runs.items()}}
    for name, run in runs.items():
        if name != "eager+bucket" and "error" not in run and "error" not in eager:
            report["cases"][name]["vs_eager_bucket"] = _compare(run, eager)
    graphs, fails = runs["graphs+bucket"], runs["capture-fails"]
    if accelerator.device.type != "cuda":  # the CPU smoke: the same runs, eager (no graphs to judge)
        report["graphs_under_ddp_ok"] = report["failed_capture_falls_back_ok"] = None
    else:
        _judge(report, graphs, fails)
    if accelerator.is_main_process:  # kept even if the check after it kills the process
        out_path.with_name("selftest.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _judge(report: dict[str, Any], graphs: dict[str, Any], fails: dict[str, Any]) -> None:
    report["graphs_under_ddp_ok"] = bool(
        "error" not in graphs and graphs["off_reason"] is None and graphs["replays"] == STEPS
        and report["cases"]["graphs+bucket"].get("vs_eager_bucket", {}).get("grad_max_rel_diff", 1.0) <= 2e-3)
    report["failed_capture_falls_back_ok"] = bool(
        "error" not in fails and str(fails["off_reason"]).startswith("capture failed") and fails["replays"] == 0
        and fails["device_usable_after"]
        and report["cases"]["capture-fails"].get("vs_eager_bucket", {}).get("loss_max_rel_diff", 1.0) <= 2e-3)


def worker(kind: str, out_path: Path, modes: list[str]) -> None:
    import traceback

    try:
        _worker(kind, out_path, modes)
    except BaseException:  # the full traceback of each process that dies, for the report
        out_path.with_name(f"rank{os.environ.get('RANK', '0')}.err").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _worker(kind: str, out_path: Path, wanted: list[str]) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(_sd_scripts()))
    os.chdir(_sd_scripts())
    import train_network  # kohya's trainer: its all_reduce_network is the reference sync
    from accelerate import Accelerator

    class Trainer(train_network.NetworkTrainer):
        def prepare(self, network: Any, args: argparse.Namespace) -> None:
            network.prepare_network(args)  # as kohya calls it: from a trainer method

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="fp16" if cuda else "no")
    modes = [m for m, (_, _, needs_cuda) in MODES.items() if m in wanted and (cuda or not needs_cuda)]
    tested = selftest(accelerator, Trainer, out_path)
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        started = time.monotonic()
        runs[mode] = _run_mode(mode, kind, accelerator, Trainer())
        runs[mode]["seconds"] = round(time.monotonic() - started, 1)
    reference = runs.get("eager+kohya-sync")
    report = {
        "model": kind, "world_size": accelerator.num_processes, "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": STEPS, "torch": torch.__version__,
        "modes": {m: {k: v for k, v in r.items() if k not in ("grads", "weights")} for m, r in runs.items()},
        "vs_eager_kohya_sync": {m: _compare(r, reference) for m, r in runs.items()
                                if reference is not None and m != "eager+kohya-sync"},
        "selftest": tested,
    }
    if cuda:
        old = _selftest_case(*BEFORE_FIX, accelerator, Trainer())
        tested["cases"]["module-capture-before-fix"] = {k: v for k, v in old.items() if k not in ("grads", "weights")}
        tested["module_capture_before_fix_failed"] = "error" in old or old.get("off_reason") is not None
    if "graphs+bucket" in runs:
        report["graphs_bucket_vs_eager_bucket"] = _compare(runs["graphs+bucket"], runs["eager+bucket"])
    if accelerator.is_main_process:
        out_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


def check(kind: str, timeout: float, modes: list[str] | None = None) -> dict[str, Any]:
    """Run `worker` in 2 processes under torchrun; its report, or what went wrong (with each dead process's
    traceback and the self-test's report, if it got that far)."""
    modes = modes or list(MODES)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "check.json"
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(Path(__file__).resolve()), "--worker", "--model", kind, "--out", str(out_path), "--modes", ",".join(modes)]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                            "OMP_NUM_THREADS": "1"}
        started = time.monotonic()
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return _failed(Path(tmp), None, f"timed out after {timeout:.0f} s\n" + _text(exc.stdout)[-1500:]
                           + _text(exc.stderr)[-1500:])
        if done.returncode != 0 or not out_path.is_file():
            return _failed(Path(tmp), done.returncode, (done.stdout + done.stderr)[-3000:])
        report = json.loads(out_path.read_text(encoding="utf-8"))
    report["seconds"] = round(time.monotonic() - started, 1)
    report["ok"] = True
    return report


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _failed(tmp: Path, returncode: int | None, error: str) -> dict[str, Any]:
    """A check that did not finish: its output's tail, each dead process's traceback, the self-test's report."""
    failed: dict[str, Any] = {"ok": False, "returncode": returncode, "error": error}
    failed["tracebacks"] = {f.stem: f.read_text(encoding="utf-8") for f in sorted(tmp.glob("rank*.err"))}
    tested = tmp / "selftest.json"
    if tested.is_file():
        failed["selftest"] = json.loads(tested.read_text(encoding="utf-8"))
    return failed


# --- throughput: dermkohya train, 1 vs 2 GPUs --------------------------------------------------------


def throughput_variants(epochs: int) -> list[Any]:
    """1-GPU default, 2-GPU default (graphs, one-bucket sync), then the levers one at a time."""
    import train_throughput as tt

    two = {"launch": {"processes": 2}, "train": {"epochs": 2 * epochs}}  # batch 8 a step: as many steps as 1 GPU
    default = next(v for v in tt.VARIANTS if v.name == "dermkohya-default")
    return [
        default,
        tt.Variant("dermkohya-default-2gpu", "dermkohya", "the default with [launch] processes = 2 (batch 4 per GPU): "
                   "U-Net step as CUDA graphs in each process, gradients averaged in one collective", overrides=two),
        tt.Variant("dermkohya-2gpu-kohya-sync", "dermkohya", "2 GPUs, graphs on, kohya's per-tensor gradient sync "
                   "(network_args grad_sync=kohya): what the one-collective sync gives",
                   overrides=two | {"network": {"args": ["grad_sync=kohya"]}}),
        tt.Variant("dermkohya-eager-2gpu", "dermkohya", "2 GPUs, graphs off, kohya's sync (network_args cuda_graph=off "
                   "grad_sync=kohya): the 2-GPU path before issue #18",
                   overrides=two | {"network": {"args": ["cuda_graph=off", "grad_sync=kohya"]}}),
    ]


def throughput(args: argparse.Namespace, report: dict[str, Any], t0: float, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import train_throughput as tt

    from dermkohya import basemodel, demo, render

    device = ROOT / ".device"
    if (device / "sd-scripts" / "train_network.py").is_file():
        os.environ["SD_SCRIPTS_DIR"] = str(device / "sd-scripts")
    os.environ.setdefault("KOHYA_PYTHON", sys.executable)
    os.environ.setdefault("DERMKOHYA_CACHE", str(work / "cache"))
    os.environ["TQDM_MININTERVAL"] = "0"
    models = ROOT / render.SMOKE_MODELS_DIR
    if (device / "tokenizers").is_dir() and not (models / "tokenizers").exists():
        import shutil

        shutil.copytree(device / "tokenizers", models / "tokenizers")
    started = time.monotonic()
    model_dir, tokenizers = basemodel.ensure_smoke_model("sd15", cache_root=models)
    data_dir = demo.make_demo_dataset(work / "data", seed=0, per_cell=4, size=512)
    report["setup"] = {"model": "random:sd15", "setup_s": round(time.monotonic() - started, 1),
                       "images": len(list(data_dir.glob("*/*.png"))), "epochs_1gpu": args.epochs,
                       "epochs_2gpu": 2 * args.epochs, "warmup_steps_skipped": tt.WARMUP_STEPS}
    sampler = tt.GpuSampler()
    report["machine"] = tt.machine(sampler)
    report["versions"] = tt.versions()
    bench = tt.Bench(root=ROOT, work=work, data_dir=data_dir, model_dir=model_dir, tokenizers=tokenizers,
                     epochs=args.epochs, smoke=False, sampler=sampler, log=args.log or work / "kohya.log")
    report["variants"], report["skipped"] = [], []
    for variant in throughput_variants(args.epochs):
        left = args.budget - (time.monotonic() - t0)
        if left < args.min_slot:
            report["skipped"].append({"name": variant.name, "reason": f"time budget ({left:.0f} s left)"})
            continue
        print(f"[{time.monotonic() - t0:5.0f} s] {variant.name} …", flush=True)
        result = bench.measure(variant, timeout=min(args.variant_timeout, left - 10))
        report["variants"].append(result)
        print(f"[{time.monotonic() - t0:5.0f} s] {variant.name}: ok={result['ok']} images/s={result.get('images_per_s')} "
              f"{result.get('graph_log', [])[-2:]}" + ("" if result["ok"] else f"\n  {str(result.get('error'))[-600:]}"),
              flush=True)
        summarise(report)
        write(args.out, report, work)


def summarise(report: dict[str, Any]) -> None:
    import train_throughput as tt

    by = {v["name"]: v for v in report.get("variants", [])}
    one = (by.get("dermkohya-default") or {}).get("images_per_s")
    scaling = {name: round(v["images_per_s"] / one, 3) for name, v in by.items()
               if one and v.get("images_per_s") and name != "dermkohya-default"}
    report["scaling_2gpu_vs_1gpu_default"] = scaling.get("dermkohya-default-2gpu")
    report["scaling_vs_1gpu_default"] = scaling
    report["images_per_s"] = {name: v.get("images_per_s") for name, v in by.items()}
    two = (by.get("dermkohya-default-2gpu") or {}).get("images_per_s")
    if one and two:  # the block bench/plot_train_throughput.py --multi-gpu reads for the README line
        report["scaling"] = {"about": "same call, same machine: dermkohya's default (CUDA graphs) on 1 GPU vs "
                             "[launch] processes = 2 (batch 4 per GPU, graphs in each process, one-collective sync)",
                             "images_per_s_1gpu": one, "images_per_s_2gpu": two, "efficiency": round(two / one / 2, 3)}
    report["target_1_8x_met"] = (report["scaling_2gpu_vs_1gpu_default"] or 0) >= 1.8
    report["loss_equivalence_2gpu_bucket_vs_kohya_sync"] = tt.loss_equivalence(
        by.get("dermkohya-default-2gpu"), by.get("dermkohya-2gpu-kohya-sync"))
    report["loss_equivalence_2gpu_graphs_vs_eager"] = tt.loss_equivalence(
        by.get("dermkohya-default-2gpu"), by.get("dermkohya-eager-2gpu"))


def write(path: Path, report: dict[str, Any], work: Path | None = None) -> None:
    """The report, machine paths named `<repo>`/`<work>` (train_throughput is not imported: this runs in kohya's
    Python, which lacks its dependencies)."""
    from dermkohya.files import write_atomic

    places = {str(ROOT): "<repo>", **({str(work): "<work>"} if work else {})}
    text = json.dumps(report, indent=1, ensure_ascii=False)
    for place, name in places.items():
        text = text.replace(place, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train-throughput-h200x2.json")
    parser.add_argument("--log", type=Path, help="kohya's combined output of every throughput variant")
    parser.add_argument("--model", choices=("tiny", "sd15"), help="the check's models (default: sd15 on CUDA, tiny here)")
    parser.add_argument("--budget", type=float, default=290, help="seconds for everything (default 290)")
    parser.add_argument("--check-timeout", type=float, default=150)
    parser.add_argument("--variant-timeout", type=float, default=150)
    parser.add_argument("--min-slot", type=float, default=75, help="start a variant only with this many seconds left")
    parser.add_argument("--epochs", type=int, default=4, help="1-GPU epochs of the 72 images (2 GPUs: twice as many)")
    parser.add_argument("--smoke", action="store_true", help="the check only, on a CPU (gloo, tiny models)")
    parser.add_argument("--no-throughput", action="store_true", help="the check only")
    parser.add_argument("--modes", help="the check's modes, comma-separated (default: all four with --budget of 400 s "
                        "or more, else eager+bucket,graphs+bucket: kohya's sync is checked against the bucket on a CPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model or "tiny", args.out, (args.modes or ",".join(MODES)).split(","))
        return 0
    t0 = time.monotonic()
    import torch

    kind = args.model or ("sd15" if torch.cuda.is_available() and not args.smoke else "tiny")
    report: dict[str, Any] = {
        "benchmark": "SD 1.5 LoRA training on 2 GPUs: CUDA graphs under DDP with one-collective gradient sync vs 1 GPU",
        "harness": "bench/ddp_graphs.py (run by bench/gpu_ddp.sh)",
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"[{time.monotonic() - t0:5.0f} s] check ({kind}, 2 processes) …", flush=True)
    modes = args.modes.split(",") if args.modes else (
        list(MODES) if args.smoke or args.budget >= 400 else ["eager+bucket", "graphs+bucket"])
    report["check"] = check(kind, args.check_timeout, modes)
    tested = report["check"].get("selftest") or {}
    print(json.dumps({k: report["check"].get(k) for k in ("ok", "vs_eager_kohya_sync", "graphs_bucket_vs_eager_bucket",
                                                          "error", "tracebacks")}, indent=1), flush=True)
    print("selftest:", json.dumps({k: v for k, v in tested.items() if k != "cases"}), flush=True)
    for name, case in (tested.get("cases") or {}).items():
        failure = case.get("error") or case.get("capture_error") or case.get("device_error")
        print(f"  {name}: replays={case.get('replays')} off_reason={case.get('off_reason')} "
              f"vs_eager={case.get('vs_eager_bucket')}" + (f"\n{failure[-2500:]}" if failure else ""), flush=True)
    write(args.out, report)
    work = Path(tempfile.mkdtemp(prefix="dermkohya-ddp-"))
    if not (args.smoke or args.no_throughput):
        throughput(args, report, t0, work)
    report["harness_seconds"] = round(time.monotonic() - t0, 1)
    write(args.out, report, work)
    print(json.dumps({k: report.get(k) for k in ("scaling_2gpu_vs_1gpu_default", "scaling_vs_1gpu_default",
                                                 "images_per_s", "skipped")}, indent=1))
    return 0 if report["check"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
