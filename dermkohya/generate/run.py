"""Running a job: one process or N ranks (spawned, one per GPU, or started by a launcher, across nodes:
dist.py), each making candidates for the whole batches it owns; between rounds rank 0 settles them
(filter.settle) until every image is finished or the limit is reached; a progress bar over all ranks;
the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from dermkohya import locks
from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic
from dermkohya.generate import dist
from dermkohya.generate.candidates import Attempt, Finisher, Outcome
from dermkohya.generate.engine import Engine, Pending, device_for
from dermkohya.generate.filter import settle, too_many
from dermkohya.generate.job import REJECTED, STAGING, Job, prepare_job
from dermkohya.generate.output import read_json, read_record
from dermkohya.generate.plan import image_seed, load_plan, quotas


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
    # per process, after its first batch: seconds, batches, the part spent waiting for the GPU (the rest is
    # host work the GPU waited for), and the tail after its last batch (the last PNGs, settling)
    loop: list[dict[str, float]] = dataclasses.field(default_factory=list)

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
    last_batch_end: float | None = None  # when the last batch's images reached the host
    waited_s: float = 0.0  # after the first batch: time spent waiting for the GPU to finish a batch
    made_at_first_batch: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    load_s: float = 0.0


def _produce(
    job: Job, engine: Engine, rank: int, world: int, progress: _Progress, limit: int | None, report: Callable[[], None]
) -> bool:
    """Make a candidate that passes the per-image checks for every image this process owns that has
    none yet. Each batch's host work (checks, hash, PNG, files: candidates.Finisher) runs on worker
    threads while the engine makes the next batch; a rejected image goes back into its own slot once its
    outcome is in (a later batch: its pixels depend only on its slot and seed). Returns False when
    `limit` stopped it early."""
    plan = job.plan
    size = plan.engine.batch_size
    slots: list[deque[Attempt]] = [deque() for _ in range(size)]
    for item in job.items:
        if _owner(item.n, size, world) != rank or (job.out / item.path).exists():
            continue
        side = read_json(job.staging / f"{item.n}.json") or {"rejected": [], "candidate": None}
        cand = side.get("candidate")
        if cand and (job.staging / f"{item.n}-{cand['attempt']}.png").is_file():
            continue
        attempt = len(side["rejected"])
        slots[item.n % size].append(Attempt(item, attempt, image_seed(plan.sampler.seed, item.n, attempt), side | {"candidate": None}))

    def take_outcomes(futures: list[Future[Outcome]]) -> None:
        for outcome in Finisher.outcomes(futures):
            done = outcome.attempt
            if outcome.accepted:
                progress.made += 1
                continue
            progress.rejected += 1
            if done.attempt + 1 >= plan.filter.max_attempts:
                raise too_many(job, done.item, outcome.side["rejected"])
            seed = image_seed(plan.sampler.seed, done.item.n, done.attempt + 1)
            slots[done.item.n % size].append(Attempt(done.item, done.attempt + 1, seed, outcome.side))
        progress.batches += 1
        if progress.batches == 1:
            progress.made_at_first_batch = progress.made
        report()

    def launch() -> tuple[list[Attempt | None], Pending] | None:
        """The next batch from the slots, its GPU work queued (None: nothing to launch)."""
        if not any(slots) or (limit is not None and progress.made >= limit):
            return None
        batch = [queue.popleft() if queue else None for queue in slots]
        return batch, engine.start([(entry.item.prompt, entry.seed) if entry else None for entry in batch])

    precision = str(engine.dtype).removeprefix("torch.")
    finisher = Finisher(job, engine.classifier, precision, min(8, max(1, (os.cpu_count() or 1) // world - 1)))
    in_flight: list[Future[Outcome]] | None = None  # the host work of the last batch fetched
    running = None  # the batch on the GPU
    try:
        while True:
            if running is None:
                if in_flight is not None:
                    take_outcomes(in_flight)
                    in_flight = None
                running = launch()
                if running is None:
                    return not any(slots)  # False: `limit` stopped it
            batch, pending = running
            waited = time.perf_counter()
            images, nans = engine.finish(pending)
            fetched = time.perf_counter()
            if progress.first_batch_end is None:  # steady state: after the first batch's GPU work
                progress.first_batch_end = fetched
            else:
                progress.waited_s += fetched - waited
            progress.last_batch_end = fetched
            # the previous batch's outcomes (its rejections back in their slots) before the next batch is
            # formed, as one batch at a time would; then that batch's GPU work is queued before this
            # batch's host work starts on the finisher threads, so their turns at the GIL cannot hold up
            # the queuing while the GPU waits for it
            if in_flight is not None:
                take_outcomes(in_flight)
            running = launch()
            in_flight = finisher.submit(batch, images, nans)
    finally:
        finisher.close()


def _run_rank(job: Job, group: dist.Group, limit: int | None, show_progress: bool) -> None:
    """One rank: load the engine, then rounds of (make candidates → rank 0 settles duplicates) until every
    image is finished or `limit` images were made. Writes its timings for rank 0's summary. (On a CPU
    every process keeps torch's full thread count: fewer threads would change the pixels' rounding.)"""
    rank, world = group.rank, group.world
    progress = _Progress()
    engine = Engine(job, group.device)
    progress.load_s = time.perf_counter() - progress.start
    cache: dict[int, dict[str, Any]] = {}
    done_before = -1
    with _ProgressBar(job, rank, world, progress, show_progress and rank == 0) as bar:
        while True:
            per_rank = None if limit is None else -(-limit // world)
            tried_before = progress.made + progress.rejected
            finished_early = not _produce(job, engine, rank, world, progress, per_rank, bar.update)
            stop = group.any(finished_early)
            worked = group.any(progress.made + progress.rejected > tried_before)
            done = group.share(group.lead(lambda: _settle(job, cache, bar)))
            if stop or done == len(job.items):
                break
            if not worked and done == done_before:
                raise _not_shared(job, done)
            done_before = done
    end = time.perf_counter()
    timing = dataclasses.asdict(progress) | {"end": end, "device": engine.device}
    write_atomic(job.staging / f"timing-{rank}.json", json.dumps(timing))


def _settle(job: Job, cache: dict[int, dict[str, Any]], bar: _ProgressBar) -> int:
    done = settle(job, cache)
    bar.update()
    return done


def _not_shared(job: Job, done: int) -> DermkohyaError:
    """A round in which no rank had anything to make and nothing more was finished: the ranks' files in
    the staging folder do not reach rank 0 (a node-local folder, or a filesystem that caches names)."""
    return DermkohyaError(
        f"{job.staging}: no rank has an image left to make, yet {done} of {len(job.items)} are finished: the "
        "ranks do not see each other's files there; put the output folder on a filesystem every node sees "
        "the same (NFS mounted with lookupcache=none, Lustre, GPFS), then run again to continue"
    )


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
        with dist.Group.spawned(rank, world, device_for(rank), init_file) as group:
            _run_reporting(job, group, limit, show_progress)
    except DermkohyaError:
        raise SystemExit(1) from None


def _run_reporting(job: Job, group: dist.Group, limit: int | None, show_progress: bool) -> None:
    """`_run_rank`, with a full disk said in one line and this rank's error left for the other ranks."""
    group.staging = job.staging
    try:
        try:
            _run_rank(job, group, limit, show_progress)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise _disk_full(job.out, exc) from None
    except dist.RanksLost:
        raise
    except DermkohyaError as exc:
        group.leave_word(str(exc))
        raise


def generate(
    plan_path: Path,
    *,
    out: Path | None = None,
    processes: int = 1,
    limit: int | None = None,
    show_progress: bool = True,
    break_lock: bool = False,
) -> Result:
    """Make (or finish) the plan's images. `processes` > 1 shards them over that many GPUs (or CPU
    processes), with the same files as one process. Under a launcher (torchrun, accelerate launch:
    WORLD_SIZE > 1 in the environment) this process is one rank of the launch, possibly on another node
    sharing the output's filesystem; same files again. `limit` stops after about that many new images.
    A second generate into the same output folder meanwhile is refused at once (locks.py)."""
    folder = Path(out) if out is not None else Path("synthetic") / load_plan(plan_path)[1]
    launch = dist.launch_from_env()
    if launch is not None:
        if processes > 1:
            raise DermkohyaError(f"--processes {processes} under a launcher ({launch.where}): the launcher starts the "
                                 "processes; leave --processes out and set torchrun's --nproc_per_node (accelerate "
                                 "launch's --num_processes) instead")
        return _generate_launched(plan_path, folder, launch, limit=limit, show_progress=show_progress, break_lock=break_lock)
    with locks.holding(locks.folder_lock(folder), f"generate output {folder}", "generate", break_lock=break_lock) as held:
        result = _generate_locked(plan_path, out=folder, processes=processes, limit=limit, show_progress=show_progress)
    result.warnings[:0] = held.warnings  # a dead generate's lock, taken over
    return result


def _generate_launched(
    plan_path: Path, folder: Path, launch: dist.Launch, *, limit: int | None, show_progress: bool, break_lock: bool
) -> Result:
    """One rank of a launcher's job. The ranks of one launch are one writer: rank 0 holds the folder's
    lock for all of them (so a second generate into the folder is still refused) and prepares the folder
    while the others wait; each rank checks the plan against it on its own node and makes its share;
    rank 0 settles, summarises and hands every rank the result."""
    start = time.perf_counter()
    what = f"generate output {folder}"
    with dist.Group.launched_from(launch) as group, contextlib.ExitStack() as stack:
        taken = group.lead(lambda: stack.enter_context(locks.holding(locks.folder_lock(folder), what, "generate", break_lock=break_lock)))
        job = group.lead(lambda: _prepare(plan_path, folder))
        group.staging = folder / STAGING
        if job is None:
            try:
                job = prepare_job(plan_path, folder, write=False)
            except DermkohyaError as exc:
                group.leave_word(f"{plan_path} on this node: {exc}")
                raise
        _run_reporting(job, group, limit, show_progress)
        group.barrier()  # every rank's timing file is written
        result = group.share(group.lead(lambda: _summarise(job, group.world, time.perf_counter() - start)))
    result.warnings[:0] = taken.warnings if taken is not None else []
    return result


def _generate_locked(plan_path: Path, *, out: Path, processes: int, limit: int | None, show_progress: bool) -> Result:
    try:
        return _generate_in(plan_path, out=out, processes=processes, limit=limit, show_progress=show_progress)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(out, exc) from None


def _prepare(plan_path: Path, out: Path) -> Job:
    """The job, its plan.json checked or written, and the staging folder cleared of a previous run's notes."""
    job = prepare_job(plan_path, out)
    job.staging.mkdir(parents=True, exist_ok=True)
    (job.out / REJECTED).mkdir(exist_ok=True)
    for stale in [*job.staging.glob("timing-*.json"), *job.staging.glob("progress-*.json"), *job.staging.glob("error-*.txt")]:
        stale.unlink()
    return job


def _generate_in(plan_path: Path, *, out: Path, processes: int, limit: int | None, show_progress: bool) -> Result:
    start = time.perf_counter()
    job = _prepare(plan_path, out)
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
        _run_rank(job, dist.Group.single(device_for(0)), limit, show_progress)
    return _summarise(job, processes, time.perf_counter() - start)


def _loop(timing: dict[str, Any]) -> dict[str, float]:
    """One process's steady window: from its first batch's images on the host to its end."""
    return {"steady_s": round(timing["end"] - timing["first_batch_end"], 3), "batches": timing["batches"] - 1,
            "waited_for_gpu_s": round(timing["waited_s"], 3), "tail_s": round(timing["end"] - timing["last_batch_end"], 3)}  # fmt: skip


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
        loop=[_loop(t) for t in timings if t["first_batch_end"]],
    )
    summary = dataclasses.asdict(result) | {"out": str(job.out), "complete": result.complete}
    summary["cells"] = [{"diagnosis": d, "fst": f, "planned": q} for (d, f), q in quotas(job.plan).items()]
    write_atomic(job.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if result.complete:
        shutil.rmtree(job.staging, ignore_errors=True)
    return result
