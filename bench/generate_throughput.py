"""Generation throughput: `dermkohya generate`'s engine vs the plain diffusers loop a user writes from the seed.

(a) plain: StableDiffusionPipeline, fp16 on CUDA, the LoRA loaded with load_lora_weights (not fused), one
    image per call (batch 1), each saved as PNG — the loop in the FairSkin seed's "Batch Generation".
(b) engine: `dermkohya.generate.generate` on a plan with the same model, LoRA, scheduler, size, steps and
    guidance: fused LoRA, batching, channels-last, fused QKV + SDPA, optionally torch.compile, background
    PNG writes, the quality filter, and 1..N processes. Every configuration asked for is run and recorded.

Both figures are steady state: images/s after the first image (plain) or the first batch (engine), model
loading excluded (reported separately). Writes JSON (default bench/results/generate-h100.json).

`--suite levers` (bench/generate_levers.py; bench/gpu_generate.sh on one GPU → generate-h200.json) instead
measures, in one call within `--budget`, a plain batched StableDiffusionPipeline vs the engine at the same
batch and compile settings, each engine lever alone, and a timed breakdown of one engine batch.

GPU (the lead's run): python bench/generate_throughput.py --model <diffusers SD 1.5 folder> --random-lora
CPU smoke (levers): python bench/generate_throughput.py --suite levers --model random:sd15 --random-lora \
             --size 64 --steps 2 --batch 3 --timed-batches 1 --e2e-count 6 --out generate-cpu.json
CPU smoke: python bench/generate_throughput.py --model random:sd15 --random-lora --size 64 --steps 2 \
             --count 6 --plain-count 2 --batch-sizes 3 --compile no --out generate-cpu.json
Needs dermkohya's `ml` extra (diffusers 0.32.1, transformers 4.54.1, peft, accelerate, scipy) and its base deps.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import generate_levers  # noqa: E402 (the one plan template, prompt and negative prompt of the generation benchmarks)
from generate_levers import NEGATIVE, PROMPT  # noqa: E402
GOAL_IMAGES_PER_S = 4.0
_LORA_TARGETS = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
)


def write_random_kohya_lora(model_dir: Path, path: Path, *, rank: int = 16, seed: int = 0) -> Path:
    """A rank-`rank` LoRA in kohya's format (lora_unet_*/lora_te_*, lora_down/lora_up/alpha) over the
    modules kohya's networks.lora adapts (attention, projections, feed-forward; text-encoder attention
    and MLP), random weights: the load a real adapter puts on generation, with no training needed."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    for prefix, load, folder in (
        ("lora_unet_", UNet2DConditionModel.from_pretrained, "unet"),
        ("lora_te_", CLIPTextModel.from_pretrained, "text_encoder"),
    ):
        model = load(str(model_dir / folder))
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and _LORA_TARGETS.search(name):
                key = prefix + name.replace(".", "_")
                fan_in, fan_out = module.weight.shape[1], module.weight.shape[0]
                down = torch.randn(rank, fan_in, generator=generator) * 0.01
                up = torch.randn(fan_out, rank, generator=generator) * 0.001
                if isinstance(module, torch.nn.Conv2d):
                    down, up = down[:, :, None, None], up[:, :, None, None]
                tensors[f"{key}.lora_down.weight"] = down.half()
                tensors[f"{key}.lora_up.weight"] = up.half()
                tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
        del model
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return path


def resolve_model(spec: str) -> Path:
    if spec.startswith("random:"):
        from dermkohya.generate import resolve_base

        return resolve_base(spec)
    return Path(spec)


def plain_loop(model: Path, lora: Path | None, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """What a user writes from the seed: one pipeline call per image, fp16 on CUDA, saved as PNG."""
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe = pipe.to(device)
    if lora:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        image = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=args.guidance,
            height=args.size, width=args.size, generator=torch.Generator(device).manual_seed(i),
        ).images[0]  # fmt: skip
        image.save(out / f"{i:05d}.png")

    one(0)  # warm-up (cuDNN/cuBLAS heuristics, allocator)
    _sync()
    start = time.perf_counter()
    for i in range(1, args.plain_count + 1):
        one(i)
    _sync()
    seconds = time.perf_counter() - start
    return {
        "what": "StableDiffusionPipeline, one image per call, load_lora_weights (unfused), PNG save",
        "batch_size": 1,
        "precision": str(dtype).removeprefix("torch."),
        "images": args.plain_count,
        "seconds": seconds,
        "images_per_s": args.plain_count / seconds,
        "load_s": load_s,
    }


def engine_run(
    model: Path, lora: Path | None, args: argparse.Namespace, work: Path, batch: int, compile_: bool, processes: int, filter_: bool = True
) -> dict[str, Any]:
    """One engine configuration. If a random-weight model's images fail the quality filter (e.g. NaN in
    fp16), the configuration is measured again with the filter off and both outcomes are recorded."""
    from dermkohya.errors import DermkohyaError

    name = f"bench-b{batch}-{'compiled' if compile_ else 'eager'}-p{processes}{'' if filter_ else '-nofilter'}"
    plan = work / f"{name}.toml"
    lora_block = f'[[lora]]\npath = "{lora}"\nweight = 1.0' if lora else ""
    plan.write_text(
        generate_levers.PLAN.format(name=name, model=model, lora=lora_block, count=args.count, negative=NEGATIVE, scheduler=args.scheduler,
                    steps=args.steps, guidance=args.guidance, size=args.size, batch=batch, compile=str(compile_).lower(),
                    filter=str(filter_).lower(), engine_options=""),
        encoding="utf-8",
    )  # fmt: skip
    record: dict[str, Any] = {"batch_size": batch, "compile": compile_, "processes": processes, "filter": filter_}
    try:
        return record | generate_record(plan, work / "synthetic" / name, processes)
    except DermkohyaError as exc:
        if filter_ and "was rejected" in str(exc):
            return engine_run(model, lora, args, work, batch, compile_, processes, False) | {"filter_on_error": str(exc)}
        return record | {"error": str(exc).splitlines()[0]}
    except Exception as exc:  # a failed configuration is a result, not the end of the benchmark
        return record | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        _free()


def generate_record(plan: Path, out: Path, processes: int = 1) -> dict[str, Any]:
    """`dermkohya generate` on a plan, as a benchmark record (steady state: after the first batch)."""
    from dermkohya.generate import generate

    result = generate(plan, out=out, processes=processes, show_progress=False)
    return {
        "images": result.finished,
        "made": result.made,
        "steady_images_per_s": result.steady_images_per_s,
        "images_per_s_incl_first_batch": result.images_per_s,
        "load_s": result.load_s,
        "wall_s": result.wall_s,
        "rejected": result.rejected,
        "device": result.device,
        "loop": result.loop,
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers SD 1.5 folder, or random:sd15 (built offline); required unless --table")
    parser.add_argument("--lora", type=Path, help="a kohya LoRA .safetensors for both loops")
    parser.add_argument("--random-lora", action="store_true", help="write a random rank-16 kohya-format LoRA for the model")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="pndm", help="the engine's scheduler; pndm is the SD 1.5 pipeline default the plain loop uses")
    parser.add_argument("--count", type=int, default=192, help="images per engine configuration")
    parser.add_argument("--plain-count", type=int, default=12, help="images timed in the plain loop (after one warm-up)")
    parser.add_argument("--batch-sizes", default="16", help="engine batch sizes, comma-separated")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--processes", default="1", help="engine process counts, comma-separated (e.g. 1,2 on two GPUs)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate-h100.json")
    parser.add_argument("--suite", choices=("grid", "levers"), default="grid",
                        help="grid: `generate` per batch size × compile × processes (above); levers: plain batched pipeline vs "
                        "the engine, each lever alone, a timed breakdown of one batch (bench/generate_levers.py)")  # fmt: skip
    levers = parser.add_argument_group("--suite levers")
    levers.add_argument("--batch", type=int, default=16, help="batch size of the plain pipeline and every engine variant")
    levers.add_argument("--timed-batches", type=int, default=2, help="timed batches per variant, after one warm-up batch")
    levers.add_argument("--e2e-count", type=int, default=160, help="images of the end-to-end `generate` run (the "
                        "headline): 10 batches of 16, since its steady rate starts after the first batch and ends when "
                        "the last batch's PNGs are written (not overlapped): with 48 images that drain was a third of it")
    levers.add_argument("--e2e-engine", action="append", metavar="KEY=VALUE",
                        help="an [engine] option of the end-to-end run's plan (repeatable), e.g. conv1x1_as_mm=true")
    levers.add_argument("--budget", type=float, default=420, help="seconds for the suite; what does not fit is skipped and listed")
    levers.add_argument("--batch-estimate", type=float, default=6.5, help="seconds per batch assumed until one is measured")
    levers.add_argument("--variants", help="only these measurements, comma-separated (names as printed; default: all)")
    levers.add_argument("--compile-estimate", type=float, default=70, help="seconds per compile assumed until one is measured")
    parser.add_argument("--table", type=Path, help="measure nothing: print the README tables of a --suite levers JSON")
    parser.add_argument("--readme", type=Path, help="with --table: replace the README's generate-levers block instead of printing")
    args = parser.parse_args(argv)
    if args.table:
        return _table(args.table, args.readme)
    if not args.model:
        parser.error("--model is required (or --table JSON)")

    import diffusers
    import torch
    import transformers

    work = args.work or Path(tempfile.mkdtemp(prefix="dk-generate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    lora = args.lora
    if lora is None and args.random_lora:
        lora = write_random_kohya_lora(model, work / "random_lora.safetensors")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    results: dict[str, Any] = {
        "benchmark": "generate_throughput",
        "device": device,
        "gpus": torch.cuda.device_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "model": args.model,
        "lora": ("a random rank-16 kohya-format LoRA written by the harness (--random-lora)" if args.random_lora else lora.name) if lora else None,
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "note": "steady-state images/s: after one warm-up image (plain) or the first batch (engine); loading excluded",
    }
    if args.suite == "levers":
        return _write(args.out, _levers_suite(results, model, lora, args, work))
    if not args.skip_plain:
        results["plain"] = plain_loop(model, lora, args, work / "plain")
        _free()
        print(f"plain loop: {results['plain']['images_per_s']:.3f} images/s", flush=True)
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    runs = []
    for processes in (int(p) for p in args.processes.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for compile_ in compiles:
                run = engine_run(model, lora, args, work, batch, compile_, processes)
                runs.append(run)
                rate = run.get("steady_images_per_s")
                print(f"engine batch {batch} compile {compile_} processes {processes}: "
                      f"{f'{rate:.3f} images/s' if rate else run.get('error', 'no steady-state figure')}", flush=True)  # fmt: skip
    results["engine_runs"] = runs
    single = [r for r in runs if r.get("steady_images_per_s") and r["processes"] == 1]
    if single:
        best = max(single, key=lambda r: r["steady_images_per_s"])
        results["engine"] = best
        results["meets_goal"] = best["steady_images_per_s"] >= GOAL_IMAGES_PER_S
        results["goal_images_per_s"] = GOAL_IMAGES_PER_S
        results["hours_for_60k_images"] = 60000 / best["steady_images_per_s"] / 3600
        if "plain" in results:
            results["speedup"] = best["steady_images_per_s"] / results["plain"]["images_per_s"]
    multi = [r for r in runs if r.get("steady_images_per_s") and r["processes"] > 1]
    if single and multi:
        base = {(r["batch_size"], r["compile"]): r["steady_images_per_s"] for r in single}
        results["scaling"] = [
            {"processes": r["processes"], "batch_size": r["batch_size"], "compile": r["compile"],
             "images_per_s": r["steady_images_per_s"], "vs_one_process": r["steady_images_per_s"] / base[(r["batch_size"], r["compile"])]}
            for r in multi if (r["batch_size"], r["compile"]) in base
        ]  # fmt: skip
    _write(args.out, results)
    summary = f"engine {results['engine']['steady_images_per_s']:.3f} images/s" if "engine" in results else "engine: no result"
    if "speedup" in results:
        summary += f", {results['speedup']:.2f}× the plain loop"
    print(f"{summary} → {args.out}", flush=True)
    return results


def _levers_suite(results: dict[str, Any], model: Path, lora: Path | None, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    def e2e(plan: Path, name: str) -> dict[str, Any]:
        return generate_record(plan, work / "synthetic" / name)

    header = dict(results)
    results = header | generate_levers.run(model, lora, args, work, e2e, lambda partial: _write(args.out, header | partial))
    results["complete"] = True
    engine = results.get("engine", {})
    ratio = results.get("engine_vs_plain_batched")
    print(f"engine (generate, batch {args.batch}, compile {engine.get('compile_mode') or 'none'}): "
          f"{engine.get('steady_images_per_s') or engine.get('error', 'no result')} images/s; vs plain batched: {ratio}", flush=True)  # fmt: skip
    return results


def _table(source: Path, readme: Path | None) -> dict[str, Any]:
    results = json.loads(source.read_text(encoding="utf-8"))
    try:
        shown = source.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = source.name
    block = generate_levers.readme_block(results, shown)
    if readme:
        generate_levers.update_readme(readme, block)
    else:
        print(block, end="")
    return results


def _write(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
