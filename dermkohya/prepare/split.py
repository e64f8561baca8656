"""The held-out split: stratified by diagnosis × skin type, whole patients/lesions/cases on one side."""

from __future__ import annotations

import math
import random

from dermkohya.importers import Record


def split_heldout(records: list[Record], fraction: float, seed: int) -> set[int]:
    """Indices of the held-out records. The unit is the group (patient, lesion or case; one image where
    the layout records none), so no subject is on both sides: round(fraction × groups) groups are
    shared out over the diagnosis × skin-type strata by largest remainder (ties in seeded random
    order), and every stratum keeps at least one group for training."""
    if fraction <= 0:
        return set()
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.group, []).append(i)
    strata: dict[tuple[str, str], list[list[int]]] = {}
    for members in groups.values():
        first = records[members[0]]
        strata.setdefault((first.diagnosis, first.fst), []).append(members)
    keys = sorted(strata)
    random.Random(seed).shuffle(keys)
    size = {k: len(strata[k]) for k in keys}
    quota = {k: min(math.floor(fraction * size[k]), size[k] - 1) for k in keys}
    spare = round(fraction * len(groups)) - sum(quota.values())
    for k in sorted(keys, key=lambda k: math.floor(fraction * size[k]) - fraction * size[k]):  # stable: ties stay shuffled
        if spare > 0 and quota[k] < size[k] - 1:
            quota[k] += 1
            spare -= 1
    heldout: set[int] = set()
    for k in keys:
        members = sorted(strata[k])
        random.Random(f"{seed}|{k[0]}|{k[1]}").shuffle(members)
        for group in members[: quota[k]]:
            heldout.update(group)
    return heldout
