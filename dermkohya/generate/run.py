"""Running a job: one process or N (one per GPU, gloo barriers), each making candidates for the whole
batches it owns; between rounds process 0 settles them (filter.settle) until every image is finished or
the limit is reached; a progress bar over all processes; the summary.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermkohya import locks, metrics
from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic
from dermkohya.generate.engine import Engine, device_for
from dermkohya.generate.filter import image_reasons, settle, too_many
from dermkohya.generate.job import REJECTED, Job, prepare_job
from dermkohya.generate.output import Writers, image_record, png_bytes, read_json, read_record, write_candidate, write_rejection
from dermkohya.generate.plan import Item, image_seed, load_plan, quotas


@dataclasses.dataclass
class Result:
    """What a run did, for the CLI and the benchmark."""

    out: Path
    planned: int
    finished: int
    made: int
    rejected: dict[str, int]
    rejected_by_cell: dict[str, int]
    processes: int
    device: str
    wall_s: float
    load_s: float
    images_per_s: float | None
    steady_images_per_s: float | None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.finished == self.planned


def _owner(n: int, batch_size: int, world: int) -> int:
    """Which process makes image n: whole batches of the index order, dealt round-robin."""
    return (n // batch_size) % world


@dataclasses.dataclass
class _Progress:
    """What one process reports: images accepted by the per-image checks this run, and timings."""

    made: int = 0
    rejected: int = 0
    batches: int = 0
    first_batch_end: float | None = None
    made_at_first_batch: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    load_s: float = 0.0


def _produce(
    job: Job, engine: Engine, rank: int, world: int, progress: _Progress, limit: int | None, report: Callable[[], None]
) -> bool:
    """Make a candidate that passes the per-image checks for every image this process owns that has
    none yet. Returns False when `limit` stopped it early."""
    plan = job.plan
    staging = job.staging
    precision = str(engine.dtype).removeprefix("torch.")
    size = plan.engine.batch_size
    slots: list[deque[tuple[Item, int]]] = [deque() for _ in range(size)]
    sides: dict[int, dict[str, Any]] = {}
    for item in job.items:
        if _owner(item.n, size, world) != rank or (job.out / item.path).exists():
            continue
        side = read_json(staging / f"{item.n}.json") or {"rejected": [], "candidate": None}
        cand = side.get("candidate")
        if cand and (staging / f"{item.n}-{cand['attempt']}.png").is_file():
            continue
        side["candidate"] = None
        sides[item.n] = side
        slots[item.n % size].append((item, len(side["rejected"])))
    writers = Writers(min(4, max(1, (os.cpu_count() or 1) // world)), max_pending=2 * size)
    try:
        while any(slots):
            if limit is not None and progress.made >= limit:
                return False
            batch = [queue.popleft() if queue else None for queue in slots]
            seeds = [image_seed(plan.sampler.seed, entry[0].n, entry[1]) if entry else 0 for entry in batch]
            images, nans = engine([(entry[0].prompt, seed) if entry else None for entry, seed in zip(batch, seeds)])
            for entry, seed, image, nan in zip(batch, seeds, images, nans):
                if entry is None:
                    continue
                item, attempt = entry
                side = sides[item.n]
                reasons = image_reasons(plan, engine.classifier, image, item.diagnosis, bool(nan))
                phash = metrics.phash(image)
                record = image_record(job, item, attempt, seed, phash, list(side["rejected"]), precision)
                if reasons:
                    side["rejected"].append({"attempt": attempt, "seed": seed, "reasons": reasons})
                    record["rejected_for"] = reasons
                    writers.submit(item.n, write_rejection, job.out, item.n, attempt, png_bytes(image, record), json.loads(json.dumps(side)))
                    progress.rejected += 1
                    if attempt + 1 >= plan.filter.max_attempts:
                        raise too_many(job, item, side["rejected"])
                    slots[item.n % size].append((item, attempt + 1))
                else:
                    side["candidate"] = {"attempt": attempt, "seed": seed, "phash": f"{phash:016x}"}
                    writers.submit(item.n, write_candidate, staging, item.n, attempt, png_bytes(image, record), json.loads(json.dumps(side)))
                    progress.made += 1
            progress.batches += 1
            if progress.first_batch_end is None:
                progress.first_batch_end = time.perf_counter()
                progress.made_at_first_batch = progress.made
            report()
    finally:
        writers.close()
    return True


class _Dist:
    """Barriers and a shared stop flag over torch.distributed (gloo); no-ops for one process."""

    def __init__(self, rank: int, world: int, init_file: Path | None) -> None:
        self.rank, self.world = rank, world
        if world > 1:
            import datetime

            import torch.distributed as dist

            dist.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(hours=24)
            )

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_rank(job: Job, rank: int, world: int, init_file: Path | None, limit: int | None, show_progress: bool) -> None:
    """One process: load the engine, then rounds of (make candidates → rank 0 settles duplicates) until
    every image is finished or `limit` images were made. Writes its timings for the parent. (On a CPU
    every process keeps torch's full thread count: fewer threads would change the pixels' rounding.)"""
    dist = _Dist(rank, world, init_file)
    try:
        progress = _Progress()
        engine = Engine(job, device_for(rank))
        progress.load_s = time.perf_counter() - progress.start
        cache: dict[int, dict[str, Any]] = {}
        with _ProgressBar(job, rank, world, progress, show_progress and rank == 0) as bar:
            while True:
                per_rank = None if limit is None else -(-limit // world)
                finished_early = not _produce(job, engine, rank, world, progress, per_rank, bar.update)
                stop = dist.any(finished_early)
                dist.barrier()
                if rank == 0:
                    done = settle(job, cache)
                    bar.update()
                    write_atomic(job.staging / "round.json", json.dumps({"finished": done}))
                dist.barrier()
                done = (read_json(job.staging / "round.json") or {}).get("finished", 0)
                if stop or done == len(job.items):
                    break
        end = time.perf_counter()
        timing = dataclasses.asdict(progress) | {"end": end, "device": engine.device}
        write_atomic(job.staging / f"timing-{rank}.json", json.dumps(timing))
    finally:
        dist.close()


class _ProgressBar:
    """One rich progress bar over all processes (shown by rank 0): finished + staged images, images/s,
    rejections, ETA. The other ranks publish their counts in tiny files that rank 0 adds up."""

    def __init__(self, job: Job, rank: int, world: int, progress: _Progress, enabled: bool) -> None:
        self.job, self.rank, self.world, self.progress, self.enabled = job, rank, world, progress, enabled
        self.bar: Any = None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"), TextColumn("rejected {task.fields[rejected]}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self.bar.start()
            staged = sum(1 for _ in self.job.staging.glob("*-*.png"))
            self.base = staged + sum(1 for item in self.job.items if (self.job.out / item.path).exists())
            self.task = self.bar.add_task(f"generating {self.job.name}", total=len(self.job.items), completed=self.base, rate="–", rejected=0)
        return self

    def update(self) -> None:
        p = self.progress
        if self.rank > 0:
            write_atomic(self.job.staging / f"progress-{self.rank}.json", json.dumps({"made": p.made, "rejected": p.rejected}))
        if self.bar is None:
            return
        made, rejected = p.made, p.rejected
        for other in range(1, self.world):
            info = read_json(self.job.staging / f"progress-{other}.json") or {}
            made, rejected = made + info.get("made", 0), rejected + info.get("rejected", 0)
        elapsed = time.perf_counter() - p.start - p.load_s
        rate = f"{made / elapsed:.2f}" if made and elapsed > 0 else "–"
        self.bar.update(self.task, completed=min(len(self.job.items), self.base + made), rate=rate, rejected=rejected)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _disk_full(out: Path, exc: OSError) -> DermkohyaError:
    """A full disk while generate writes: one line, and the reassurance that a rerun continues."""
    return DermkohyaError(f"{out}: {exc.strerror} while generate wrote there; the finished images are kept: free space "
                          "on that disk and run generate again to continue")


def _worker(rank: int, job: Job, world: int, init_file: Path, limit: int | None, show_progress: bool) -> None:
    try:
        try:
            _run_rank(job, rank, world, init_file, limit, show_progress)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise _disk_full(job.out, exc) from None
    except DermkohyaError as exc:
        write_atomic(job.staging / f"error-{rank}.txt", str(exc))
        raise SystemExit(1) from None


def generate(
    plan_path: Path,
    *,
    out: Path | None = None,
    processes: int = 1,
    limit: int | None = None,
    show_progress: bool = True,
) -> Result:
    """Make (or finish) the plan's images. `processes` > 1 shards them over that many GPUs (or CPU
    processes), with the same files as one process. `limit` stops after about that many new images.
    A second generate into the same output folder meanwhile is refused at once (locks.py)."""
    folder = Path(out) if out is not None else Path("synthetic") / load_plan(plan_path)[1]
    with locks.holding(locks.folder_lock(folder), f"generate output {folder}", "generate") as held:
        result = _generate_locked(plan_path, out=folder, processes=processes, limit=limit, show_progress=show_progress)
    result.warnings[:0] = held.warnings  # a dead generate's lock, taken over
    return result


def _generate_locked(plan_path: Path, *, out: Path, processes: int, limit: int | None, show_progress: bool) -> Result:
    try:
        return _generate_in(plan_path, out=out, processes=processes, limit=limit, show_progress=show_progress)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(out, exc) from None


def _generate_in(plan_path: Path, *, out: Path, processes: int, limit: int | None, show_progress: bool) -> Result:
    start = time.perf_counter()
    job = prepare_job(plan_path, out)
    job.staging.mkdir(parents=True, exist_ok=True)
    (job.out / REJECTED).mkdir(exist_ok=True)
    for stale in [*job.staging.glob("timing-*.json"), *job.staging.glob("progress-*.json"), *job.staging.glob("error-*.txt")]:
        stale.unlink()
    if processes > 1:
        import torch

        if torch.cuda.is_available() and processes > torch.cuda.device_count():
            raise DermkohyaError(f"--processes {processes}: only {torch.cuda.device_count()} CUDA device(s) visible")
        import torch.multiprocessing as mp

        init_file = job.staging / f"dist-{os.getpid()}-{time.time_ns()}"
        try:
            mp.spawn(_worker, args=(job, processes, init_file, limit, show_progress), nprocs=processes, join=True)
        except Exception:
            errors = [p.read_text(encoding="utf-8") for p in sorted(job.staging.glob("error-*.txt"))]
            if errors:
                raise DermkohyaError(errors[0]) from None
            raise
        finally:
            init_file.unlink(missing_ok=True)
    else:
        _run_rank(job, 0, 1, None, limit, show_progress)
    return _summarise(job, processes, time.perf_counter() - start)


def _summarise(job: Job, processes: int, wall_s: float) -> Result:
    timings = [t for r in range(processes) if (t := read_json(job.staging / f"timing-{r}.json"))]
    finished_records = []
    for item in job.items:
        final = job.out / item.path
        if final.exists():
            finished_records.append(read_record(final))
    rejected: Counter[str] = Counter()
    by_cell: Counter[str] = Counter()
    for record in finished_records:
        for entry in record["rejected"]:
            rejected.update(entry["reasons"])
            by_cell[f"{record['diagnosis']} / {record['fst']}"] += 1
    made = sum(t["made"] for t in timings)
    gen_s = max((t["end"] - t["start"] - t["load_s"] for t in timings), default=0.0)
    steady_made = sum(t["made"] - t["made_at_first_batch"] for t in timings)
    steady_s = max((t["end"] - t["first_batch_end"] for t in timings if t["first_batch_end"]), default=0.0)
    result = Result(
        out=job.out,
        planned=len(job.items),
        finished=len(finished_records),
        made=made,
        rejected=dict(rejected),
        rejected_by_cell=dict(by_cell),
        processes=processes,
        device=timings[0]["device"] if timings else "",
        wall_s=wall_s,
        load_s=max((t["load_s"] for t in timings), default=0.0),
        images_per_s=made / gen_s if made and gen_s > 0 else None,
        steady_images_per_s=steady_made / steady_s if steady_made > 0 and steady_s > 0 else None,
        warnings=list(job.warnings),
    )
    summary = dataclasses.asdict(result) | {"out": str(job.out), "complete": result.complete}
    summary["cells"] = [{"diagnosis": d, "fst": f, "planned": q} for (d, f), q in quotas(job.plan).items()]
    write_atomic(job.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if result.complete:
        shutil.rmtree(job.staging, ignore_errors=True)
    return result
