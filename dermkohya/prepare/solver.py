"""The exact repeats search: integer repeats per subset so that each category's share of effective samples
lands as close to its target as integers allow.

A category (a skin type, or diagnosis × skin type) owns subsets of n_i images; with repeats r_i in
1…cap its effective count E = Σ n_i r_i takes values in a subset-sum set, found once per category by a
dynamic programme over its subsets. Its share is E / T with T = Σ E over categories, and its relative
deviation |E / (goal × T) − 1|. For a bound δ and a total T each category's E must lie in
[(1 − δ) goal T, (1 + δ) goal T]; T is scanned upwards (every total at once with numpy for a cheap
range test, then an exact sum-set check), so the first feasible T is the smallest.

The best assignment, exactly (floating point aside): the largest deviation, counted as zero while it is
within the tolerance, first; then the fewest effective samples (short epochs, least repetition of the
same images); then the smallest largest deviation. With `even`, only assignments where each category's
subsets take one repeat or two neighbouring ones are searched, so a skin type's diagnoses keep their proportions as nearly as integers allow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-12
_CHUNK = 1 << 10  # totals tested in the first numpy pass
_RESOLUTION = 1e-9  # deviations closer than this count as equal


@dataclass(frozen=True)
class Solution:
    """Effective samples per category and the repeats of each category's subsets (in the given order)."""

    effective: tuple[int, ...]
    repeats: tuple[tuple[int, ...], ...]
    deviation: float  # the largest relative deviation of a category's share from its goal

    @property
    def total(self) -> int:
        return sum(self.effective)


def deviation(effective: Sequence[int], goal: Sequence[float]) -> float:
    """The largest |share / goal − 1| over the categories."""
    total = sum(effective)
    return max(abs(e / (g * total) - 1) for e, g in zip(effective, goal))


def key(effective: Sequence[int], goal: Sequence[float], tolerance: float) -> tuple[float, int, float]:
    """What the search minimises, as a sortable tuple (the brute-force tests rank by it too)."""
    dev = deviation(effective, goal)
    return (dev if dev > tolerance + EPS else tolerance, sum(effective), dev)


def solve(sizes: Sequence[Sequence[int]], goal: Sequence[float], cap: int, tolerance: float, *,
          even: bool = False) -> Solution:
    """The best repeats in 1…cap for categories with subsets of `sizes[c]` images and target shares `goal`
    (summing to 1). Every category needs at least one subset of at least one image. `even` searches only
    assignments where a category's subsets take one repeat or two neighbouring ones."""
    return _solve(sizes, goal, cap, tolerance, within_only=False, even=even)  # type: ignore[return-value]


def solve_within(sizes: Sequence[Sequence[int]], goal: Sequence[float], cap: int, tolerance: float, *,
                 even: bool = False) -> Solution | None:
    """As `solve`, or None at once when no assignment is within the tolerance (no search for the least
    bad one, which is the slow part)."""
    return _solve(sizes, goal, cap, tolerance, within_only=True, even=even)


def _solve(sizes: Sequence[Sequence[int]], goal: Sequence[float], cap: int, tolerance: float,
           *, within_only: bool, even: bool) -> Solution | None:
    search = _Search([_Category(list(s), cap, even) for s in sizes], [float(g) for g in goal])
    found = search.smallest_total(tolerance)
    if found is None:
        if within_only:
            return None
        found = search.least_worst(tolerance)
    total, effective = found
    effective = search.least_deviation(total, effective)
    repeats = tuple(c.representation(e) for c, e in zip(search.cats, effective))
    return Solution(tuple(effective), repeats, deviation(effective, goal))


class _Category:
    """One category's subsets and the effective counts they can reach (a boolean array indexed by E)."""

    def __init__(self, sizes: list[int], cap: int, even: bool) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError("every category needs subsets of at least one image")
        self.sizes, self.cap = sizes, cap
        self.low, self.high = sum(sizes), cap * sum(sizes)
        if even:  # repeats q or q + 1: q × images + a subset-sum of the subsets' sizes
            sums = np.zeros(self.low + 1, dtype=bool)
            sums[0] = True
            for n in sizes:
                sums[n:] |= sums[: self.low + 1 - n].copy()
            offsets = np.flatnonzero(sums[: self.low])
            values = (np.arange(1, cap)[:, None] * self.low + offsets[None, :]).ravel()
            self.values = np.append(values, self.high)
            return
        interval: tuple[int, int] | None = (0, 0)  # the reachable counts while they are one run
        reach = np.zeros(self.high + 1, dtype=bool)
        for n in sorted(sizes):
            if interval is not None and interval[1] - interval[0] + 1 >= n:  # the shifted runs overlap
                interval = (interval[0] + n, interval[1] + cap * n)
                continue
            if interval is not None:
                reach[:] = False
                reach[interval[0] : interval[1] + 1] = True
                upper = interval[1]
            upper += cap * n
            reach[: upper + 1] = _shift_or(reach[: upper + 1], n, 1, cap)
            hits = np.flatnonzero(reach[: upper + 1])
            interval = (int(hits[0]), int(hits[-1])) if len(hits) == hits[-1] - hits[0] + 1 else None
        if interval is not None:
            reach[:] = False
            reach[interval[0] : interval[1] + 1] = True
        self.values = np.flatnonzero(reach)  # sorted reachable E

    def representation(self, effective: int) -> tuple[int, ...]:
        """Repeats per subset giving exactly `effective`, as even as possible."""
        sizes, cap, total = self.sizes, self.cap, sum(self.sizes)
        if effective % total == 0:
            return tuple(effective // total for _ in sizes)
        base = effective // total
        if 1 <= base < cap:  # two neighbouring repeats: base + 1 on a subset-sum of the subsets
            extra = _subset_sum(sizes, effective - base * total)
            if extra is not None:
                return tuple(base + (i in extra) for i in range(len(sizes)))
        return _any_representation(sizes, cap, effective)


def _shift_or(bits: np.ndarray, step: int, kmin: int, kmax: int) -> np.ndarray:
    """out[v] = any(bits[v − k·step] for k in kmin…kmax), same length, in O(len) via running sums along
    each residue class of `step` (zeros in front keep every index in range)."""
    length = len(bits)
    pad = (kmax + 1) * step
    rows = -(-(pad + length) // step)
    padded = np.zeros(rows * step, dtype=np.int32)
    padded[pad : pad + length] = bits
    running = np.cumsum(padded.reshape(rows, step), axis=0, dtype=np.int32).ravel()
    near, far = pad - kmin * step, pad - (kmax + 1) * step
    return running[near : near + length] > running[far : far + length]


def _subset_sum(sizes: list[int], target: int) -> set[int] | None:
    """Indices of subsets whose sizes sum to `target` (larger subsets first where there is a choice)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    stages = [np.zeros(target + 1, dtype=bool)]
    stages[0][0] = True
    for i in order:
        prev = stages[-1]
        cur = prev.copy()
        n = sizes[i]
        if n <= target:
            cur[n:] |= prev[: target + 1 - n]
        stages.append(cur)
    if not stages[-1][target]:
        return None
    chosen, rest = set(), target
    for depth in range(len(order), 0, -1):
        i = order[depth - 1]
        if not stages[depth - 1][rest]:
            chosen.add(i)
            rest -= sizes[i]
    return chosen


def _any_representation(sizes: list[int], cap: int, effective: int) -> tuple[int, ...]:
    """Repeats giving `effective`, each subset in turn taking the repeat nearest the mean still needed."""
    stages = [np.zeros(effective + 1, dtype=bool)]
    stages[0][0] = True
    for n in sizes:
        stages.append(_shift_or(stages[-1], n, 1, cap))
    assert stages[-1][effective], "not a reachable effective count"
    repeats = [0] * len(sizes)
    rest = effective
    for depth in range(len(sizes), 0, -1):
        n = sizes[depth - 1]
        mean = rest / sum(sizes[:depth])
        options = [r for r in range(1, cap + 1) if rest - r * n >= 0 and stages[depth - 1][rest - r * n]]
        repeats[depth - 1] = min(options, key=lambda r: (abs(r - mean), r))
        rest -= repeats[depth - 1] * n
    return tuple(repeats)


class _Search:
    """The totals T worth trying for a bound δ: every category's count must fit in
    [(1 − δ) goal T, (1 + δ) goal T] ∩ [its all-ones count, its all-at-the-cap count], which bounds T from
    both sides before anything is enumerated (an empty range is an answer at once)."""

    def __init__(self, cats: list[_Category], goal: list[float]) -> None:
        self.cats, self.goal = cats, goal
        # Tried first: the categories that rule out the most totals (the least room above, the most below).
        by_room = sorted(range(len(cats)), key=lambda c: cats[c].high / goal[c])
        by_floor = sorted(range(len(cats)), key=lambda c: -cats[c].low / goal[c])
        self.order = list(dict.fromkeys(c for pair in zip(by_room, by_floor) for c in pair))

    def totals(self, delta: float) -> range:
        low = max(sum(c.low for c in self.cats), *(math.ceil(c.low / ((1 + delta + EPS) * g))
                                                    for c, g in zip(self.cats, self.goal)))
        high = sum(c.high for c in self.cats)
        if delta < 1:
            high = min(high, *(math.floor(c.high / ((1 - delta - EPS) * g)) for c, g in zip(self.cats, self.goal)))
        return range(low, high + 1)

    def smallest_total(self, delta: float, only: int | None = None) -> tuple[int, list[int]] | None:
        """The smallest total (or just `only`) with counts summing to it and every deviation ≤ delta."""
        totals = self.totals(delta)
        if only is not None:
            totals = range(only, only + 1) if only in totals else range(0)
        start, size = totals.start, _CHUNK
        while start < totals.stop:  # small chunks first: the answer is usually near the start
            chunk = np.arange(start, min(totals.stop, start + size), dtype=np.int64)
            start, size = start + size, min(size * 2, 1 << 16)
            ok = np.ones(len(chunk), dtype=bool)
            lo_sum = np.zeros(len(chunk), dtype=np.int64)
            hi_sum = np.zeros(len(chunk), dtype=np.int64)
            spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for c in self.order:
                cat, g = self.cats[c], self.goal[c]
                first = np.searchsorted(cat.values, np.ceil((1 - delta - EPS) * g * chunk), side="left")
                last = np.searchsorted(cat.values, np.floor((1 + delta + EPS) * g * chunk), side="right") - 1
                ok &= (first <= last) & (first < len(cat.values)) & (last >= 0)
                first = np.clip(first, 0, len(cat.values) - 1)
                last = np.clip(last, 0, len(cat.values) - 1)
                lo_sum += cat.values[first]
                hi_sum += cat.values[last]
                spans[c] = (first, last)
                if ok.sum() * 4 < len(chunk):  # most totals already ruled out: carry on with the rest only
                    keep = np.flatnonzero(ok)
                    chunk, ok, lo_sum, hi_sum = chunk[keep], ok[keep], lo_sum[keep], hi_sum[keep]
                    spans = {k: (f[keep], l[keep]) for k, (f, l) in spans.items()}
                    if not len(chunk):
                        break
            ok &= (lo_sum <= chunk) & (chunk <= hi_sum)
            for j in np.flatnonzero(ok):
                window = [(int(spans[c][0][j]), int(spans[c][1][j])) for c in range(len(self.cats))]
                effective = _exact(self.cats, window, int(chunk[j]), self.goal)
                if effective is not None:
                    return int(chunk[j]), effective
        return None

    def least_worst(self, tolerance: float) -> tuple[int, list[int]]:
        """The smallest largest deviation any assignment reaches (then the smallest total): bisection on
        the bound, each feasible step moving the upper end down to the deviation actually found."""
        low = tolerance
        best = self.smallest_total(deviation([c.low for c in self.cats], self.goal))
        assert best is not None
        high = deviation(best[1], self.goal)
        while high - low > _RESOLUTION:
            mid = (low + high) / 2
            found = self.smallest_total(mid)
            if found is None:
                low = mid
            else:
                best, high = found, min(mid, deviation(found[1], self.goal))
        final = self.smallest_total(high)  # the smallest total at that deviation
        return final if final is not None else best

    def least_deviation(self, total: int, effective: list[int]) -> list[int]:
        """At the chosen total, the assignment with the smallest largest deviation."""
        best, high, low = effective, deviation(effective, self.goal), 0.0
        while high - low > _RESOLUTION:
            mid = (low + high) / 2
            found = self.smallest_total(mid, only=total)
            if found is None:
                low = mid
            else:
                best, high = found[1], min(mid, deviation(found[1], self.goal))
        return best


def _exact(cats: list[_Category], spans: list[tuple[int, int]], total: int, goal: list[float]) -> list[int] | None:
    """E_c from each category's allowed values summing exactly to `total`, or None: a sum-set dynamic
    programme over the offsets above each window's smallest value."""
    options = [cat.values[first : last + 1] for cat, (first, last) in zip(cats, spans)]
    need = total - sum(int(o[0]) for o in options)
    if all(len(o) == int(o[-1] - o[0]) + 1 for o in options):  # contiguous windows: every sum between
        return _greedy_contiguous(options, need, total, goal)
    stages = [np.zeros(need + 1, dtype=bool)]
    stages[0][0] = True
    for o in options:
        offsets = (o - o[0]).astype(np.int64)
        stages.append(_sumset(stages[-1], offsets[offsets <= need]))
    if not stages[-1][need]:
        return None
    effective = [0] * len(cats)
    rest = need
    for c in range(len(cats) - 1, -1, -1):
        o = options[c]
        offsets = (o - o[0]).astype(np.int64)
        possible = offsets[(offsets <= rest)]
        possible = possible[stages[c][rest - possible]]
        ideal = goal[c] * total - int(o[0])
        pick = int(possible[np.argmin(np.abs(possible - ideal))])
        effective[c] = int(o[0]) + pick
        rest -= pick
    return effective


def _greedy_contiguous(options: list[np.ndarray], need: int, total: int, goal: list[float]) -> list[int]:
    """Contiguous windows: start each at its smallest value and hand out the `need` left over, nearest
    the ideal counts first, so the pick is close to the goal (the bound holds for any pick)."""
    effective = [int(o[0]) for o in options]
    for c, o in enumerate(options):
        want = min(int(o[-1]), max(effective[c], round(goal[c] * total)))
        give = min(need, want - effective[c])
        effective[c] += give
        need -= give
    for c, o in enumerate(options):
        give = min(need, int(o[-1]) - effective[c])
        effective[c] += give
        need -= give
    assert need == 0
    return effective


def _sumset(bits: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """{a + b : bits[a], b in offsets} within the array's length: contiguous runs of offsets by running
    sums, many scattered offsets by FFT convolution."""
    if len(offsets) == 0:
        return np.zeros_like(bits)
    if len(offsets) <= 32:
        out = np.zeros_like(bits)
        for offset in offsets.tolist():
            out[offset:] |= bits[: len(bits) - offset]
        return out
    runs = np.split(offsets, np.flatnonzero(np.diff(offsets) != 1) + 1)
    if len(runs) <= 16:
        out = np.zeros_like(bits)
        for run in runs:
            out |= _shift_or(bits, 1, int(run[0]), int(run[-1]))
        return out
    size = 1 << math.ceil(math.log2(len(bits) + int(offsets[-1]) + 1))
    mask = np.zeros(len(bits), dtype=float)
    mask[offsets[offsets < len(bits)]] = 1.0
    conv = np.fft.irfft(np.fft.rfft(bits.astype(float), size) * np.fft.rfft(mask, size), size)[: len(bits)]
    return conv > 0.5
