"""Memorisation: each synthetic image's nearest training image by CLIP cosine similarity, flagged at or
above `--threshold`. The flagged pairs and the closest few are listed (with their LPIPS distance when
LPIPS is enabled) in the report's `memorisation` section; each row counts its flagged images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dermkohya.metrics import maths, networks
from dermkohya.metrics.base import Column, Evaluation, Group, Metric


class Memorisation(Metric):
    name = "memorisation"
    skip = "memorisation"
    help = "memorisation: synthetic images whose nearest training image (CLIP cosine) reaches --threshold"
    columns = (Column("memorised", "memorised"),)
    position = 70
    networks = ("clip",)
    needs_train = True

    def notes(self, ev: Evaluation) -> list[str]:
        if ev.train:
            return []
        return ["memorisation not checked: no training images (give --train, or --real from a prepared heldout/ folder)"]

    def prepare(self, ev: Evaluation) -> None:
        if ev.train:
            lp = ev.lpips() if ev.enabled("lpips") else None
            ev.sections["memorisation"] = nearest_training(ev.clip(), lp, ev, ev.clip_images("synthetic"))

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        memo = ev.sections.get("memorisation")
        if memo is None:
            return {}
        flagged = {p["synthetic_index"] for p in memo["pairs_flagged"]}
        return {"memorised": sum(1 for i in group.synthetic if i in flagged)}


def nearest_training(clip: networks.CLIPEmbedder, lp: networks.LPIPSDistance | None, ev: Evaluation, clip_syn: np.ndarray) -> dict[str, Any]:
    options, syn, train = ev.options, ev.synthetic, ev.train
    best, sims = maths.nearest_neighbours(clip_syn, networks.clip_image_features(clip, train))
    order = np.argsort(-sims)
    flagged = [int(i) for i in order if sims[i] >= options.threshold]
    shown = sorted(set(flagged[: options.shown_pairs]) | {int(i) for i in order[: options.shown_pairs]}, key=lambda i: -sims[i])

    def pair(i: int) -> dict[str, Any]:
        return {"synthetic_index": i, "synthetic": str(syn[i].path), "train": str(train[best[i]]), "similarity": float(sims[i])}

    pairs_shown = [pair(i) for i in shown]
    if lp is not None and pairs_shown:
        distances = networks.lpips_pairs(lp, [(Path(p["synthetic"]), Path(p["train"])) for p in pairs_shown], options.lpips_size)
        for p, d in zip(pairs_shown, distances):
            p["lpips"] = float(d)
    return {
        "threshold": options.threshold,
        "train_images": len(train),
        "flagged": len(flagged),
        "max_similarity": float(sims.max()),
        "mean_similarity": float(sims.mean()),
        "pairs_flagged": [pair(i) for i in flagged],
        "pairs_shown": pairs_shown,
    }


METRIC = Memorisation()
