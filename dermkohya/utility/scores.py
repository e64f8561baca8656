"""Classifier figures per cell (all held-out images, one skin type), averaged over seeds, with bootstrap CIs.

Why these: AUROC (one-vs-rest, macro over the classes present) does not depend on a threshold or on the
class mix, so a skin type with few images of one diagnosis is still comparable; balanced accuracy is the
mean recall over the classes present (what a clinician's decision sees); the equal-opportunity gap of a
class is the largest difference in its true-positive rate between skin-type groups (Hardt et al. 2016) —
how much more often the class is missed on one skin type than another. A cell with a single class or
too few images gets `null` and the reason, never a number that would be read as a result.

A figure is the mean over training seeds of the figure on the cell's images; its interval resamples the
images (the same resample for every seed, and for both arms when a difference is taken), so it shows
the held-out sampling error of the seed-averaged figure; `per_seed` shows the training spread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dermkohya.bootstrap import bootstrap

Statistic = Callable[[np.ndarray], float | None]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counted half."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """One-vs-rest AUROC averaged over the classes present; None for a single class."""
    present = np.unique(labels)
    if present.size < 2:
        return None
    return float(np.mean([auroc(probs[:, c], labels == c) for c in present]))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean recall over the classes present; None for a single class."""
    present = np.unique(labels)
    if present.size < 2:
        return None
    predicted = probs.argmax(axis=1)
    return float(np.mean([(predicted[labels == c] == c).mean() for c in present]))


def eo_gap(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, cls: int, min_positives: int) -> float | None:
    """Largest difference in true-positive rate of class `cls` between groups with ≥ `min_positives` of it."""
    predicted = probs.argmax(axis=1)
    rates = []
    for group in np.unique(groups):
        hit = (labels == cls) & (groups == group)
        if hit.sum() >= min_positives:
            rates.append((predicted[hit] == cls).mean())
    return float(max(rates) - min(rates)) if len(rates) >= 2 else None


def tprs(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, cls: int) -> dict[str, float | None]:
    predicted = probs.argmax(axis=1)
    out: dict[str, float | None] = {}
    for group in dict.fromkeys(groups.tolist()):
        hit = (labels == cls) & (groups == group)
        out[str(group)] = round(float((predicted[hit] == cls).mean()), 4) if hit.any() else None
    return out


@dataclasses.dataclass
class Held:
    """The held-out set as the scores see it: labels, skin-type groups, and each seed's probabilities per arm."""

    labels: np.ndarray
    groups: np.ndarray
    probs: dict[str, list[np.ndarray]]  # arm → one (n, classes) array per seed


def _seed_mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if len(defined) == len(values) and defined else None


def _figure(per_seed: list[float | None], interval: Any, reason: str | None) -> dict[str, Any]:
    value = _seed_mean(per_seed) if reason is None else None
    if value is None and reason is None:
        reason = "undefined on this cell"
    return {
        "value": None if value is None else round(value, 4),
        "ci": None if value is None or interval is None else [round(interval.low, 4), round(interval.high, 4)],
        "per_seed": [None if v is None else round(v, 4) for v in per_seed],
        "reason": reason,
    }


def cell_figure(
    metric: Callable[[np.ndarray, np.ndarray], float | None], held: Held, arm: str, members: np.ndarray, *,
    reason: str | None, resamples: int, seed: int, strata: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One figure of one arm on one cell: seed-averaged value, percentile CI, per-seed values, or the reason for null."""
    runs = held.probs[arm]
    per_seed = [metric(p[members], held.labels[members]) for p in runs]
    interval = None
    if reason is None and _seed_mean(per_seed) is not None:
        interval = bootstrap(lambda idx: _seed_mean([metric(p[idx], held.labels[idx]) for p in runs]), members,
                             resamples=resamples, seed=seed, strata=strata)
    return _figure(per_seed, interval, reason)


def cell_delta(
    metric: Callable[[np.ndarray, np.ndarray], float | None], held: Held, arms: tuple[str, str], members: np.ndarray, *,
    reason: str | None, resamples: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """arm b − arm a on the same images (paired bootstrap): whether adding synthetic images changed the figure."""
    a, b = (held.probs[arm] for arm in arms)

    def diff(idx: np.ndarray) -> float | None:
        fa = _seed_mean([metric(p[idx], held.labels[idx]) for p in a])
        fb = _seed_mean([metric(p[idx], held.labels[idx]) for p in b])
        return None if fa is None or fb is None else fb - fa

    point = diff(members) if reason is None else None
    interval = bootstrap(diff, members, resamples=resamples, seed=seed) if point is not None else None
    return {
        "value": None if point is None else round(point, 4),
        "ci": None if interval is None or point is None else [round(interval.low, 4), round(interval.high, 4)],
        "reason": reason if reason is not None else (None if point is not None else "undefined on this cell"),
    }


def cell_reason(labels: np.ndarray, min_images: int) -> str | None:
    """Why a cell gets no figure: too few images, or a single class."""
    if labels.size < min_images:
        return f"{labels.size} image(s), fewer than --min-images {min_images}"
    if np.unique(labels).size < 2:
        return "a single diagnosis in this cell"
    return None


def equal_opportunity(held: Held, arm: str, classes: list[str], members: np.ndarray, *, min_positives: int, resamples: int, seed: int) -> dict[str, Any]:
    """Per class and macro-averaged equal-opportunity gap over the skin-type groups of the held-out set."""
    runs = held.probs[arm]
    groups = held.groups[members]
    per_class: dict[str, Any] = {}
    defined: list[int] = []
    raw: dict[int, list[float | None]] = {}
    for c, name in enumerate(classes):
        counts = {g: int(((held.labels[members] == c) & (groups == g)).sum()) for g in dict.fromkeys(groups.tolist())}
        eligible = [g for g, n in counts.items() if n >= min_positives]
        reason = None if len(eligible) >= 2 else f"fewer than 2 skin-type groups with ≥ {min_positives} held-out image(s) of this class (--min-positives)"
        per_seed = [eo_gap(p[members], held.labels[members], groups, c, min_positives) for p in runs]
        raw[c] = per_seed
        interval = None
        if reason is None and _seed_mean(per_seed) is not None:
            defined.append(c)
            interval = bootstrap(lambda idx, c=c: _seed_mean([eo_gap(p[idx], held.labels[idx], held.groups[idx], c, min_positives) for p in runs]),
                                 members, resamples=resamples, seed=seed, strata=groups)
        figure = _figure(per_seed, interval, reason)
        figure["positives_by_fst"] = counts
        figure["tpr_by_fst"] = [tprs(p[members], held.labels[members], groups, c) for p in runs]
        per_class[name] = figure

    def macro(idx: np.ndarray) -> float | None:
        gaps = [_seed_mean([eo_gap(p[idx], held.labels[idx], held.groups[idx], c, min_positives) for p in runs]) for c in defined]
        gaps = [g for g in gaps if g is not None]
        return float(np.mean(gaps)) if gaps else None

    macro_seed = [float(np.mean([raw[c][s] for c in defined])) if defined else None for s in range(len(runs))]
    interval = bootstrap(macro, members, resamples=resamples, seed=seed, strata=groups) if defined else None
    return {"per_class": per_class, "macro": _figure(macro_seed, interval, None if defined else "no class has a defined gap")}
