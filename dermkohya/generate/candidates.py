"""What happens to a batch's images after the engine made them: the per-image checks (NaN, blank or
clipped, an optional classifier), the perceptual hash, the record, the PNG and its side file — on worker
threads, so that the host work of batch k runs while the GPU makes batch k+1.

Why this order is safe: an image's next attempt is only queued once its previous attempt's outcome came
back, so the files of one image are always written in attempt order, and its pixels depend only on its
slot and seed, never on when a rejection is re-queued.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from dermkohya import metrics
from dermkohya.generate.filter import image_reasons
from dermkohya.generate.job import Job
from dermkohya.generate.output import image_record, png_bytes, write_candidate, write_rejection
from dermkohya.generate.plan import Item

if TYPE_CHECKING:
    from dermkohya.generate.engine import Classifier


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One slot of a batch: which image, which attempt, its seed, and its side record before this attempt."""

    item: Item
    attempt: int
    seed: int
    side: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """An attempt, judged and written: its reasons (empty: a staged candidate) and its side record after."""

    attempt: Attempt
    reasons: list[str]
    side: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return not self.reasons


def finish(job: Job, classifier: Classifier | None, precision: str, attempt: Attempt, image: np.ndarray, nan: bool) -> Outcome:
    """Judge one image and write it: a candidate into staging, or a rejection into rejected/, each with
    its side file (written after the PNG, so a side file never names a PNG that is not there)."""
    item, side = attempt.item, json.loads(json.dumps(attempt.side))
    reasons = image_reasons(job.plan, classifier, image, item.diagnosis, nan)
    phash = metrics.phash(image)
    record = image_record(job, item, attempt.attempt, attempt.seed, phash, list(side["rejected"]), precision)
    if reasons:
        side["rejected"].append({"attempt": attempt.attempt, "seed": attempt.seed, "reasons": reasons})
        record["rejected_for"] = reasons
        write_rejection(job.out, item.n, attempt.attempt, png_bytes(image, record), side)
    else:
        side["candidate"] = {"attempt": attempt.attempt, "seed": attempt.seed, "phash": f"{phash:016x}"}
        write_candidate(job.staging, item.n, attempt.attempt, png_bytes(image, record), side)
    return Outcome(attempt, reasons, side)


class Finisher:
    """Worker threads that finish whole batches (PNG encoding and zlib release the GIL). One batch is
    handed over while the next is generated; `outcomes` waits for it, in slot order."""

    def __init__(self, job: Job, classifier: Classifier | None, precision: str, workers: int) -> None:
        self.job, self.classifier, self.precision = job, classifier, precision
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dermkohya-finish")

    def submit(self, batch: list[Attempt | None], images: np.ndarray, nans: np.ndarray) -> list[Future[Outcome]]:
        return [
            self.pool.submit(finish, self.job, self.classifier, self.precision, attempt, image, bool(nan))
            for attempt, image, nan in zip(batch, images, nans)
            if attempt is not None
        ]

    @staticmethod
    def outcomes(futures: list[Future[Outcome]]) -> Iterator[Outcome]:
        """The batch's outcomes in slot order; the first failure (a full disk, say) is raised after every
        write of the batch has ended, so none is left half done."""
        done = [future.exception() for future in futures]
        for error in done:
            if error is not None:
                raise error
        for future in futures:
            yield future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
