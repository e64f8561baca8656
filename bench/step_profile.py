"""Where kohya's training step spends its time: a pure-Python sampling profiler inside kohya's own process.

Bench only. `bench/profile_site/sitecustomize.py` (on PYTHONPATH for a bench launch) calls `install()` in
every Python process that starts; it does something only when `DERMKOHYA_STEP_PROFILE` names an output
file and the process is kohya's training script (`train_network.py`, `sdxl_train_network.py`). Then:

- a daemon thread samples the main thread's Python stack every `DERMKOHYA_STEP_PROFILE_MS` (default 5) ms
  through `sys._current_frames()` (no ptrace, no extra package); the GIL switch interval drops to a tenth of
  that, so pure-Python stretches are sampled as fairly as waits that release the GIL;
- kohya's step bar (`tqdm(desc="steps")`) is wrapped: each `update()` is one finished optimizer step. With
  `DERMKOHYA_STEP_PROFILE_SYNC=1` (default) the wrapper first calls `torch.cuda.synchronize()` and times it:
  how long the GPU was still busy when the host reached the step's end (near 0: the host is the bottleneck);
- samples before step 1 are the start-up phase; samples in steps `first < k <= last`
  (`DERMKOHYA_STEP_PROFILE_STEPS`, default 20:60) are the steady phase; garbage-collector pauses are timed;
- sampling stops at step `last`; at exit (or once the main thread has ended, should a stop leave the
  interpreter waiting on other threads) it writes the JSON, `complete` false if the window was not reached
  (phases: samples, top functions inclusive and self with their source line, categories; per-step times and
  sync waits), and beside it `<name>.collapsed.txt`: one `frame;frame;… count` line per stack
  (flamegraph.pl / speedscope input). Nothing is written while kohya trains.

With `DERMKOHYA_STEP_PROFILE_KERNELS=1` it samples nothing: torch's profiler records the GPU's kernels and
copies (those inside CUDA graphs included) over the window's steps, synchronised only at its two ends, and the
JSON gets `kernels`: the window's wall time against the time the GPU was busy, the idle gaps, the kernels by
category (GEMM, convolution, attention, layout transforms, normalisation, elementwise…) and the top kernels,
per step. Stopping the profiler costs the step after the window a few seconds (its records are processed).

`summarise()` reads the JSON back for bench/train_throughput.py's report.
"""

from __future__ import annotations

import atexit
import gc
import json
import linecache
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ENV_OUT = "DERMKOHYA_STEP_PROFILE"
ENV_STEPS = "DERMKOHYA_STEP_PROFILE_STEPS"
ENV_MS = "DERMKOHYA_STEP_PROFILE_MS"
ENV_SYNC = "DERMKOHYA_STEP_PROFILE_SYNC"
ENV_KERNELS = "DERMKOHYA_STEP_PROFILE_KERNELS"
SCRIPTS = ("train_network.py", "sdxl_train_network.py")
KOHYA_FILES = ("train_network.py", "train_util.py", "lora_fast")  # their lines, inclusive: where the loop spends
STEP_BAR = "steps"
TOP = 30
MAX_STACKS = 4000  # distinct stacks per phase in the collapsed file (the rarest left out: start-up has many)
_FILES: dict[str, str] = {}  # shortened path → the file, for the source text of the top lines
# (category, a substring of any frame label in the stack): the first that matches names the sample.
# Ordered from the most specific; a sample matching none is "other".
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("model loading", ("load_target_model", "from_pretrained", "load_state_dict", "load_model_dict")),
    ("latent caching", ("cache_latents",)),
    ("CUDA graph capture", ("_capture", "capture_begin", "capture_end")),
    ("imports", ("_find_and_load",)),
    ("saving (model/state)", ("save_model", "save_state", "save_and_remove_state", "safetensors")),
    ("logging (tensorboard/trackers)", ("generate_step_logs", "accelerator.py:log", "tensorboard", "trackers")),
    ("progress bar (tqdm)", ("tqdm",)),
    ("grad clipping", ("clip_grad_norm",)),
    ("grad scaler unscale", ("unscale_",)),
    ("optimizer step", ("optim/", "optimizer.py:step", "scheduler.py")),
    ("zero_grad", ("zero_grad",)),
    ("backward", ("backward",)),
    ("CUDA graph replay", ("replay",)),
    ("U-Net (forward)", ("call_unet", "unet", "UNet")),
    ("text encoder (forward)", ("get_hidden_states", "encode_tokens", "text_encod", "CLIP")),
    ("noise, timesteps, loss", ("get_noise_noisy_latents_and_timesteps", "get_timesteps", "loss", "noise")),
    ("data loading", ("dataloader", "data_loader", "__getitem__", "collate")),
    ("batch processing (other)", ("process_batch",)),
]


def _label(frame: Any) -> tuple[str, str]:
    """(`folder/file.py:qualname`, the same with `:line`) for one frame."""
    code = frame.f_code
    path = code.co_filename.replace("\\", "/")
    for marker in ("site-packages/", "sd-scripts/", "dermkohya/", "lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(path.rsplit("/", 2)[-2:])
    _FILES.setdefault(path, code.co_filename)
    func = f"{path}:{getattr(code, 'co_qualname', code.co_name)}"
    return func, f"{func}:{frame.f_lineno}"


def _stack(frame: Any) -> tuple[tuple[str, str], ...]:
    out = []
    while frame is not None:
        out.append(_label(frame))
        frame = frame.f_back
    return tuple(reversed(out))  # outermost first


class StepProfiler:
    """Samples the main thread; counts each stack per phase; times steps and the GPU wait at each step's end."""

    def __init__(self, out: Path, first: int, last: int, interval_s: float, sync: bool, kernels: bool = False) -> None:
        self.out, self.first, self.last, self.interval_s, self.sync = out, first, last, interval_s, sync
        self.kernels = kernels  # torch's profiler over the window instead of sampling
        self.kernel_profiler: Any = None
        self.kernel_window_start = 0.0
        self.kernel_report: dict[str, Any] | None = None
        self.t0 = time.perf_counter()
        self.main = threading.main_thread().ident
        self.step = 0
        self.stacks: dict[str, Counter[tuple[tuple[str, str], ...]]] = {"startup": Counter(), "steady": Counter()}
        self.steps: list[dict[str, float]] = []
        self.gc_s = {"startup": 0.0, "steady": 0.0, "other": 0.0}
        self.sampler_s = 0.0
        self.samples = 0
        self.errors: dict[str, int] = {}
        self.written = False
        self.stopped = False
        self.closing = False  # set at exit: the sampler thread ends before the interpreter finalizes
        self.thread: threading.Thread | None = None
        self.switch_interval = sys.getswitchinterval()  # restored when the window ends
        self._gc_started: float | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()

    # -- phases and steps ------------------------------------------------------------------------------

    def phase(self) -> str:
        if self.step == 0:
            return "startup"
        return "steady" if self.first <= self.step < self.last else "other"

    def on_step(self) -> None:
        """One finished optimizer step (kohya's step bar advanced)."""
        wait = None
        if self.sync:
            wait = _cuda_sync_seconds()
        now = time.perf_counter() - self.t0
        with self._lock:
            self.step += 1
            self.steps.append({"step": self.step, "t_s": round(now, 5),
                               "gpu_wait_ms": None if wait is None else round(wait * 1e3, 3)})
        if self.kernels and self.step in (self.first, self.last):
            self._kernel_window()
        if self.step == self.last:  # the window is over: sampling stops, the file is written at exit
            self.stopped = True
            sys.setswitchinterval(self.switch_interval)

    def _kernel_window(self) -> None:
        """At step `first`: start torch's profiler (CUDA activity only); at step `last`: stop it and summarise."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            self.kernel_report = {"error": "no CUDA device"}
            return
        try:
            torch.cuda.synchronize()
            if self.step == self.first:
                self.kernel_profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.kernel_profiler.start()
                self.kernel_window_start = time.perf_counter()
            elif self.kernel_profiler is not None:
                wall = time.perf_counter() - self.kernel_window_start
                self.kernel_profiler.stop()
                self.kernel_report = kernel_summary(_kernel_records(self.kernel_profiler), wall, self.last - self.first)
                self.kernel_profiler = None
        except Exception as exc:  # never break kohya's run
            self.kernel_report = {"error": f"{type(exc).__name__}: {exc}"}

    def on_gc(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_s[self.phase()] += time.perf_counter() - self._gc_started
            self._gc_started = None

    # -- sampling --------------------------------------------------------------------------------------

    def run(self) -> None:
        main = threading.main_thread()
        while not self.written and not self.closing:
            time.sleep(self.interval_s)
            if self.closing:
                return
            if not main.is_alive():  # kohya's main thread ended (a stop may leave shutdown waiting on other threads)
                self.write()
                return
            if self.stopped:
                continue
            started = time.perf_counter()
            try:
                self.sample()
            except Exception as exc:  # one bad sample is skipped; the sampler goes on
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            self.sampler_s += time.perf_counter() - started

    def sample(self) -> None:
        _patch_tqdm(self)
        frame = sys._current_frames().get(self.main)
        phase = self.phase()
        if frame is not None and phase in self.stacks:
            stack = _stack(frame)
            with self._lock:  # none counted once write() has begun
                if not self.written:
                    self.stacks[phase][stack] += 1
                    self.samples += 1

    # -- output ----------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        complete = self.stopped
        with self._lock:
            steps = list(self.steps)
        return {
            "complete": complete,
            "script": Path(sys.argv[0]).name if sys.argv else None,
            "window": {"first_step": self.first, "last_step": self.last,
                       "what": "samples while steps first+1 … last run (between the bar's update first and update last)"},
            "interval_ms": round(self.interval_s * 1e3, 2),
            "sync_each_step": self.sync,
            "sampler_cpu_s": round(self.sampler_s, 3),
            "switch_interval_ms": round(min(sys.getswitchinterval(), self.interval_s / 10) * 1e3, 3),
            "samples": self.samples,
            "sampler_errors": self.errors,
            "phases": {name: phase_summary(counter, self.gc_s[name]) for name, counter in self.stacks.items()},
            "step_timing": step_timing(steps, self.first, self.last),
            "steps": steps,
            **({"kernels": self.kernel_report} if self.kernels else {}),
        }

    def close(self) -> None:
        """At exit: stop the sampler thread first (a daemon thread still reading frames while the interpreter
        finalizes can crash the process: seen as SIGSEGV), then write."""
        self.closing = True
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=60)  # it wakes within one interval, or finishes the write it began
        self.write()

    def write(self) -> None:
        """At exit (or when the main thread is gone): writing during the run would cost the steps it times."""
        with self._write_lock:  # held throughout: atexit waits for the sampler thread's write, never cuts it off
            if not self.written:
                with self._lock:
                    self.written = True
                self._write_files()

    def _write_files(self) -> None:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            lines = [f"{phase};" + ";".join(label for _, label in stack) + f" {count}"
                     for phase, counter in self.stacks.items() for stack, count in counter.most_common(MAX_STACKS)]
            _write_atomic(self.out.with_suffix(".collapsed.txt"), "\n".join(lines) + "\n")
            _write_atomic(self.out, json.dumps(self.report(), indent=1) + "\n")  # last: its presence means both
        except Exception as exc:  # never break kohya's run
            print(f"dermkohya step_profile: could not write {self.out}: {exc}", file=sys.stderr)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _source(label: str) -> str:
    """The source text behind `file:func:line` (the file found through the full path `_label` saw)."""
    path, _, line = label.rpartition(":")
    full = _FILES.get(path.rsplit(":", 1)[0])
    return linecache.getline(full, int(line)).strip() if full and line.isdigit() else ""


def phase_summary(counter: Counter[tuple[tuple[str, str], ...]], gc_s: float) -> dict[str, Any]:
    """Top functions (inclusive: anywhere in the stack, once per sample; self: the innermost frame with its
    line), the categories, and the GC time, as fractions of the phase's samples."""
    total = sum(counter.values())
    inclusive: Counter[str] = Counter()
    inclusive_lines: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    for stack, count in counter.items():
        for func in {f for f, _ in stack}:
            inclusive[func] += count
        for line in {ln for _, ln in stack}:
            inclusive_lines[line] += count
        if stack:
            leaf[stack[-1][1]] += count
        categories[categorise(stack)] += count

    def top(counts: Counter[str]) -> list[list[Any]]:
        return [[name, n, round(n / total, 4)] for name, n in counts.most_common(TOP)] if total else []

    lines = top(Counter({k: v for k, v in inclusive_lines.items() if any(f in k for f in KOHYA_FILES)}))
    return {"samples": total, "gc_s": round(gc_s, 3), "categories": top(categories),
            "top_inclusive": top(inclusive), "top_self": [row + [_source(row[0])] for row in top(leaf)],
            "top_lines_inclusive": [row + [_source(row[0])] for row in lines]}


def categorise(stack: tuple[tuple[str, str], ...]) -> str:
    labels = [func for func, _ in stack]
    for name, needles in CATEGORIES:
        if any(needle in label for label in labels for needle in needles):
            return name
    return "other"


def step_timing(steps: list[dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    """Median and mean step time and GPU wait over the window's steps (first+1 … last)."""
    ends = {s["step"]: s for s in steps}
    times = [(ends[k]["t_s"] - ends[k - 1]["t_s"]) * 1e3 for k in range(first + 1, last + 1) if k in ends and k - 1 in ends]
    waits = [ends[k]["gpu_wait_ms"] for k in range(first + 1, last + 1) if k in ends and ends[k]["gpu_wait_ms"] is not None]
    out: dict[str, Any] = {"steps_timed": len(times)}
    if times:
        out |= {"step_ms_median": round(statistics.median(times), 2), "step_ms_mean": round(statistics.fmean(times), 2),
                "step_ms_max": round(max(times), 2)}
    if waits:
        out |= {"gpu_wait_ms_median": round(statistics.median(waits), 3), "gpu_wait_ms_mean": round(statistics.fmean(waits), 3)}
        if times:
            out["gpu_wait_fraction_of_step"] = round(statistics.fmean(waits) / statistics.fmean(times), 4)
    if steps:
        out["first_step_end_s"] = steps[0]["t_s"]
    return out


def _cuda_sync_seconds() -> float | None:
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        started = time.perf_counter()
        torch.cuda.synchronize()
        return time.perf_counter() - started
    except Exception:
        return None


def _patch_tqdm(profiler: StepProfiler) -> None:
    """Wrap tqdm's update once tqdm is imported: the `steps` bar's updates are kohya's finished steps."""
    bar = getattr(sys.modules.get("tqdm.std"), "tqdm", None)  # None while tqdm.std is still importing
    if bar is None or getattr(bar.update, "_dermkohya_profiled", False):
        return
    original = bar.update

    def update(self: Any, n: float | None = 1) -> Any:
        result = original(self, n)
        try:
            if getattr(self, "desc", None) == STEP_BAR:
                profiler.on_step()
        except Exception:
            pass
        return result

    update._dermkohya_profiled = True  # type: ignore[attr-defined]
    bar.update = update


def _patch_tqdm_when_imported(profiler: StepProfiler, poll_s: float = 0.05) -> None:
    """Without the sampler thread (kernels mode): wrap tqdm's update as soon as kohya has imported it."""

    def poll() -> None:
        while not getattr(getattr(getattr(sys.modules.get("tqdm.std"), "tqdm", None), "update", None),
                          "_dermkohya_profiled", False):
            _patch_tqdm(profiler)
            time.sleep(poll_s)

    threading.Thread(target=poll, name="dermkohya-step-profile-tqdm", daemon=True).start()


def _kernel_records(profiler: Any) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU activity (kernels, copies, sets) torch's profiler recorded."""
    from torch.autograd import DeviceType

    return [(e.name, e.time_range.start, e.time_range.end) for e in profiler.events()
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]


# (category, lower-case substrings of a kernel's name): the first that matches names it; ordered from the most specific
KERNEL_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("copies and sets", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit", "winograd", "precomputed")),
    ("GEMM", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "sm90_", "sm80_", "ampere_", "hopper")),
    ("layout transforms", ("nchwtonhwc", "nhwctonchw", "transpose", "permute", "copy_kernel", "contiguous")),
    ("normalisation", ("norm",)),
    ("optimizer (multi-tensor)", ("multi_tensor", "adam", "foreach")),
    ("reductions", ("reduce",)),
]


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "elementwise and other"


def kernel_summary(records: list[tuple[str, float, float]], wall_s: float, steps: int, top: int = 25) -> dict[str, Any]:
    """The window's GPU time: busy (the union of all activity) against wall, idle gaps, categories, top kernels;
    times per step in ms."""
    per_step = 1e3 / max(steps, 1)
    spans = sorted((start, end) for _, start, end in records)
    busy_us, gaps = 0.0, []
    cur_start = cur_end = None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy_us += cur_end - cur_start
                gaps.append(start - cur_end)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        busy_us += cur_end - cur_start
    by_name: dict[str, list[float]] = {}
    by_category: Counter[str] = Counter()
    for name, start, end in records:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
        by_category[kernel_category(name)] += end - start
    kernel_us = sum(by_category.values())
    big_gaps = sorted(gaps, reverse=True)
    return {
        "steps": steps, "activities": len(records),
        "wall_ms_per_step": round(wall_s * per_step, 3),
        "gpu_busy_ms_per_step": round(busy_us * per_step / 1e6, 3),
        "gpu_busy_fraction_of_wall": round(busy_us / 1e6 / wall_s, 4) if wall_s > 0 else None,
        "kernel_ms_per_step": round(kernel_us * per_step / 1e6, 3),
        "idle_gaps_over_50us_per_step": round(sum(1 for g in gaps if g > 50) / max(steps, 1), 2),
        "idle_ms_in_gaps_over_50us_per_step": round(sum(g for g in gaps if g > 50) * per_step / 1e6, 3),
        "largest_gaps_ms": [round(g / 1e3, 3) for g in big_gaps[:10]],
        "categories_ms_per_step": [[c, round(us * per_step / 1e6, 3), round(us / kernel_us, 4) if kernel_us else None]
                                   for c, us in by_category.most_common()],
        "top_kernels": [[name[:160], kernel_category(name), round(us * per_step / 1e6, 3), round(n / max(steps, 1), 2)]
                        for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        "what": "per step, ms: wall between the window's step ends; GPU busy = the union of all recorded kernels, "
                "copies and sets; kernel = their sum (overlaps counted twice); top_kernels: name, category, ms per "
                "step, launches per step",
    }


def parse_window(text: str) -> tuple[int, int]:
    first, _, last = text.partition(":")
    a, b = int(first), int(last)
    if not 0 <= a < b:
        raise ValueError(f"{ENV_STEPS}={text!r}: give first:last with 0 <= first < last, e.g. 20:60")
    return a, b


def install() -> StepProfiler | None:
    """Start the profiler in this process if the bench asked for it and this is kohya's training script."""
    out = os.environ.get(ENV_OUT)
    if not out or not sys.argv or Path(sys.argv[0]).name not in SCRIPTS:
        return None
    try:
        first, last = parse_window(os.environ.get(ENV_STEPS, "20:60"))
        interval = float(os.environ.get(ENV_MS, "5")) / 1e3
    except ValueError as exc:
        print(f"dermkohya step_profile: {exc}; profiling off", file=sys.stderr)
        return None
    if os.environ.get(ENV_KERNELS) == "1":  # torch's profiler over the window; no sampler, no per-step sync
        profiler = StepProfiler(Path(out), first, last, interval, sync=False, kernels=True)
        profiler.stopped = False
        atexit.register(profiler.close)
        _patch_tqdm_when_imported(profiler)
        return profiler
    profiler = StepProfiler(Path(out), first, last, interval, os.environ.get(ENV_SYNC, "1") == "1")
    # the sampler needs the GIL: with the default 5 ms switch interval, pure-Python work shorter than that is
    # never sampled while GIL-releasing waits always are; a short interval makes the main thread yield in time
    # (until the window's last step)
    sys.setswitchinterval(min(sys.getswitchinterval(), interval / 10))
    gc.callbacks.append(profiler.on_gc)
    atexit.register(profiler.close)
    profiler.thread = threading.Thread(target=profiler.run, name="dermkohya-step-profile", daemon=True)
    profiler.thread.start()
    return profiler


def summarise(path: Path, top: int = 12) -> dict[str, Any] | None:
    """The bench report's view of one profile: step timing and each phase's categories and top entries."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    phases = {name: {"samples": p["samples"], "gc_s": p["gc_s"], "categories": p["categories"],
                     "top_inclusive": p["top_inclusive"][:top], "top_self": p["top_self"][:top]}
              for name, p in data["phases"].items()}
    out = {"complete": data["complete"], "window": data["window"], "interval_ms": data["interval_ms"],
           "sampler_cpu_s": data["sampler_cpu_s"], "step_timing": data["step_timing"], "phases": phases}
    if "kernels" in data:
        out["kernels"] = data["kernels"]
    return out


def describe(name: str, profile: dict[str, Any], top: int = 15) -> str:
    """A reader's summary of one variant's profile: step timing, then each phase's categories and top lines."""
    timing = profile["step_timing"]
    out = [f"== {name} (complete: {profile['complete']}, {profile['samples']} samples every {profile['interval_ms']} ms)",
           "   steps " + ", ".join(f"{k} {v}" for k, v in timing.items())]
    kernels = profile.get("kernels") or {}
    if "categories_ms_per_step" in kernels:
        out.append("-- GPU, per step: " + ", ".join(f"{k} {kernels[k]}" for k in (
            "wall_ms_per_step", "gpu_busy_ms_per_step", "gpu_busy_fraction_of_wall", "idle_ms_in_gaps_over_50us_per_step")))
        out += [f"   {ms:8.3f} ms  {share * 100:5.1f} %  {category}" for category, ms, share in kernels["categories_ms_per_step"]]
        out += [f"   {ms:8.3f} ms  {n:6.1f}x  [{category}] {kname}" for kname, category, ms, n in kernels["top_kernels"][:top]]
    elif kernels:
        out.append(f"-- GPU: {kernels}")
    for phase, data in profile["phases"].items():
        out.append(f"-- {phase}: {data['samples']} samples, GC {data['gc_s']} s")
        out += [f"   {share * 100:5.1f} %  {category}" for category, _, share in data["categories"]]
        out.append("   lines of train_network.py / train_util.py / lora_fast, inclusive:")
        out += [f"   {row[2] * 100:5.1f} %  {row[0]}  {row[3]}" for row in data["top_lines_inclusive"][:top]]
        out.append("   innermost Python frame (self):")
        out += [f"   {row[2] * 100:5.1f} %  {row[0]}  {row[3]}" for row in data["top_self"][:top]]
    return "\n".join(out)


if __name__ == "__main__":  # python bench/step_profile.py <…-profile.json> [variant …]: print the summaries
    bundle = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    if "phases" in bundle:  # one profile, not a bundle
        bundle = {Path(sys.argv[1]).stem: bundle}
    for variant, profile in bundle.items():
        if len(sys.argv) < 3 or variant in sys.argv[2:]:
            print(describe(variant, profile))
