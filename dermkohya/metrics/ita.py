"""Skin-tone fidelity: the ITA° of each image's healthy skin (CIELAB, no network; `dermkohya.skin_tone`).

Each row gets the median ITA° of its synthetic images beside that of its real ones, and the share of its
synthetic images within ±1 ITA class of the skin type they were asked for. The report's `skin_tone`
section holds the per-requested-type figures with bootstrap CIs for both sets and the drift flags;
the box plot and every image's measurement (a CSV) go beside the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dermkohya import skin_tone
from dermkohya.metrics.base import Column, Evaluation, Group, Metric


class SkinTone(Metric):
    name = "skin_tone"
    skip = "skin_tone"
    help = "ITA° of healthy skin (no network): median per row (real as baseline), share within ±1 class of the requested type, drift"
    columns = (
        Column("ita_median", "ITA° (real)", digits=1, baseline="ita_median_real", plot="median ITA°"),
        Column("ita_agreement", "ITA ±1 class", digits=2),
    )
    position = 55
    reading = (
        "ITA° = arctan((L* − 50)/b*) on the median CIELAB of healthy skin (hair, highlights and the lesion masked): > 55 very light (I),\n"
        "  41–55 light (II), 28–41 intermediate (III), 10–28 tan (IV), −30–10 brown (V), < −30 dark (VI). \"ITA ±1 class\" is the share of\n"
        "  synthetic images within one class of the requested type; a skin type drifts when its synthetic median is > 10° lighter\n"
        "  than the real one. ITA is colour, Fitzpatrick is sun reaction: they agree only roughly, and lighting moves ITA."
    )

    def tones(self, ev: Evaluation) -> tuple[list[skin_tone.Tone], list[skin_tone.Tone]]:
        real = ev.once("ita:real", lambda: skin_tone.measure_all((im.path, im.fst) for im in ev.real))
        synthetic = ev.once("ita:synthetic", lambda: skin_tone.measure_all((im.path, im.fst) for im in ev.synthetic))
        return real, synthetic

    def prepare(self, ev: Evaluation) -> None:
        real, synthetic = self.tones(ev)
        ev.sections["skin_tone"] = skin_tone.report(real, synthetic, resamples=ev.options.bootstrap, seed=ev.options.seed)

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        real, synthetic = self.tones(ev)

        def median(tones: list[skin_tone.Tone], members: list[int]) -> float | None:
            values = [tones[i].ita for i in members if tones[i].ita is not None]
            return round(float(np.median(values)), 3) if values else None

        hits = [synthetic[i].agrees for i in group.synthetic if synthetic[i].agrees is not None]
        return {
            "ita_median": median(synthetic, group.synthetic),
            "ita_median_real": median(real, group.real),
            "ita_agreement": round(float(np.mean(hits)), 4) if hits else None,
        }

    def files(self, ev: Evaluation, folder: Path) -> dict[str, Path]:
        real, synthetic = self.tones(ev)
        folder.mkdir(parents=True, exist_ok=True)
        skin_tone.write_tones_csv(folder / "skin_tone.csv", real, synthetic)
        return {"skin_tone": skin_tone.plot(folder / "skin_tone.png", real, synthetic)}


METRIC = SkinTone()
