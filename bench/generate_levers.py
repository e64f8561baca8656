"""Where generation time goes, in one device call: a plain batched diffusers pipeline vs dermkohya's engine
at the same batch and compile settings, the engine's levers one at a time, and a timed breakdown of one
engine batch. `bench/generate_throughput.py --suite levers` runs it (bench/gpu_generate.sh on one GPU).

Every measurement is steady state (after one warm-up batch that also compiles), loading excluded but
reported. A measurement whose estimated cost does not fit in what is left of `--budget` is skipped and
listed under `skipped` with its estimate, so a short call still returns the most important figures first.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROMPT = "clinical dermatology photograph, melanoma, Fitzpatrick skin type VI"
NEGATIVE = "blurry, low quality, text, watermark"

# the plan every generation benchmark writes (generate_throughput.py's with engine_options empty)
PLAN = """\
name = "{name}"
[model]
base = "{model}"
{lora}
[classes]
diagnoses = ["melanoma", "nevus", "basal cell carcinoma"]
skin_types = "equal"
count = {count}
[prompt]
negative = "{negative}"
[sampler]
scheduler = "{scheduler}"
steps = {steps}
guidance = {guidance}
width = {size}
height = {size}
seed = 0
[engine]
batch_size = {batch}
compile = {compile}
{engine_options}
[filter]
enabled = {filter}
"""


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph pools
        torch.cuda.empty_cache()


def write_plan(work: Path, name: str, model: Path, lora: Path | None, args: argparse.Namespace, *, count: int,
               compile_mode: str | None, filter_: bool = True, **engine: bool | str) -> Path:  # fmt: skip
    """A plan for the harness's model and LoRA with the given [engine] options (compile_mode None: eager;
    options not given keep the plan's defaults)."""
    options = [f"{key} = {str(value).lower()}" if isinstance(value, bool) else f'{key} = "{value}"' for key, value in engine.items()]
    if compile_mode:
        options.append(f'compile_mode = "{compile_mode}"')
    path = work / f"{name}.toml"
    path.write_text(
        PLAN.format(
            name=name, model=model, lora=f'[[lora]]\npath = "{lora}"\nweight = 1.0' if lora else "", count=count,
            negative=NEGATIVE, scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, size=args.size,
            batch=args.batch, compile=str(bool(compile_mode)).lower(), engine_options="\n".join(options),
            filter=str(filter_).lower(),
        ),
        encoding="utf-8",
    )  # fmt: skip
    return path


# --- timing ------------------------------------------------------------------------------------------------


class Stopwatch:
    """Seconds of GPU work between marks: CUDA events on a GPU (no sync until read), the wall clock on a CPU."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[Any, Any]]] = {}
        self.wrapped: list[tuple[Any, str, Any]] = []

    def _mark(self) -> Any:
        import torch

        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self.spans.setdefault(name, []).append((start, self._mark()))

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of owner.attribute (an instance attribute shadows the method; `unwrap` puts
        back what was there, e.g. a compiled module's own forward)."""
        inner = getattr(owner, attribute)
        self.wrapped.append((owner, attribute, vars(owner).get(attribute)))

        def timed(*a: Any, **kw: Any) -> Any:
            with self.span(name):
                return inner(*a, **kw)

        setattr(owner, attribute, timed)

    def unwrap(self) -> None:
        for owner, attribute, before in reversed(self.wrapped):
            if before is None:
                vars(owner).pop(attribute, None)
            else:
                vars(owner)[attribute] = before
        self.wrapped.clear()

    def seconds(self) -> dict[str, dict[str, float]]:
        sync()
        out = {}
        for name, spans in self.spans.items():
            each = [end - start if isinstance(start, float) else start.elapsed_time(end) * 1e-3 for start, end in spans]
            first, last = spans[0][0], spans[-1][1]
            whole = last - first if isinstance(first, float) else first.elapsed_time(last) * 1e-3
            out[name] = {"calls": len(spans), "sum_s": sum(each), "first_to_last_s": whole}
        return out


def timed_batches(call: Callable[[], Any], batches: int) -> tuple[float, Any]:
    """Seconds for `batches` calls after the caller's warm-up, synchronised at both ends."""
    sync()
    start = time.perf_counter()
    result = None
    for _ in range(batches):
        result = call()
    sync()
    return time.perf_counter() - start, result


# --- the plain batched pipeline ----------------------------------------------------------------------------


def plain_batched(model: Path, lora: Path | None, args: argparse.Namespace, compile_mode: str | None) -> dict[str, Any]:
    """What diffusers' docs show: StableDiffusionPipeline in fp16 (SDPA, the model's PNDM scheduler), the
    LoRA loaded and fused, one call per batch of `--batch` prompts with their negative prompt, PIL output
    (not saved: the pipeline alone is the harder reference); optionally the U-Net compiled as the docs do."""
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cuda" if cuda() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32  # the engine's precision "auto"
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
    ).to(device)
    if lora:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    if compile_mode:
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
    load_s = time.perf_counter() - start
    generator = torch.Generator(device)

    def batch() -> Any:
        generator.manual_seed(0)
        return pipe(
            prompt=[PROMPT] * args.batch, negative_prompt=[NEGATIVE] * args.batch, num_inference_steps=args.steps,
            guidance_scale=args.guidance, height=args.size, width=args.size, generator=generator,
        ).images  # fmt: skip

    first = time.perf_counter()
    batch()
    sync()
    first_s = time.perf_counter() - first
    seconds, _ = timed_batches(batch, args.timed_batches)
    return {
        "what": f"StableDiffusionPipeline, {str(dtype).removeprefix('torch.')}, SDPA, PNDM, LoRA fused, one call per batch, PIL output (not saved)"
        + (f", U-Net torch.compile(mode={compile_mode!r}, fullgraph=True)" if compile_mode else ", eager"),
        "batch_size": args.batch,
        "compile_mode": compile_mode,
        **rates(args, seconds, first_s, load_s),
    }


def rates(args: argparse.Namespace, seconds: float, first_s: float, load_s: float) -> dict[str, float]:
    """The timing keys every measurement reports: `args.timed_batches` batches of `args.batch` in `seconds`."""
    images = args.batch * args.timed_batches
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "batch_s": seconds / args.timed_batches, "first_batch_s": first_s, "load_s": load_s}


# --- the engine, called directly ---------------------------------------------------------------------------


def load_engine(plan: Path, work: Path) -> tuple[Any, Any, float]:
    from dermkohya.generate.engine import Engine, device_for
    from dermkohya.generate.job import prepare_job

    start = time.perf_counter()
    job = prepare_job(plan, work / "unused-out", write=False)
    engine = Engine(job, device_for(0))
    return job, engine, time.perf_counter() - start


def first_slots(job: Any) -> list[tuple[str, int] | None]:
    from dermkohya.generate.plan import image_seed

    size = job.plan.engine.batch_size
    return [(item.prompt, image_seed(job.plan.sampler.seed, item.n, 0)) for item in job.items[:size]]


def engine_variant(model: Path, lora: Path | None, args: argparse.Namespace, work: Path, name: str, *,
                   compile_mode: str | None, keep: dict[str, Any] | None = None, **levers: bool | str) -> dict[str, Any]:  # fmt: skip
    """The engine's batch call alone (no filter, no PNG): one warm-up batch, then timed batches. With
    `keep`, the job, engine and last batch are left there for the breakdown and post-processing."""
    plan = write_plan(work, name, model, lora, args, count=args.batch, compile_mode=compile_mode, **levers)
    job, engine, load_s = load_engine(plan, work)
    slots = first_slots(job)
    first = time.perf_counter()
    engine(slots)
    first_s = time.perf_counter() - first
    seconds, last = timed_batches(lambda: engine(slots), args.timed_batches)
    if keep is not None:
        keep.update(job=job, engine=engine, batch=last, slots=slots)
    return {
        "name": name,
        "compile_mode": compile_mode,
        **{key: value and cuda() for key, value in _engine_options(job).items()},
        **rates(args, seconds, first_s, load_s),
    }


def _engine_options(job: Any) -> dict[str, bool]:
    """The levers the variant's plan asked for (the engine applies them on CUDA only)."""
    engine = job.plan.engine
    return {"fuse_qkv": engine.fuse_qkv, "channels_last": engine.channels_last, "compile_vae": engine.compile and engine.compile_vae,
            "cudnn_attention": engine.attention == "cudnn", "conv1x1_as_mm": engine.compile and engine.conv1x1_as_mm}  # fmt: skip


def postprocess_cost(job: Any, engine: Any, batch: tuple[Any, Any]) -> dict[str, float]:
    """Host seconds per batch of what `generate` does after the engine returns, image by image: the
    per-image checks (NaN, blank/clipped, classifier), the perceptual hash, and the PNG with its record."""
    from dermkohya import metrics
    from dermkohya.generate.filter import image_reasons
    from dermkohya.generate.output import image_record, png_bytes

    images, nans = batch
    checks = png = 0.0
    for item, image, nan in zip(job.items, images, nans):
        start = time.perf_counter()
        image_reasons(job.plan, engine.classifier, image, item.diagnosis, bool(nan))
        phash = metrics.phash(image)
        mid = time.perf_counter()
        png_bytes(image, image_record(job, item, 0, 0, phash, [], "float16"))
        png += time.perf_counter() - mid
        checks += mid - start
    return {"host_checks_and_phash_s": checks, "png_s": png, "images": len(images)}


def breakdown(keep: dict[str, Any], batch_s: float) -> dict[str, Any]:
    """One engine batch timed by parts: text encoder, the U-Net (each call, and first-to-last call: the
    denoising loop with its scheduler steps), VAE decode, everything else of the call (latents,
    uint8 conversion, copy to the host), then the host post-processing and PNG encoding."""
    engine, slots = keep["engine"], keep["slots"]
    pipe = engine.pipe
    watch = Stopwatch()
    watch.wrap(pipe.text_encoder, "forward", "text_encoder")
    if hasattr(engine, "embed"):  # the engine's prompt-embedding cache (a hit costs a concatenation)
        watch.wrap(engine, "embed", "prompt_embeddings")
    watch.wrap(pipe.unet, "forward", "unet")
    watch.wrap(pipe.vae, "decode", "vae_decode")
    sync()
    start = time.perf_counter()
    with watch.span("engine_call"):
        images = engine(slots)
    sync()
    wall = time.perf_counter() - start
    watch.unwrap()
    parts = {"text_encoder": {"calls": 0, "sum_s": 0.0}} | watch.seconds()
    post = postprocess_cost(keep["job"], engine, images)
    total = wall + post["host_checks_and_phash_s"] + post["png_s"]
    named = {
        "text_encoder_s": parts.get("prompt_embeddings", parts["text_encoder"])["sum_s"],
        "text_encoder_calls": parts["text_encoder"]["calls"],
        "unet_loop_s": parts["unet"]["first_to_last_s"],
        "unet_calls": parts["unet"]["calls"],
        "unet_forward_sum_s": parts["unet"]["sum_s"],
        "vae_decode_s": parts["vae_decode"]["sum_s"],
        "engine_call_wall_s": wall,
        "host_checks_and_phash_s": post["host_checks_and_phash_s"],
        "png_s": post["png_s"],
    }
    named["between_unet_calls_s"] = named["unet_loop_s"] - named["unet_forward_sum_s"]  # scheduler, CFG, host waits
    named["rest_of_call_s"] = wall - named["text_encoder_s"] - named["unet_loop_s"] - named["vae_decode_s"]
    parts_of_total = ("text_encoder_s", "unet_forward_sum_s", "between_unet_calls_s", "vae_decode_s", "rest_of_call_s", "host_checks_and_phash_s", "png_s")
    return named | {
        "serial_batch_s": total,
        "share_of_serial_batch": {k: named[k] / total for k in parts_of_total},
        "steady_batch_s_without_profiling": batch_s,
        "note": "GPU spans by CUDA events around text_encoder.forward, unet.forward and vae.decode in one engine "
        "batch; host post-processing and PNG timed on the batch's images, serially as generate did before overlap",
    }


# --- the whole run -----------------------------------------------------------------------------------------


class Budget:
    """What is left of the call's time, and cost estimates that follow what was measured."""

    def __init__(self, seconds: float, batch_s: float, compile_s: float) -> None:
        self.end = time.perf_counter() + seconds
        self.batch_s, self.compile_s = batch_s, compile_s
        self.measured: set[str] = set()
        self.skipped: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def estimate(self, batches: int, compiles: float, load_s: float = 10.0) -> float:
        return load_s + batches * self.batch_s + compiles * self.compile_s

    def fits(self, name: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        self.skipped.append({"name": name, "estimate_s": round(estimate, 1), "left_s": round(self.left(), 1), "reason": "does not fit the budget"})
        return False

    def learn(self, record: dict[str, Any]) -> None:
        """The slowest batch and compile measured so far replace the starting guesses."""
        if "batch_s" in record:
            self.batch_s = record["batch_s"] if "batch" not in self.measured else max(self.batch_s, record["batch_s"])
            self.measured.add("batch")
        if record.get("compile_mode") and "first_batch_s" in record:
            spent = record["first_batch_s"] - record["batch_s"]
            self.compile_s = spent if "compile" not in self.measured else max(self.compile_s, spent)
            self.measured.add("compile")


def engine_options(pairs: list[str] | None) -> dict[str, bool | str]:
    """`--e2e-engine key=value` pairs as [engine] options of the end-to-end run's plan."""
    options: dict[str, bool | str] = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        options[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return options


def lever(name: str, base: dict[str, Any] | None, other: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """What one lever gave: images/s with it (`base`) and without it (`other`)."""
    if not base or not other or "images_per_s" not in base or "images_per_s" not in other:
        return {"lever": name, "what": what, "measured": False}
    return {"lever": name, "what": what, "measured": True, "with_images_per_s": base["images_per_s"],
            "without_images_per_s": other["images_per_s"], "gain": base["images_per_s"] / other["images_per_s"]}  # fmt: skip


def run(model: Path, lora: Path | None, args: argparse.Namespace, work: Path, e2e: Callable[[Path, str], dict[str, Any]],
        save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:  # fmt: skip
    """Every measurement, most important first, each only if its estimate fits what is left of the budget.
    `e2e(plan, name)` runs `dermkohya generate` on a plan and returns its record (the headline figure);
    `save` gets the results so far after every measurement, so a call cut short still leaves them."""
    gpu = cuda()
    budget = Budget(args.budget, args.batch_estimate, args.compile_estimate)
    timed = 1 + args.timed_batches
    plain: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"batch_size": args.batch, "timed_batches": args.timed_batches, "budget_s": args.budget}
    ro = "reduce-overhead"

    def assemble() -> dict[str, Any]:
        out["plain_batched"] = plain
        out["engine_variants"] = list(variants.values())
        out["levers"] = _levers(variants, out.get("breakdown"))
        _ratios(out, plain, variants)
        out["skipped"] = budget.skipped
        out["complete"] = False
        return out

    def measure(name: str, estimate: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if args.variants and name not in args.variants.split(","):
            budget.skipped.append({"name": name, "reason": "not in --variants"})
            return None
        if not budget.fits(name, estimate):
            print(f"skipped {name}: estimate {estimate:.0f} s, {budget.left():.0f} s left", flush=True)
            return None
        try:
            record = fn()
        except Exception as exc:  # a failed configuration is a result, not the end of the call
            record = {"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        finally:
            free()
        budget.learn(record)
        save(assemble())
        rate = record.get("images_per_s") or record.get("steady_images_per_s")
        print(f"{name}: {f'{rate:.3f} images/s' if rate else record.get('error', 'done')} ({budget.left():.0f} s left)", flush=True)
        return record

    def variant(name: str, compile_mode: str | None, compiles: float = 0.0, **levers: bool | str) -> None:
        if (compile_mode or levers) and not gpu:
            budget.skipped.append({"name": name, "reason": "the engine applies compile, fused QKV and channels-last on CUDA only"})
            return
        profiled = {"engine-eager": "breakdown", f"engine-{ro}": f"breakdown_{ro}"}
        keep: dict[str, Any] | None = {} if name in profiled else None
        record = measure(name, budget.estimate(timed, compiles), lambda: engine_variant(
            model, lora, args, work, name, compile_mode=compile_mode, keep=keep, **levers))  # fmt: skip
        if record is not None:
            variants[name] = record
        if keep:
            out[profiled[name]] = breakdown(keep, record["batch_s"] if record and "batch_s" in record else 0.0)
            keep.clear()
            free()

    def plain_run(mode: str | None, compiles: float = 0.0) -> None:
        key = mode or "eager"
        if mode and not gpu:
            budget.skipped.append({"name": f"plain-{key}", "reason": "torch.compile is used on CUDA only"})
            return
        record = measure(f"plain-{key}", budget.estimate(timed, compiles), lambda: plain_batched(model, lora, args, mode))
        if record is not None:
            plain[key] = record

    plain_run(None)
    variant("engine-eager", None)
    plain_run(ro, 1)
    variant(f"engine-{ro}", ro, 1)
    e2e_batches = -(-args.e2e_count // args.batch)
    e2e_mode = ro if gpu else None
    e2e_options = engine_options(args.e2e_engine) if gpu else {}
    record = measure("generate-e2e", budget.estimate(e2e_batches, 1 if gpu else 0), lambda: e2e(
        write_plan(work, "generate-e2e", model, lora, args, count=args.e2e_count, compile_mode=e2e_mode, **e2e_options), "generate-e2e"))  # fmt: skip
    if record is not None:
        out["engine"] = record | {"compile_mode": e2e_mode, "engine_options": e2e_options}
        save(assemble())  # the headline, on disk before the levers after it
    variant(f"engine-{ro}-conv1x1-mm", ro, 1, conv1x1_as_mm=True)
    variant("engine-eager-cudnn-attention", None, attention="cudnn")
    variant("engine-eager-no-fuse-qkv", None, fuse_qkv=False)
    variant("engine-eager-no-channels-last", None, channels_last=False)
    variant(f"engine-{ro}-cudnn-attention", ro, 1, attention="cudnn")
    variant("engine-default", "default", 1, compile_vae=False)  # the engine's compile before issue #18
    variant("engine-eager-neither", None, fuse_qkv=False, channels_last=False)
    variant(f"engine-{ro}-no-channels-last", ro, 1, channels_last=False)
    variant(f"engine-{ro}-no-fuse-qkv", ro, 1, fuse_qkv=False)
    variant(f"engine-{ro}-no-vae-compile", ro, 1, compile_vae=False)
    variant("engine-max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", 3)

    return assemble()


def _levers(v: dict[str, dict[str, Any]], parts: dict[str, Any] | None) -> list[dict[str, Any]]:
    ro = "engine-reduce-overhead"
    found = [
        lever("compile reduce-overhead vs eager", v.get(ro), v.get("engine-eager"), "torch.compile(mode='reduce-overhead') of the U-Net"),
        lever("compile default vs eager", v.get("engine-default"), v.get("engine-eager"), "torch.compile(fullgraph=True), default mode, U-Net only"),
        lever("compile reduce-overhead vs default", v.get(ro), v.get("engine-default"), "CUDA graphs (and the VAE decoder compiled) on top of the compiled U-Net"),
        lever("1×1 convolutions as matmuls (reduce-overhead)", v.get(f"{ro}-conv1x1-mm"), v.get(ro), "inductor's conv_1x1_as_mm ([engine] conv1x1_as_mm)"),
        lever("compile max-autotune-no-cudagraphs vs reduce-overhead", v.get("engine-max-autotune-no-cudagraphs"), v.get(ro), "autotuned kernels, no graphs"),
        lever("fused QKV (eager)", v.get("engine-eager"), v.get("engine-eager-no-fuse-qkv"), "fuse_qkv_projections on, channels-last on"),
        lever("channels-last (eager)", v.get("engine-eager"), v.get("engine-eager-no-channels-last"), "U-Net and VAE channels-last, fused QKV on"),
        lever("fused QKV + channels-last (eager)", v.get("engine-eager"), v.get("engine-eager-neither"), "both levers vs neither"),
        lever("channels-last (reduce-overhead)", v.get(ro), v.get(f"{ro}-no-channels-last"), "under compile"),
        lever("fused QKV (reduce-overhead)", v.get(ro), v.get(f"{ro}-no-fuse-qkv"), "under compile"),
        lever("cuDNN attention first (eager)", v.get("engine-eager-cudnn-attention"), v.get("engine-eager"), "SDPA: cuDNN's kernel before flash"),
        lever("cuDNN attention first (reduce-overhead)", v.get(f"{ro}-cudnn-attention"), v.get(ro), "SDPA: cuDNN's kernel before flash"),
        lever("VAE decoder compiled (reduce-overhead)", v.get(ro), v.get(f"{ro}-no-vae-compile"), "torch.compile of vae.decoder, default mode"),
    ]
    if parts:
        post = parts["host_checks_and_phash_s"] + parts["png_s"]
        found.append({"lever": "host post-processing (checks, phash, PNG) off the batch loop", "measured": True,
                      "what": "seconds per batch the serial loop spent on the host after each engine call",
                      "host_s_per_batch": post, "gain_if_overlapped": (parts["engine_call_wall_s"] + post) / parts["engine_call_wall_s"]})  # fmt: skip
    return found


def _ratios(out: dict[str, Any], plain: dict[str, Any], v: dict[str, dict[str, Any]]) -> None:
    """Engine over plain pipeline, same batch and compile: the whole `generate` (headline) and the call alone."""
    engine = out.get("engine") or {}
    mode = engine.get("compile_mode") or "eager"
    if engine.get("steady_images_per_s") and mode in plain:
        out["engine_vs_plain_batched"] = engine["steady_images_per_s"] / plain[mode]["images_per_s"]
        out["engine_vs_plain_batched_compile"] = mode
    out["engine_call_vs_plain_batched"] = {
        key: v[name]["images_per_s"] / plain[key]["images_per_s"]
        for key, name in (("eager", "engine-eager"), ("reduce-overhead", "engine-reduce-overhead"))
        if key in plain and "images_per_s" in v.get(name, {})
    }


# --- the README's block ------------------------------------------------------------------------------------

README_BEGIN = "<!-- generate-levers:begin (generated by bench/generate_throughput.py --table JSON --readme README.md) -->"
README_END = "<!-- generate-levers:end -->"


def _rate(value: float | None) -> str:
    return f"{value:.2f}" if value else "–"


def readme_block(results: dict[str, Any], source: str) -> str:
    """The README's generation-speed tables, from one call's JSON: reference vs engine, each lever, and
    where one batch's time goes."""
    plain = results.get("plain_batched", {})
    variants = {v["name"]: v for v in results.get("engine_variants", []) if "images_per_s" in v}
    engine = results.get("engine", {})
    lines = [
        f"From `{source}` ({results.get('device', '?')}; {results.get('size')} px, {results.get('steps')} {results.get('scheduler', '').upper()} "
        f"steps, CFG {results.get('guidance')}, batch {results.get('batch_size')}, random SD 1.5 + a random rank-16 LoRA fused; "
        "steady-state images/s, one call):",
        "",
        "| what | eager | compiled (reduce-overhead) |",
        "|---|---:|---:|",
        f"| plain batched `StableDiffusionPipeline` | {_rate(plain.get('eager', {}).get('images_per_s'))} | "
        f"{_rate(plain.get('reduce-overhead', {}).get('images_per_s'))} |",
        f"| the engine's batch call alone | {_rate(variants.get('engine-eager', {}).get('images_per_s'))} | "
        f"{_rate(variants.get('engine-reduce-overhead', {}).get('images_per_s'))} |",
    ]
    mode = engine.get("compile_mode") or "eager"
    e2e = _rate(engine.get("steady_images_per_s"))
    lines.append(f"| **`dermkohya generate`** (filter, hash, PNGs written) | {e2e if mode == 'eager' else '–'} | {e2e if mode != 'eager' else '–'} |")
    ratio = results.get("engine_vs_plain_batched")
    lines += ["", f"`engine_vs_plain_batched` ({mode}): **{ratio:.2f}×**." if ratio else "`engine_vs_plain_batched`: not measured.", ""]
    lines += ["| lever | with | without | gain |", "|---|---:|---:|---:|"]
    for lever in results.get("levers", []):
        if lever.get("measured") and "gain" in lever:
            lines.append(f"| {lever['lever']} | {_rate(lever['with_images_per_s'])} | {_rate(lever['without_images_per_s'])} | {lever['gain']:.2f}× |")
        elif lever.get("measured"):
            lines.append(f"| {lever['lever']} | {lever['host_s_per_batch']:.2f} s of host work per batch | – | "
                         f"{lever['gain_if_overlapped']:.2f}× if hidden |")  # fmt: skip
        else:
            lines.append(f"| {lever['lever']} | not measured | | |")
    for key, label in (("breakdown", "eager"), ("breakdown_reduce-overhead", "compiled (reduce-overhead)")):
        if parts := results.get(key):
            shares = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {share:.0%}" for k, share in parts["share_of_serial_batch"].items())
            lines += ["", f"One {label} batch, its parts one after another ({parts['serial_batch_s']:.2f} s): {shares}."]
    if results.get("skipped"):
        lines += ["", "Not measured in that call: " + ", ".join(f"{s['name']} ({s['reason']})" for s in results["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the generate-levers markers (which must be there)."""
    text = readme.read_text(encoding="utf-8")
    opening = README_BEGIN.split(" (")[0]  # the marker, whatever its comment says
    if opening not in text or README_END not in text:
        raise SystemExit(f"{readme}: no generate-levers markers; put {README_BEGIN} and {README_END} where the tables go")
    head, rest = text.split(opening, 1)
    rest = rest.split("\n", 1)[1]
    readme.write_text(f"{head}{README_BEGIN}\n{block}{README_END}{rest.split(README_END, 1)[1]}", encoding="utf-8")
