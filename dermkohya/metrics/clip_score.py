"""CLIP score: how well each synthetic image matches its prompt, beside the real images of the same cell
scored against that same prompt (the baseline a synthetic set should approach)."""

from __future__ import annotations

from typing import Any

from dermkohya.bootstrap import mean_interval
from dermkohya.metrics import maths
from dermkohya.metrics.base import Column, Evaluation, Group, Metric, diagnosis_key, mean


class CLIPScore(Metric):
    name = "clip_score"
    skip = "clip"
    help = "CLIP score, 100·max(cos, 0) of each image and its prompt; real images against the same prompt as baseline"
    columns = (Column("clip_score", "CLIP score ↑ (real)", digits=2, baseline="clip_score_real", plot="CLIP score ↑", headline=True, ci="clip_score_ci"),)
    position = 40
    networks = ("clip",)
    reading = (
        "CLIP score is 100·max(cos, 0) between an image and its prompt; the value in brackets scores the real images against\n"
        "  the same prompt, the baseline a synthetic set should approach. Diversity is the mean pairwise CLIP cosine distance\n"
        "  within each diagnosis × skin-type class; LPIPS diversity the mean LPIPS between random synthetic pairs."
    )

    def prepare(self, ev: Evaluation) -> None:
        ev.clip_images("synthetic")
        ev.clip_images("real")
        ev.clip_prompts()

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        synthetic = ev.clip_images("synthetic")
        per_image = maths.clip_scores(synthetic[group.synthetic], ev.clip_prompts()[group.synthetic])
        values: dict[str, Any] = {"clip_score": mean(per_image.tolist())}
        if group.kind == "skin type":
            interval = mean_interval(per_image, resamples=ev.options.bootstrap, seed=ev.options.seed)
            values["clip_score_ci"] = interval.as_list() if interval else None
        cell_prompt = {(diagnosis_key(s.diagnosis), s.fst): s.prompt for s in ev.synthetic}
        prompts = {i: cell_prompt.get((diagnosis_key(ev.real[i].diagnosis), ev.real[i].fst)) for i in group.real}
        scored = [i for i in group.real if prompts[i] is not None]
        if scored:
            texts = ev.clip().texts([prompts[i] for i in scored])
            values["clip_score_real"] = mean(maths.clip_scores(ev.clip_images("real")[scored], texts).tolist())
        return values


METRIC = CLIPScore()
