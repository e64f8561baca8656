"""Percentile bootstrap confidence intervals for per-cell figures (ITA, LPIPS, CLIP, FID/KID, AUROC …).

Why a bootstrap: the cells of a fairness report (one skin type, one diagnosis × skin type) are small and
their figures are not means of independent numbers (FID, AUROC), so a normal approximation is wrong.
Images are resampled with replacement *within the cell* (optionally within strata, e.g. skin types, so
that a group's size stays fixed); the expensive part — network features, classifier outputs — is
computed once by the caller and only indexed here. The interval is the (2.5, 97.5) percentile of the
resampled statistic; resamples where the statistic is undefined (a single class, too few images) are
dropped and counted. How many resamples were asked for and how many were usable go into every report.

A percentile interval need not contain the point estimate for a biased statistic (FID on resampled
sets, which hold duplicate images, is larger than on the original set): read it as the spread of the
figure under resampling, and compare systems through the interval of their difference (paired: the
same resampled images for both), not through overlapping intervals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 200  # per-image figures (LPIPS, CLIP, ITA, AUROC); FID on a CPU: fewer
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A percentile interval; `valid` of `resamples` resamples gave a defined statistic."""

    low: float
    high: float
    resamples: int
    valid: int

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def percentile_interval(samples: Sequence[float] | np.ndarray, resamples: int, level: float = LEVEL) -> Interval | None:
    """The central `level` percentile interval of bootstrap samples; None when none is defined."""
    values = np.asarray([s for s in samples if s is not None and np.isfinite(s)], dtype=np.float64)
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(float(low), float(high), resamples, int(values.size))


def resample_indices(rng: np.random.Generator, members: np.ndarray, strata: np.ndarray | None = None) -> np.ndarray:
    """One resample of `members` (positions into the caller's arrays), with replacement, within each stratum."""
    members = np.asarray(members)
    if strata is None:
        return members[rng.integers(0, len(members), len(members))] if len(members) else members
    parts = []
    for value in dict.fromkeys(strata.tolist()):
        group = members[strata == value]
        parts.append(group[rng.integers(0, len(group), len(group))])
    return np.concatenate(parts) if parts else members


def bootstrap(
    statistic: Callable[[np.ndarray], float | None],
    members: Sequence[int] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    strata: Sequence[object] | np.ndarray | None = None,
    level: float = LEVEL,
) -> Interval | None:
    """Interval of `statistic(indices)` over resamples of `members` (indices into precomputed arrays).

    `strata` (one label per member) keeps each stratum's size fixed: resampling happens inside it."""
    members = np.asarray(members, dtype=np.int64)
    if members.size == 0 or resamples < 1:
        return None
    labels = None if strata is None else np.asarray(list(strata), dtype=object)
    rng = np.random.default_rng(seed)
    samples = [statistic(resample_indices(rng, members, labels)) for _ in range(resamples)]
    return percentile_interval([s for s in samples if s is not None], resamples, level)


def bootstrap_two_sample(
    statistic: Callable[[np.ndarray, np.ndarray], float | None],
    a: Sequence[int] | np.ndarray,
    b: Sequence[int] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval | None:
    """Interval of a two-set statistic (FID, KID, LPIPS real↔synthetic): both sets resampled independently."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.size == 0 or b.size == 0 or resamples < 1:
        return None
    rng = np.random.default_rng(seed)
    samples = [statistic(resample_indices(rng, a), resample_indices(rng, b)) for _ in range(resamples)]
    return percentile_interval([s for s in samples if s is not None], resamples, level)


def mean_interval(values: Sequence[float] | np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval | None:
    """Interval of the mean of per-image values (LPIPS distances, CLIP scores)."""
    data = np.asarray(values, dtype=np.float64)
    return bootstrap(lambda idx: float(data[idx].mean()), np.arange(data.size), resamples=resamples, seed=seed)


def median_interval(values: Sequence[float] | np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval | None:
    """Interval of the median of per-image values (ITA°)."""
    data = np.asarray(values, dtype=np.float64)
    return bootstrap(lambda idx: float(np.median(data[idx])), np.arange(data.size), resamples=resamples, seed=seed)
