"""What a metric is, and what every metric reads: the two image sets, their rows, and features computed once.

A metric (one file in this package, see `registry.py`) declares its name, its `--skip` name, the
networks whose weight files it needs, its report columns and a help line; `evaluate` checks the
weight files of every enabled metric before anything runs, calls `prepare` once and `row` for each
report row. Networks and their features are shared through `Evaluation`, so FID and KID read one
pass of Inception and three metrics one pass of CLIP.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from dermkohya.metrics import networks


@dataclasses.dataclass(frozen=True)
class LabelledImage:
    """One image of either set, with its class and (for synthetic ones) its prompt and rejected attempts."""

    path: Path
    diagnosis: str
    fst: str
    prompt: str = ""
    rejected: int = 0


def diagnosis_key(diagnosis: str) -> str:
    """Diagnoses match case- and punctuation-insensitively ("Basal cell carcinoma" = "basal_cell_carcinoma")."""
    return re.sub(r"[^a-z0-9]+", " ", diagnosis.casefold()).strip()


@dataclasses.dataclass
class Group:
    """One row of the report: all images, one skin type, one diagnosis, or one diagnosis × skin-type cell.
    `real` and `synthetic` index the two image lists."""

    kind: str
    diagnosis: str | None
    fst: str | None
    real: list[int]
    synthetic: list[int]

    @property
    def label(self) -> str:
        return {"overall": "all", "skin type": f"FST {self.fst}", "diagnosis": str(self.diagnosis)}.get(
            self.kind, f"{self.diagnosis} · FST {self.fst}"
        )


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the report's tables. `key` is the row's JSON key; `sd` and `baseline` are further
    keys shown in the same cell ("0.012 ± 0.003", "31.20 (29.80)")."""

    key: str
    header: str
    digits: int = 3
    sd: str | None = None
    baseline: str | None = None
    plot: str | None = None  # panel title in the per-skin-type bar plot; None: not plotted
    headline: bool = False  # printed by `dermkohya evaluate` after a run
    ci: str | None = None  # key of a [low, high] bootstrap interval shown after the value (per-skin-type rows)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.key, self.sd, self.baseline, self.ci) if k)


def _default_enabled() -> tuple[str, ...]:
    from dermkohya.metrics import registry

    return registry.skip_names()


@dataclasses.dataclass
class Options:
    """The knobs of the metrics; written into the report as they were used."""

    enabled: tuple[str, ...] = dataclasses.field(default_factory=_default_enabled)  # `--skip` names
    threshold: float = 0.95
    min_fid: int = 10
    kid_subsets: int = 100
    lpips_pairs: int = 200
    lpips_size: int = 256
    shown_pairs: int = 8
    seed: int = 0
    bootstrap: int = 200  # resamples of the per-skin-type intervals (LPIPS, CLIP score, ITA; dermkohya.bootstrap)
    bootstrap_fid: int = 50  # resamples for FID and KID (each one a Fréchet distance or KID over subsets)


Side = Literal["real", "synthetic"]


class Evaluation:
    """The inputs of one `dermkohya evaluate` and everything the metrics share: networks are loaded, and
    features computed, on first use only; `used` records each network's file and sha256 for the report."""

    def __init__(
        self,
        real: list[LabelledImage],
        synthetic: list[LabelledImage],
        train: list[Path],
        *,
        weights: networks.Weights,
        options: Options,
        device: str,
    ) -> None:
        self.real, self.synthetic, self.train = real, synthetic, train
        self.weights, self.options, self.device = weights, options, device
        self.rng = np.random.default_rng(options.seed)  # LPIPS pair sampling, drawn in row order
        self.used: dict[str, dict[str, str]] = {}
        self.sections: dict[str, Any] = {}  # whole-set results beside the rows, e.g. "memorisation"
        self._once: dict[str, Any] = {}

    def enabled(self, skip: str | None) -> bool:
        return skip is None or skip in self.options.enabled

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._once:
            self._once[key] = compute()
        return self._once[key]

    def _record(self, network: str, path: Path) -> None:
        from dermkohya import basemodel

        self.used[network] = {"path": str(path), "sha256": basemodel.sha256_path(path)}

    def paths(self, side: Side) -> list[Path]:
        return [image.path for image in (self.real if side == "real" else self.synthetic)]

    def inception(self) -> tuple[np.ndarray, np.ndarray]:
        """Inception pool features of (real, synthetic); the network is dropped once both are computed."""

        def compute() -> tuple[np.ndarray, np.ndarray]:
            net = networks.load_inception(self.weights.inception, self.device)
            features = (networks.inception_features(net, self.paths("real")), networks.inception_features(net, self.paths("synthetic")))
            self._record("inception", networks.inception_file(self.weights.inception).path)
            return features

        return self.once("inception", compute)

    def lpips(self) -> networks.LPIPSDistance:
        def load() -> networks.LPIPSDistance:
            net = networks.load_lpips(self.weights.lpips, self.device)
            self._record("lpips", networks.lpips_files(self.weights.lpips)[0].path)
            return net

        return self.once("lpips", load)

    def clip(self) -> networks.CLIPEmbedder:
        def load() -> networks.CLIPEmbedder:
            model = networks.load_clip(self.weights.clip, self.device)
            self._record("clip", self.weights.clip)
            return model

        return self.once("clip", load)

    def clip_images(self, side: Side) -> np.ndarray:
        return self.once(f"clip:{side}", lambda: networks.clip_image_features(self.clip(), self.paths(side)))

    def clip_prompts(self) -> np.ndarray:
        """The CLIP text embedding of each synthetic image's prompt (each distinct prompt embedded once)."""

        def compute() -> np.ndarray:
            prompts = sorted({s.prompt for s in self.synthetic})
            embeds = dict(zip(prompts, self.clip().texts(prompts)))
            return np.stack([embeds[s.prompt] for s in self.synthetic])

        return self.once("clip:prompts", compute)


class Metric:
    """One metric of the report. Subclass it in a new file of this package and set `METRIC = YourMetric()`
    there; the registry finds it, `--skip` and the report's tables follow from these declarations."""

    name: ClassVar[str]
    skip: ClassVar[str | None]  # the `--skip` name (several metrics may share one); None: always computed
    help: ClassVar[str]  # one line, for the CLI's help and the docs
    columns: ClassVar[tuple[Column, ...]]
    position: ClassVar[int]  # where its columns go in the tables, left to right
    networks: ClassVar[tuple[str, ...]] = ()  # "inception", "lpips", "clip": their files are checked first
    needs_train: ClassVar[bool] = False  # reads the training images (the memorisation check)
    reading: ClassVar[str] = ""  # a bullet of the report's "How to read this"; {option} fields are filled in

    def notes(self, ev: Evaluation) -> list[str]:
        """Why the metric could not be computed as asked (shown in the report), before anything runs."""
        return []

    def prepare(self, ev: Evaluation) -> None:
        """Whole-set work, once, before the rows (load networks, compute features, fill `ev.sections`)."""

    def row(self, ev: Evaluation, group: Group) -> dict[str, Any]:
        """The values of this metric's column keys for one row (missing keys stay None)."""
        raise NotImplementedError

    def files(self, ev: Evaluation, folder: Path) -> dict[str, Path]:
        """Plots or tables of its own, written into the report's folder after the rows (name → path)."""
        return {}


def mean(values: list[float] | np.ndarray) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
