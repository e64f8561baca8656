"""The three image sets of a utility study and how the synthetic images are mixed into the real training set.

Why per-skin-type shares: synthetic images are meant to fill the skin types real data lacks (the
FairSkin plan: 20 % synthetic for I–II, 80 % for VI), so the mix is set per type as the *fraction of
that type's training images that are synthetic*: with R real images of a type and share s, s/(1 − s)·R
synthetic images of that type are added (fewer when the set has fewer; the achieved share is reported).
The draw is fixed by the study's seed, so every training seed of arm (b) sees the same images.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np

from dermkohya.errors import DermkohyaError
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN

# The FairSkin plan's mix (seed 002): scarce dark skin types get the most synthetic images.
DEFAULT_SHARES: dict[str, float] = {"I": 0.2, "II": 0.2, "III": 0.3, "IV": 0.5, "V": 0.7, "VI": 0.8}


@dataclasses.dataclass(frozen=True)
class Item:
    """One image with its class index and skin type; `synthetic` marks a generated image."""

    path: Path
    label: int
    fst: str
    synthetic: bool = False


@dataclasses.dataclass
class Sets:
    classes: list[str]
    train: list[Item]
    heldout: list[Item]
    synthetic: list[Item]  # every usable synthetic image (matched diagnosis, a skin type)
    notes: list[str]


def key(diagnosis: str) -> str:
    """Diagnoses match case- and punctuation-insensitively, as in `evaluate`."""
    return re.sub(r"[^a-z0-9]+", " ", diagnosis.casefold()).strip()


def fst_order(values: set[str] | list[str]) -> list[str]:
    return [f for f in (*FST_TYPES, *FST_GROUPS, UNKNOWN) if f in set(values)]


def parse_shares(text: str | None) -> dict[str, float]:
    """"I=0.2,II=0.2,…,VI=0.8" → {type: share}; types left out get 0 (no synthetic images). None: the default."""
    from dermkohya.skin import parse_fst

    if text is None:
        return dict(DEFAULT_SHARES)
    shares: dict[str, float] = {}
    problems = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        fst = parse_fst(name.strip())
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if fst not in FST_TYPES:
            problems.append(f"{name.strip()!r} is not a skin type I–VI")
        elif not 0.0 <= share < 1.0:
            problems.append(f"{fst}={value.strip()!r}: a share is a fraction in [0, 1) of that type's training images")
        else:
            shares[fst] = share
    if problems:
        raise DermkohyaError(f"--synthetic-share {text!r}: " + "; ".join(problems) + " (e.g. I=0.2,II=0.2,III=0.3,IV=0.5,V=0.7,VI=0.8)")
    return shares


def read_sets(train: Path, heldout: Path, synthetic: Path) -> Sets:
    """The real training and held-out images (metadata CSVs) and the generated set (index.csv), labelled by
    the training set's diagnoses; held-out or synthetic images of other diagnoses are left out, with a note."""
    from dermkohya.evaluate import read_real, read_synthetic

    real_train, real_heldout, generated = read_real(train, "training"), read_real(heldout), read_synthetic(synthetic)
    names: dict[str, str] = {}
    for image in real_train:
        names.setdefault(key(image.diagnosis), image.diagnosis)
    if len(names) < 2:
        raise DermkohyaError(f"{train}: the training set has {len(names)} diagnosis; a classifier needs at least 2")
    order = sorted(names)
    index = {k: i for i, k in enumerate(order)}
    notes = []

    def items(images: list, synthetic_set: bool, what: str) -> list[Item]:
        kept = [Item(im.path, index[key(im.diagnosis)], im.fst, synthetic_set) for im in images if key(im.diagnosis) in index]
        if dropped := Counter(im.diagnosis for im in images if key(im.diagnosis) not in index):
            notes.append(f"{what}: {sum(dropped.values())} image(s) of diagnoses not in the training set left out ({', '.join(sorted(dropped))})")
        return kept

    sets = Sets([names[k] for k in order], items(real_train, False, "training"), items(real_heldout, False, "held-out"),
                items(generated, True, "synthetic"), notes)
    if not sets.heldout:
        raise DermkohyaError(f"{heldout}: no held-out image of the training set's diagnoses ({', '.join(sets.classes)})")
    return sets


def mix(sets: Sets, shares: dict[str, float], seed: int) -> tuple[list[Item], dict[str, dict[str, float | int]]]:
    """Synthetic images to add per skin type, and per type: real, wanted, added, achieved share."""
    rng = np.random.default_rng(seed)
    real_counts = Counter(item.fst for item in sets.train)
    by_fst: dict[str, list[Item]] = {}
    for item in sets.synthetic:
        by_fst.setdefault(item.fst, []).append(item)
    added: list[Item] = []
    table: dict[str, dict[str, float | int]] = {}
    for fst in fst_order(set(real_counts) | set(by_fst) | set(shares)):
        share = shares.get(fst, 0.0)
        real = real_counts.get(fst, 0)
        wanted = int(round(share / (1.0 - share) * real))
        pool = by_fst.get(fst, [])
        take = min(wanted, len(pool))
        picked = [pool[i] for i in sorted(rng.permutation(len(pool))[:take])] if take else []
        added += picked
        table[fst] = {"real": real, "share_requested": share, "synthetic_wanted": wanted, "synthetic_available": len(pool),
                      "synthetic_added": take, "share_achieved": round(take / (real + take), 4) if real + take else 0.0}
        if take < wanted:
            sets.notes.append(f"FST {fst}: {wanted} synthetic image(s) wanted for a share of {share:.0%}, only {len(pool)} in the set")
        if share > 0 and real == 0:
            sets.notes.append(f"FST {fst}: no real training images, so a share of it is undefined; no synthetic images added")
    return added, table
