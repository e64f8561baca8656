"""Balancing: target shares of effective samples → integer repeats per (diagnosis, skin type) subset.

FairSkin-style training needs every Fitzpatrick skin type seen about equally often, while real datasets
are mostly FST I–III. kohya expresses "seen more often" as a subset's repeats, so a target balance
becomes integer repeats per folder, capped to bound memorisation of the few FST V–VI images, and every
target the data cannot reach is reported rather than silently missed. The search itself is exact
(solver.py); this module decides what is balanced against what, and explains the outcome.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from dermkohya.prepare import solver
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN

Cell = tuple[str, str]  # (diagnosis, skin type): one kohya subset


@dataclass
class BalancePlan:
    """Repeats per (diagnosis, skin type) cell and how close the effective shares land to the target."""

    repeats: dict[Cell, int]
    target: dict[str, float]
    achieved: dict[str, float]
    within_tolerance: bool
    unreachable: list[str]
    notes: list[str]


def fold(fst: str, grouped: bool) -> str:
    """A single type's group ("II" → "I-II") where the data is balanced over groups."""
    return FST_GROUPS[FST_TYPES.index(fst) // 2] if grouped and fst in FST_TYPES else fst


def plan_balance(counts: dict[Cell, int], policy: str, *, shares: dict[str, float] | None = None,
                 max_repeats: int = 20, tolerance: float = 0.05) -> BalancePlan:
    """Integer repeats (1…max_repeats) that bring each balance category's share of effective samples
    (images × repeats) within ±tolerance (relative) of its target.

    Categories are the skin types (`fst`, `shares`) or diagnosis × skin type (`fst_x_diagnosis`). Data
    recorded in groups (DDI) is balanced over the groups; single types are folded into their group then,
    never the other way. Unknown skin types are not balanced (1 repeat). The search over every subset's
    repeats is exact (see solver.py): a target is reported unreachable only when no assignment lands
    within the tolerance. Then a category short of its target even with every subset at the cap stays
    there while the rest are balanced among themselves; targets are renormalised over the categories
    that have images, and every category that misses its target says why in `unreachable`.
    """
    cells = {cell: n for cell, n in counts.items() if n > 0}
    repeats = {cell: 1 for cell in cells}
    known = {cell: n for cell, n in cells.items() if cell[1] != UNKNOWN}
    notes = []
    unknown_images = sum(n for cell, n in cells.items() if cell[1] == UNKNOWN)
    if unknown_images and policy != "none":
        notes.append(f"{unknown_images} image(s) of unknown skin type train at 1 repeat outside the balance "
                     "(balance.unknown_fst = \"drop\" leaves them out)")
    grouped = any(fst in FST_GROUPS for _, fst in known) or bool(shares and set(shares) <= set(FST_GROUPS))

    def category(cell: Cell) -> str:
        fst = fold(cell[1], grouped)
        return f"{cell[0]} × {fst}" if policy == "fst_x_diagnosis" else fst

    if policy == "none":
        effective: Counter[str] = Counter()
        for cell, n in known.items():
            effective[category(cell)] += n
        return BalancePlan(repeats, {}, _shares(dict(effective)), True, [], notes)
    if not known:
        return BalancePlan(repeats, {}, {}, False, ["no image has a known skin type: there is nothing to balance"], notes)

    target = _targets(policy, known, shares, grouped)
    members: dict[str, list[Cell]] = {c: [] for c in target}
    for cell in sorted(known):
        members[category(cell)].append(cell)
    present = [c for c in target if members[c]]
    unreachable = [f"{c}: no training images, so its target share ({target[c]:.1%}) cannot be reached; "
                   "the others are balanced among themselves" for c in target if not members[c]]
    norm = sum(target[c] for c in present)
    goal = {c: target[c] / norm for c in present}

    chosen, capped = _search(present, members, known, goal, max_repeats, tolerance)
    repeats.update(chosen)
    images = {c: sum(known[cell] for cell in members[c]) for c in present}
    effective = Counter({c: sum(known[cell] * repeats[cell] for cell in members[c]) for c in present})
    achieved = _shares(dict(effective))
    missed = {c for c in present if abs(achieved[c] / goal[c] - 1) > tolerance + solver.EPS}
    capped = [c for c in present if c in capped and c in missed]
    rest = [c for c in present if c not in capped]
    rest_effective = sum(effective[c] for c in rest)
    for c in capped:  # the repeats that would match the uncapped categories as they are
        needed = math.ceil(goal[c] * rest_effective / (sum(goal[k] for k in rest) * images[c]))
        unreachable.append(f"{c}: {images[c]} image(s) × {max_repeats} repeats (balance.max_repeats) give "
                           f"{achieved[c]:.1%} of effective samples vs a target of {goal[c]:.1%}; it needs about "
                           f"{needed} repeats: add images of it, or raise max_repeats (more repetition of the same images)")
    rest_achieved, rest_goal = _shares({c: achieved[c] for c in rest}), _shares({c: goal[c] for c in rest})
    rest_balanced = all(abs(rest_achieved[c] / rest_goal[c] - 1) <= tolerance + solver.EPS for c in rest)
    for c in rest:
        if c in missed and not (capped and rest_balanced):  # else the cap explains it
            steps = sorted({repeats[cell] for cell in members[c]})
            unreachable.append(f"{c}: {images[c]} image(s) at {'/'.join(map(str, steps))} repeat(s) give {achieved[c]:.1%} "
                               f"of effective samples vs a target of {goal[c]:.1%}; no integer repeats (1 to "
                               f"{max_repeats}) of the subsets bring every share within ±{tolerance:.0%}")
    if capped and rest_balanced:
        notes.append(f"{', '.join(capped)} capped at {max_repeats} repeats; {', '.join(rest)} are balanced among "
                     f"themselves within ±{tolerance:.0%}")
    within = not missed and len(present) == len(target)
    return BalancePlan(repeats, goal, achieved, within, unreachable, notes)


def _targets(policy: str, known: dict[Cell, int], shares: dict[str, float] | None, grouped: bool) -> dict[str, float]:
    level = FST_GROUPS if grouped else FST_TYPES
    if policy == "fst_x_diagnosis":
        categories = [f"{d} × {f}" for d in sorted({d for d, _ in known}) for f in level]
        return {c: 1 / len(categories) for c in categories}
    if policy == "shares":
        assert shares is not None
        folded: Counter[str] = Counter()
        for key, value in shares.items():
            folded[fold(key, grouped)] += value
        return {c: folded[c] / sum(folded.values()) for c in level}
    return {c: 1 / len(level) for c in level}


def _search(present: list[str], members: dict[str, list[Cell]], known: dict[Cell, int], goal: dict[str, float],
            cap: int, tolerance: float) -> tuple[dict[Cell, int], list[str]]:
    """Repeats per cell, and the categories fixed at the cap.

    A category's subsets take one repeat or two neighbouring ones where that lands within the tolerance
    (its diagnoses keep their proportions), else any repeats that do.
    When no assignment is within the tolerance, the categories that keep up least (the lowest
    cap × images / target) are fixed at the cap one by one until the others can be balanced among
    themselves (at their smallest total, which leaves the capped ones the largest share), rather than
    skewing the others to make up for them. Where that does not explain the miss (a capped one would
    then be above its target, or none needs capping), the least bad assignment of all is searched."""

    def solve(active: list[str], within_only: bool) -> solver.Solution | None:
        weights = [goal[c] for c in active]
        sizes = [[known[cell] for cell in members[c]] for c in active]
        goals = [w / sum(weights) for w in weights]
        if not within_only:
            return solver.solve(sizes, goals, cap, tolerance)
        return (solver.solve_within(sizes, goals, cap, tolerance, even=True)
                or solver.solve_within(sizes, goals, cap, tolerance))

    def cells(active: list[str], found: solver.Solution) -> dict[Cell, int]:
        return {cell: r for c, reps in zip(active, found.repeats) for cell, r in zip(members[c], reps)}

    found = solve(present, True)
    if found is not None:
        return cells(present, found), []
    images = {c: sum(known[cell] for cell in members[c]) for c in present}
    order = sorted(present, key=lambda c: (cap * images[c] / goal[c], present.index(c)))
    low, high = 0, len(present) - 1  # fixing the m weakest: rest infeasible at low, feasible at high
    found = solve(order[high:], True)
    while high - low > 1:  # fixing more never makes the rest harder to balance: bisect on m
        mid = (low + high) // 2
        attempt = solve(order[mid:], True)
        if attempt is None:
            low = mid
        else:
            high, found = mid, attempt
    fixed, rest = order[:high], order[high:]
    assert found is not None
    total = found.total + sum(cap * images[c] for c in fixed)
    if all(cap * images[c] / total < goal[c] * (1 - tolerance) for c in fixed):
        chosen = cells(rest, found)
        chosen.update({cell: cap for c in fixed for cell in members[c]})
        return chosen, fixed
    return cells(present, solve(present, False)), []  # type: ignore[arg-type]


def _shares(effective: dict[str, float]) -> dict[str, float]:
    total = sum(effective.values()) or 1
    return {k: v / total for k, v in effective.items()}
