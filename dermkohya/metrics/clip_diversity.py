"""Intra-class CLIP diversity: the mean pairwise cosine distance within each diagnosis × skin-type class,
for the synthetic images and (in brackets) the real ones; a collapsed generator scores near zero."""

from __future__ import annotations

from typing import Any

import numpy as np

from dermkohya.metrics import maths
from dermkohya.metrics.base import Column, Evaluation, Group, LabelledImage, Metric, diagnosis_key


class CLIPDiversity(Metric):
    name = "clip_diversity"
    skip = "clip"
    help = "CLIP diversity, the mean pairwise cosine distance within each diagnosis × skin-type class"
    columns = (Column("clip_diversity", "CLIP diversity ↑ (real)", baseline="clip_diversity_real", plot="CLIP diversity ↑"),)
    position = 50
    networks = ("clip",)

    def prepare(self, ev: Evaluation) -> None:
        ev.clip_images("synthetic")
        ev.clip_images("real")

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        return {
            "clip_diversity": cell_diversity(ev.clip_images("synthetic"), ev.synthetic, group.synthetic),
            "clip_diversity_real": cell_diversity(ev.clip_images("real"), ev.real, group.real),
        }


def cell_diversity(embeds: np.ndarray, images: list[LabelledImage], members: list[int]) -> float | None:
    """A row's diversity: each class's mean pairwise cosine distance, averaged weighted by class size
    (a row spanning several classes must not count the distance between classes as diversity)."""
    by_cell: dict[tuple[str, str], list[int]] = {}
    for i in members:
        by_cell.setdefault((diagnosis_key(images[i].diagnosis), images[i].fst), []).append(i)
    values, weights = [], []
    for idx in by_cell.values():
        if (value := maths.mean_pairwise_cosine_distance(embeds[idx])) is not None:
            values.append(value)
            weights.append(len(idx))
    return float(np.average(values, weights=weights)) if values else None


METRIC = CLIPDiversity()
