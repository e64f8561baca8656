"""LPIPS (v0.1, AlexNet): synthetic images against real ones of the same row, and between synthetic pairs.

Pairs are sampled (at most `lpips_pairs` per row) with the evaluation's one random generator, in row order,
so a report is the same on every run."""

from __future__ import annotations

from typing import Any

import numpy as np

from dermkohya.bootstrap import mean_interval
from dermkohya.metrics import networks
from dermkohya.metrics.base import Column, Evaluation, Group, Metric, mean


class LPIPS(Metric):
    name = "lpips"
    skip = "lpips"
    help = "LPIPS of synthetic images to real ones of the same row, and between synthetic pairs (diversity)"
    columns = (
        Column("lpips_to_real", "LPIPS to real ↓", plot="LPIPS to real ↓", headline=True, ci="lpips_to_real_ci"),
        Column("lpips_diversity", "LPIPS diversity ↑"),
    )
    position = 30
    networks = ("lpips",)

    def prepare(self, ev: Evaluation) -> None:
        ev.lpips()

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        size, k, values = ev.options.lpips_size, ev.options.lpips_pairs, {}
        if group.real:
            pairs = [(ev.synthetic[i].path, ev.real[int(ev.rng.choice(group.real))].path) for i in _sample(ev.rng, group.synthetic, k)]
            distances = networks.lpips_pairs(ev.lpips(), pairs, size)
            values["lpips_to_real"] = mean(distances.tolist())
            if group.kind == "skin type":  # resampling the row's sampled pairs: one pair per synthetic image
                interval = mean_interval(distances, resamples=ev.options.bootstrap, seed=ev.options.seed)
                values["lpips_to_real_ci"] = interval.as_list() if interval else None
        if len(group.synthetic) >= 2:
            pairs = [(ev.synthetic[a].path, ev.synthetic[b].path) for a, b in _distinct_pairs(ev.rng, group.synthetic, k)]
            values["lpips_diversity"] = mean(networks.lpips_pairs(ev.lpips(), pairs, size).tolist())
        return values


def _sample(rng: np.random.Generator, members: list[int], k: int) -> list[int]:
    return members if len(members) <= k else [members[i] for i in sorted(rng.choice(len(members), k, replace=False))]


def _distinct_pairs(rng: np.random.Generator, members: list[int], k: int) -> list[tuple[int, int]]:
    n = len(members)
    if n * (n - 1) // 2 <= k:
        return [(members[a], members[b]) for a in range(n) for b in range(a + 1, n)]
    pairs = set()
    while len(pairs) < k:
        a, b = rng.choice(n, 2, replace=False)
        pairs.add((members[min(a, b)], members[max(a, b)]))
    return sorted(pairs)


METRIC = LPIPS()
