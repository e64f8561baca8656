"""The utility report: figures per arm and cell, the paired difference, the plot, the JSON and the markdown."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dermkohya.files import write_atomic
from dermkohya.skin import UNKNOWN
from dermkohya.utility import data, scores

if TYPE_CHECKING:
    from dermkohya.utility import Options

REPORT_TEMPLATE = "utility_report.md.j2"
FIGURES = {"auroc": scores.macro_auroc, "balanced_accuracy": scores.balanced_accuracy}


def assemble(held: scores.Held, sets: data.Sets, arms: dict[str, list[data.Item]], options: Options, seeds: list[int]) -> dict[str, Any]:
    """counts, per-arm figures (overall, per skin type, equal opportunity) and (b) − (a)."""
    everyone = np.arange(held.labels.size)
    fsts = data.fst_order(set(held.groups.tolist()))
    cells = {"overall": everyone, **{fst: np.flatnonzero(held.groups == fst) for fst in fsts}}
    reasons = {cell: scores.cell_reason(held.labels[members], options.min_images) for cell, members in cells.items()}
    known = np.flatnonzero(held.groups != UNKNOWN)
    common = {"resamples": options.bootstrap, "seed": options.seed}

    def figures(arm: str, cell: str) -> dict[str, Any]:
        members = cells[cell]
        strata = held.groups[members] if cell == "overall" else None
        return {"n": int(members.size), **{k: scores.cell_figure(f, held, arm, members, reason=reasons[cell], strata=strata, **common) for k, f in FIGURES.items()}}

    out_arms = {}
    for arm, items in arms.items():
        out_arms[arm] = {
            "train_images": len(items),
            "train_by_fst": dict(Counter(i.fst for i in items)),
            "synthetic_images": sum(i.synthetic for i in items),
            "overall": figures(arm, "overall"),
            "per_fst": {fst: figures(arm, fst) for fst in fsts},
            "equal_opportunity": scores.equal_opportunity(held, arm, sets.classes, known, min_positives=options.min_positives, **common),
        }
    pair = ("real", "real_synthetic")
    difference = {
        cell: {k: scores.cell_delta(f, held, pair, members, reason=reasons[cell], **common) for k, f in FIGURES.items()}
        for cell, members in cells.items()
    }
    return {
        "counts": {"train_real": dict(Counter(i.fst for i in sets.train)), "heldout": {fst: int(cells[fst].size) for fst in fsts},
                   "heldout_total": int(everyone.size), "heldout_by_class": {c: int((held.labels == k).sum()) for k, c in enumerate(sets.classes)}},
        "arms": out_arms,
        "difference": {"overall": difference.pop("overall"), "per_fst": difference},
    }


def plot(path: Path, result: dict[str, Any]) -> Path:
    """Per-skin-type AUROC of (a) and (b) with their intervals; cells without a figure are left empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dermkohya.utility import ARMS

    cells = ["overall", *result["arms"]["real"]["per_fst"]]
    fig, ax = plt.subplots(figsize=(1.1 * len(cells) + 2.5, 3.6))
    for offset, (arm, colour) in zip((-0.18, 0.18), (("real", "#8e8e8e"), ("real_synthetic", "#5b7fa6"))):
        block = result["arms"][arm]
        rows = [block["overall"] if c == "overall" else block["per_fst"][c] for c in cells]
        values = np.array([r["auroc"]["value"] if r["auroc"]["value"] is not None else np.nan for r in rows])
        low = np.array([r["auroc"]["ci"][0] if r["auroc"]["ci"] else np.nan for r in rows])
        high = np.array([r["auroc"]["ci"][1] if r["auroc"]["ci"] else np.nan for r in rows])
        x = np.arange(len(cells)) + offset
        ax.bar(x, values, width=0.34, color=colour, label=ARMS[arm])
        ax.errorbar(x, values, yerr=[values - low, high - values], fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.axhline(0.5, color="#c0392b", lw=0.8, ls="--", label="chance")
    real_rows = [result["arms"]["real"]["overall"], *result["arms"]["real"]["per_fst"].values()]
    for i, row in enumerate(real_rows):
        if row["auroc"]["value"] is None:
            ax.text(i, 0.04, "no figure", ha="center", fontsize=7, rotation=90, color="#555555")
    ax.set_xticks(range(len(cells)), [f"{'all' if c == 'overall' else 'FST ' + c}\nn={r['n']}" for c, r in zip(cells, real_rows)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC (macro, one-vs-rest)")
    ax.set_title(f"Held-out AUROC per skin type, mean of {len(result['seeds'])} seed(s), 95 % CI", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(figure: dict[str, Any] | None, digits: int = 3) -> str:
    if not figure or figure.get("value") is None:
        return "–"
    text = f"{figure['value']:.{digits}f}"
    return text + (f" [{figure['ci'][0]:.{digits}f}, {figure['ci'][1]:.{digits}f}]" if figure.get("ci") else "")


def render_markdown(result: dict[str, Any]) -> str:
    from dermkohya.templating import file_environment
    from dermkohya.utility import ARMS

    env = file_environment(trim_blocks=True, fig=_fmt)
    smoke = str(result.get("base_model") or "").startswith("random:")
    return env.get_template(REPORT_TEMPLATE).render(r=result, arms=ARMS, smoke=smoke)


def write(result: dict[str, Any], out_dir: Path, folder: Path) -> dict[str, Any]:
    """reports/utility-<name>.json and .md, and the plot in reports/utility-<name>/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(folder / "per_fst_auroc.png", result)
    result["plots"] = {"per_fst_auroc": str(png.relative_to(out_dir))}
    write_atomic(out_dir / f"utility-{result['name']}.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / f"utility-{result['name']}.md", render_markdown(result))
    return result
