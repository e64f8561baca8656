"""The share of generated candidates the quality filter rejected, read from `index.csv` (no network)."""

from __future__ import annotations

from typing import Any

from dermkohya.metrics.base import Column, Evaluation, Group, Metric


class Rejection(Metric):
    name = "rejection"
    skip = None
    help = "the share of candidates the generation filter rejected (from index.csv; always reported)"
    columns = (Column("rejection_rate", "rejected", plot="rejected ↓"),)
    position = 60
    reading = '"rejected" is the share of generated candidates the quality filter rejected (regenerated with the next seed).'

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        attempts = sum(1 + ev.synthetic[i].rejected for i in group.synthetic)
        return {"rejection_rate": round(1 - len(group.synthetic) / attempts, 4) if attempts else None}


METRIC = Rejection()
