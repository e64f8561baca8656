"""Which candidates become finished images: the per-image checks (NaN, blank or clipped, an optional
classifier's confidence) and the near-duplicate check, which walks each diagnosis × skin-type cell in
index order so that its decisions never depend on which process finished first.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermkohya import metrics
from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic
from dermkohya.generate.job import REJECTED, Job
from dermkohya.generate.output import read_json, read_record, write_index
from dermkohya.generate.plan import Item, Plan

if TYPE_CHECKING:
    from dermkohya.generate.engine import Classifier


def image_reasons(plan: Plan, classifier: Classifier | None, image: np.ndarray, diagnosis: str, nan: bool) -> list[str]:
    """Why one image fails the per-image checks (empty: it passes). All checks are off with [filter] enabled = false."""
    if not plan.filter.enabled:
        return []
    if nan:
        return ["nan"]
    reasons = metrics.image_problems(image, min_std=plan.filter.min_std, max_clipped=plan.filter.max_clipped)
    if not reasons and classifier is not None and classifier.confidence(image, diagnosis) < plan.filter.min_confidence:
        reasons.append("low-confidence")
    return reasons


def too_many(job: Job, item: Item, rejected: list[dict[str, Any]]) -> DermkohyaError:
    reasons = Counter(r for entry in rejected for r in entry["reasons"])
    return DermkohyaError(
        f"{job.out}: image {item.n} ({item.diagnosis}, FST {item.fst}) was rejected {len(rejected)} times "
        f"({', '.join(f'{k} ×{v}' for k, v in reasons.items())}); the model does not make usable images for this "
        "cell: check the LoRA and base, or relax [filter] (min_std, max_clipped, duplicate_bits) or raise max_attempts"
    )


def settle(job: Job, cache: dict[int, dict[str, Any]]) -> int:
    """Rank 0, between rounds: walk each cell in index order; a candidate within `duplicate_bits` of an
    earlier accepted image of its cell is rejected (it gets the next seed next round), the others are
    moved into place once every earlier image of the cell is settled. Returns the number finished."""
    plan = job.plan
    staging = job.staging
    bits = plan.filter.duplicate_bits if plan.filter.enabled else 0
    for cell in job.cells():
        accepted: list[tuple[int, int]] = []
        blocked = False
        for item in cell:
            final = job.out / item.path
            side_path = staging / f"{item.n}.json"
            if final.exists():
                record = cache.get(item.n) or read_record(final)
                cache[item.n] = record
                accepted.append((item.n, int(record["phash"], 16)))
                if side_path.exists():
                    drop_staged(staging, item.n)
                continue
            side = read_json(side_path)
            cand = side.get("candidate") if side else None
            if cand is None or not (staging / f"{item.n}-{cand['attempt']}.png").is_file():
                blocked = True
                continue
            phash = int(cand["phash"], 16)
            near = [(metrics.hamming(phash, h), m) for m, h in accepted if metrics.hamming(phash, h) <= bits] if bits else []
            if near:
                distance, twin = min(near)
                side["rejected"].append(
                    {"attempt": cand["attempt"], "seed": cand["seed"], "reasons": ["duplicate"], "duplicate_of": twin, "distance": distance}
                )
                side["candidate"] = None
                os.replace(staging / f"{item.n}-{cand['attempt']}.png", job.out / REJECTED / f"{item.n}-{cand['attempt']}.png")
                write_atomic(side_path, json.dumps(side))
                if len(side["rejected"]) >= plan.filter.max_attempts:
                    raise too_many(job, item, side["rejected"])
                blocked = True
                continue
            if blocked:
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f"{item.n}-{cand['attempt']}.png", final)
            cache[item.n] = read_record(final)
            accepted.append((item.n, phash))
            drop_staged(staging, item.n)
    write_index(job, cache)
    return len(cache)


def drop_staged(staging: Path, n: int) -> None:
    for leftover in staging.glob(f"{n}-*.png"):
        leftover.unlink(missing_ok=True)
    (staging / f"{n}.json").unlink(missing_ok=True)
