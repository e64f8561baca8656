"""FID on pytorch-fid's Inception-v3 pool features: the familiar number, biased upwards for small sets."""

from __future__ import annotations

from typing import Any

from dermkohya.bootstrap import bootstrap_two_sample
from dermkohya.metrics import maths
from dermkohya.metrics.base import Column, Evaluation, Group, Metric


class FID(Metric):
    name = "fid"
    skip = "fid"
    help = "FID on pytorch-fid's Inception-v3 features, where both sides have at least 10 images"
    columns = (Column("fid", "FID ↓", digits=2, plot="FID ↓", headline=True, ci="fid_ci"),)
    position = 10
    networks = ("inception",)
    reading = (
        "FID is biased upwards below a few thousand images per side and is only given where both sides have at least\n"
        "  {min_fid}; KID (unbiased, can be slightly negative) is the number to compare for small cells."
    )

    def prepare(self, ev: Evaluation) -> None:
        ev.inception()

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        if min(len(group.real), len(group.synthetic)) < max(2, ev.options.min_fid):
            return {}
        real, synthetic = ev.inception()
        values: dict[str, Any] = {"fid": maths.fid(real[group.real], synthetic[group.synthetic])}
        if group.kind == "skin type":
            interval = bootstrap_two_sample(lambda a, b: maths.fid(real[a], synthetic[b]), group.real, group.synthetic,
                                            resamples=ev.options.bootstrap_fid, seed=ev.options.seed)
            values["fid_ci"] = interval.as_list() if interval else None
        return values


METRIC = FID()
