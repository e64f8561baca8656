"""The evaluation report: `reports/<plan>.json` (a typed, versioned record), its markdown and its plots.

The JSON is what other stages read (`collect` looks up which LoRAs a report evaluated), so it is written
and read only through `EvaluationReport`. The markdown (`evaluation_report.md.j2`) and the per-skin-type
bar plot take their columns from the metric registry; the sample grid and the memorisation pairs are
drawn from the images themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dermkohya import skin
from dermkohya.files import write_atomic
from dermkohya.metrics import registry
from dermkohya.metrics.base import LabelledImage
from dermkohya.metrics.networks import load_rgb
from dermkohya.records import Record

REPORT_TEMPLATE = "evaluation_report.md.j2"


class EvaluationReport(Record):
    """Every number of one evaluation, its inputs, and the weight files' sha256 (`reports/<plan>.json`)."""

    KIND = "evaluation"
    REMEDY = "re-run `dermkohya evaluate`"

    plan: str
    synthetic: str
    real: str
    train: str | None
    created: str
    dermkohya_version: str
    base_model: str | None
    loras: list[dict[str, Any]]
    metrics: list[str]  # the `--skip` names that were computed
    weights: dict[str, dict[str, str]]  # network → {path, sha256}
    options: dict[str, Any]
    device: str
    rows: list[dict[str, Any]]  # group, label, diagnosis, fst, n_real, n_synthetic, then every metric key
    memorisation: dict[str, Any] | None
    skin_tone: dict[str, Any] | None = None  # ITA° per requested skin type, synthetic and real, and drift (metrics/ita.py)
    plots: dict[str, str]  # name → path relative to the report's folder
    notes: list[str]

    def write_files(self, out_dir: Path) -> tuple[Path, Path]:
        """`<out_dir>/<plan>.json` and `.md`, each replaced in one rename."""
        json_path = self.write(out_dir / f"{self.plan}.json")
        md_path = out_dir / f"{self.plan}.md"
        write_atomic(md_path, render_markdown(self))
        return json_path, md_path

    def headline(self) -> dict[str, float]:
        """The overall row's headline numbers (FID, KID, LPIPS to real, CLIP score) that were computed."""
        overall = self.rows[0]
        return {c.key: overall[c.key] for c in registry.columns() if c.headline and overall.get(c.key) is not None}


# --- markdown ----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: EvaluationReport) -> str:
    from dermkohya.templating import file_environment

    metrics = registry.all_metrics()
    env = file_environment(trim_blocks=True, fmt=_fmt)
    return env.get_template(REPORT_TEMPLATE).render(
        report=report,
        columns=registry.columns(),
        readings=[m.reading.format(**report.options) for m in metrics if m.reading],
        smoke=str(report.base_model or "").startswith("random:"),
    )


# --- plots -------------------------------------------------------------------------------------------------


def write_plots(
    folder: Path, rows: list[dict[str, Any]], syn: list[LabelledImage], memo: dict[str, Any] | None
) -> dict[str, Path]:
    """fst_metrics.png (a bar per skin type for each plotted column), grid.png (one synthetic image per
    diagnosis × skin type) and memorisation.png (the closest synthetic/training pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if path := _fst_bars(plt, folder, rows):
        plots["fst_metrics"] = path
    plots["grid"] = _sample_grid(plt, folder, syn)
    if memo and memo["pairs_shown"]:
        plots["memorisation"] = _memorisation_pairs(plt, folder, memo)
    return plots


def _fst_bars(plt: Any, folder: Path, rows: list[dict[str, Any]]) -> Path | None:
    fst_rows = [r for r in rows if r["group"] == "skin type"]
    panels = [c for c in registry.columns() if c.plot and any(r.get(c.key) is not None for r in fst_rows)]
    if not (fst_rows and panels):
        return None

    def values(key: str) -> list[float]:
        return [r.get(key) if r.get(key) is not None else np.nan for r in fst_rows]

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    labels = [r["fst"] for r in fst_rows]
    for ax, column in zip(axes[0], panels):
        ax.bar(labels, values(column.key), color="#5b7fa6")
        if column.baseline:
            ax.plot(labels, values(column.baseline), "o", color="#c0392b", label="real")
            ax.legend(fontsize=7)
        ax.set_title(column.plot, fontsize=9)
        ax.set_xlabel("Fitzpatrick type", fontsize=8)
    return _save(plt, fig, folder / "fst_metrics.png")


def _sample_grid(plt: Any, folder: Path, syn: list[LabelledImage]) -> Path:
    diagnoses = list(dict.fromkeys(s.diagnosis for s in syn))
    fsts = [f for f in (*skin.FST_TYPES, *skin.FST_GROUPS) if any(s.fst == f for s in syn)]
    fig, axes = plt.subplots(len(diagnoses), len(fsts), figsize=(1.4 * len(fsts) + 1.5, 1.4 * len(diagnoses) + 0.4), squeeze=False)
    for r, diagnosis in enumerate(diagnoses):
        for c, fst in enumerate(fsts):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            first = next((s for s in syn if s.diagnosis == diagnosis and s.fst == fst), None)
            if first:
                ax.imshow(load_rgb(first.path))
            if r == 0:
                ax.set_title(f"FST {fst}", fontsize=8)
            if c == 0:
                ax.set_ylabel(diagnosis, fontsize=8)
    return _save(plt, fig, folder / "grid.png")


def _memorisation_pairs(plt: Any, folder: Path, memo: dict[str, Any]) -> Path:
    pairs = memo["pairs_shown"]
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.6 * len(pairs), 3.6), squeeze=False)
    for c, p in enumerate(pairs):
        for r, key in enumerate(("synthetic", "train")):
            ax = axes[r][c]
            ax.imshow(load_rgb(Path(p[key])))
            ax.set_xticks([])
            ax.set_yticks([])
        flag = " ⚑" if p["similarity"] >= memo["threshold"] else ""
        axes[0][c].set_title(f"cos {p['similarity']:.3f}{flag}", fontsize=7)
    axes[0][0].set_ylabel("synthetic", fontsize=8)
    axes[1][0].set_ylabel("nearest training", fontsize=8)
    return _save(plt, fig, folder / "memorisation.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
