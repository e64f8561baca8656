"""KID: the unbiased polynomial-kernel MMD² on the same Inception features as FID, the number to read
for small diagnosis × skin-type cells. `--skip fid` leaves it out too (it needs the same network)."""

from __future__ import annotations

from typing import Any

from dermkohya.bootstrap import bootstrap_two_sample
from dermkohya.metrics import maths
from dermkohya.metrics.base import Column, Evaluation, Group, Metric


class KID(Metric):
    name = "kid"
    skip = "fid"
    help = "KID (mean ± sd over random subsets) on the same Inception features: unbiased, for small cells"
    columns = (Column("kid", "KID ↓ (± sd)", digits=4, sd="kid_std", plot="KID ↓", headline=True, ci="kid_ci"),)
    position = 20
    networks = ("inception",)

    def prepare(self, ev: Evaluation) -> None:
        ev.inception()

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        if len(group.real) < 2 or len(group.synthetic) < 2:
            return {}
        real, synthetic = ev.inception()
        mean, sd = maths.kid(real[group.real], synthetic[group.synthetic], subsets=ev.options.kid_subsets, seed=ev.options.seed)
        values: dict[str, Any] = {"kid": mean, "kid_std": sd}
        if group.kind == "skin type":
            subsets = max(5, ev.options.kid_subsets // 10)  # per resample: the interval is about the images, not the subsets
            interval = bootstrap_two_sample(lambda a, b: maths.kid(real[a], synthetic[b], subsets=subsets, seed=ev.options.seed)[0],
                                            group.real, group.synthetic, resamples=ev.options.bootstrap_fid, seed=ev.options.seed)
            values["kid_ci"] = interval.as_list() if interval else None
        return values


METRIC = KID()
