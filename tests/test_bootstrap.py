"""Percentile bootstrap intervals: coverage of a known mean, strata kept, undefined resamples dropped."""

from __future__ import annotations

import numpy as np

from dermkohya import bootstrap


def test_mean_interval_covers_the_true_mean_most_of_the_time() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(60):
        values = rng.normal(3.0, 1.0, 40)
        interval = bootstrap.mean_interval(values, resamples=200, seed=trial)
        assert interval is not None and interval.low <= values.mean() <= interval.high
        covered += interval.low <= 3.0 <= interval.high
    assert covered >= 50  # nominal 95 %: about 57 of 60


def test_same_seed_same_interval_and_the_count_is_reported() -> None:
    values = np.arange(30, dtype=float)
    a = bootstrap.median_interval(values, resamples=100, seed=3)
    b = bootstrap.median_interval(values, resamples=100, seed=3)
    assert a == b and a.resamples == 100 and a.valid == 100


def test_strata_keep_group_sizes() -> None:
    strata = np.array(["I"] * 5 + ["VI"] * 2)
    sizes = set()

    def statistic(idx: np.ndarray) -> float:
        sizes.add((int((idx < 5).sum()), int((idx >= 5).sum())))
        return float(idx.mean())

    bootstrap.bootstrap(statistic, np.arange(7), resamples=50, strata=strata)
    assert sizes == {(5, 2)}


def test_undefined_resamples_are_dropped_and_counted() -> None:
    labels = np.array([0, 0, 0, 1])

    def share_of_ones_if_both(idx: np.ndarray) -> float | None:
        return float(labels[idx].mean()) if len(set(labels[idx])) == 2 else None

    interval = bootstrap.bootstrap(share_of_ones_if_both, np.arange(4), resamples=200, seed=1)
    assert interval is not None and interval.valid < 200 and interval.resamples == 200
    assert bootstrap.bootstrap(lambda idx: None, np.arange(4), resamples=10) is None


def test_two_sample_resamples_each_set_within_itself() -> None:
    a, b = np.arange(0, 10), np.arange(10, 14)
    seen = []

    def statistic(ia: np.ndarray, ib: np.ndarray) -> float:
        seen.append((len(ia), len(ib), ia.max() < 10, ib.min() >= 10))
        return float(ib.mean() - ia.mean())

    interval = bootstrap.bootstrap_two_sample(statistic, a, b, resamples=40)
    assert set(seen) == {(10, 4, True, True)} and interval.low <= 7.0 <= interval.high
