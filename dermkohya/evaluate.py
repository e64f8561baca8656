"""How good a synthetic set is, overall and per skin type, diagnosis and cell: `reports/<plan>.json` + `.md`.

Real held-out images (the prepared split: `datasets/<ds>/prepared/heldout/metadata.csv`) are compared with
a generated set (`synthetic/<plan>/index.csv`): FID and KID on pytorch-fid's Inception features (KID is
unbiased, so it is the number to read for small cells), LPIPS to real images and between synthetic ones,
CLIP score (synthetic vs its prompt; real vs the same prompt as the baseline), intra-class CLIP diversity,
and memorisation: each synthetic image's nearest training image by CLIP, flagged above a threshold.
Every network comes from a local file; a missing one is named with where to put it before anything runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya import __version__, metrics, skin
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.paths import cache_root

METRICS = ("fid", "lpips", "clip", "memorisation")
REPORT_TEMPLATE = "evaluation_report.md.j2"
BATCH = 32
ROW_METRICS = (
    "fid", "kid", "kid_std", "lpips_to_real", "lpips_diversity", "clip_score", "clip_score_real",
    "clip_diversity", "clip_diversity_real", "memorised",
)  # fmt: skip


def default_weights_dir() -> Path:
    """Where evaluation weights are looked for unless given: $DERMKOHYA_WEIGHTS or <cache>/weights."""
    import os

    env = os.environ.get("DERMKOHYA_WEIGHTS")
    return Path(env).expanduser() if env else cache_root() / "weights"


@dataclasses.dataclass(frozen=True)
class Weights:
    inception: Path
    lpips: Path
    clip: Path

    @classmethod
    def under(cls, folder: Path, inception: Path | None = None, lpips: Path | None = None, clip: Path | None = None) -> Weights:
        return cls(inception or folder / metrics.INCEPTION_FILE, lpips or folder / "lpips", clip or folder / "clip")


@dataclasses.dataclass(frozen=True)
class Image_:
    """One image of either set, with its class and (for synthetic ones) its prompt."""

    path: Path
    diagnosis: str
    fst: str
    prompt: str = ""
    rejected: int = 0


def _key(diagnosis: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", diagnosis.casefold()).strip()


# --- reading the two sets ----------------------------------------------------------------------------------


def _metadata_csv(path: Path, what: str) -> Path:
    csv_path = path / "metadata.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise DermkohyaError(
            f"{path}: no {what} metadata (expected a folder with metadata.csv or a CSV with image, diagnosis, "
            "fitzpatrick columns — `dermkohya prepare` writes datasets/<name>/prepared/heldout/metadata.csv)"
        )
    return csv_path


def read_real(path: Path, what: str = "held-out") -> list[Image_]:
    """Images of a metadata CSV (image paths relative to the CSV's folder); every bad row reported at once."""
    csv_path = _metadata_csv(path, what)
    with csv_path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("image", "diagnosis", "fitzpatrick") if c not in (reader.fieldnames or [])]
        if missing:
            raise DermkohyaError(f"{csv_path}: missing column(s) {', '.join(missing)}; it needs image, diagnosis, fitzpatrick")
        rows = list(reader)
    images, problems = [], []
    for line, row in enumerate(rows, start=2):
        file = csv_path.parent / row["image"]
        fst = skin.parse_fst(row["fitzpatrick"])
        if not file.is_file():
            problems.append(f"line {line}: image {row['image']} not found under {csv_path.parent}")
        if fst is None:
            problems.append(f"line {line}: fitzpatrick {row['fitzpatrick']!r} is not a skin type (I–VI, 1–6, 12/34/56)")
        if file.is_file() and fst is not None:
            images.append(Image_(file, row["diagnosis"], fst, row.get("caption") or ""))
    if problems:
        raise ProblemsError(str(csv_path), problems)
    if not images:
        raise DermkohyaError(f"{csv_path}: no images listed")
    return images


def read_synthetic(folder: Path) -> list[Image_]:
    index = folder / "index.csv"
    if not index.is_file():
        raise DermkohyaError(f"{folder}: no index.csv; point --synthetic at a folder `dermkohya generate` wrote (synthetic/<plan>)")
    with index.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [row["path"] for row in rows if not (folder / row["path"]).is_file()]
    if missing:
        raise DermkohyaError(f"{index}: {len(missing)} listed image(s) missing (first: {missing[0]}); rerun `dermkohya generate`")
    if not rows:
        raise DermkohyaError(f"{index}: lists no images; run `dermkohya generate` first")
    return [Image_(folder / r["path"], r["diagnosis"], r["fst"], r["prompt"], int(r.get("rejected_attempts") or 0)) for r in rows]


def read_train(path: Path) -> list[Path]:
    """Training images for the memorisation check: a metadata CSV (or folder holding one), or any folder
    of images (searched recursively, as kohya's N_concept folders are)."""
    if path.is_file() or (path / "metadata.csv").is_file():
        return [image.path for image in read_real(path, "training")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
        if files:
            return files
    raise DermkohyaError(f"{path}: no training images found (give the prepared train/ folder, a kohya train_data_dir or a metadata CSV)")


def default_train(real: Path) -> Path | None:
    """The prepared layout keeps training images beside the held-out ones: prepared/{train,heldout}/."""
    folder = real if real.is_dir() else real.parent
    sibling = folder.parent / "train"
    return sibling if folder.name == "heldout" and (sibling / "metadata.csv").is_file() else None


# --- features ----------------------------------------------------------------------------------------------


def _load_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _tensor(path: Path, size: int) -> Any:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(_load_rgb(path), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]


def _batches(items: list[Any], size: int = BATCH) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def inception_features(net: metrics.InceptionFeatures, paths: list[Path]) -> np.ndarray:
    import torch

    return np.concatenate([net(torch.stack([_tensor(p, 299) for p in chunk])) for chunk in _batches(paths)])


def clip_image_features(clip: metrics.CLIPEmbedder, paths: list[Path]) -> np.ndarray:
    return np.concatenate([clip.images([_load_rgb(p) for p in chunk]) for chunk in _batches(paths)])


def lpips_pairs(net: metrics.LPIPSDistance, pairs: list[tuple[Path, Path]], size: int = 256) -> np.ndarray:
    import torch

    out = []
    for chunk in _batches(pairs):
        a = torch.stack([_tensor(x, size) for x, _ in chunk])
        b = torch.stack([_tensor(y, size) for _, y in chunk])
        out.append(net(a, b))
    return np.concatenate(out) if out else np.zeros(0)


# --- the report --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One row of the report: all images, one skin type, one diagnosis, or one diagnosis × skin-type cell."""

    kind: str
    diagnosis: str | None
    fst: str | None
    real: list[int]
    synthetic: list[int]


def groups(real: list[Image_], synthetic: list[Image_]) -> list[Group]:
    """Rows in report order; diagnoses matched case- and punctuation-insensitively, named as generated."""
    names = {_key(s.diagnosis): s.diagnosis for s in synthetic}
    fsts = [f for f in (*skin.FST_TYPES, *skin.FST_GROUPS) if any(s.fst == f for s in synthetic)]
    rows = [Group("overall", None, None, [i for i, r in enumerate(real) if _key(r.diagnosis) in names], list(range(len(synthetic))))]

    def pick(images: list[Image_], diagnosis: str | None, fst: str | None) -> list[int]:
        return [
            i for i, im in enumerate(images)
            if (diagnosis is None or _key(im.diagnosis) == _key(diagnosis)) and (fst is None or im.fst == fst)
        ]  # fmt: skip

    for fst in fsts:
        rows.append(Group("skin type", None, fst, [i for i in pick(real, None, fst) if _key(real[i].diagnosis) in names], pick(synthetic, None, fst)))
    for diagnosis in names.values():
        rows.append(Group("diagnosis", diagnosis, None, pick(real, diagnosis, None), pick(synthetic, diagnosis, None)))
    for diagnosis in names.values():
        for fst in fsts:
            if cell := pick(synthetic, diagnosis, fst):
                rows.append(Group("cell", diagnosis, fst, pick(real, diagnosis, fst), cell))
    return rows


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _cell_diversity(embeds: np.ndarray, images: list[Image_], members: list[int]) -> float | None:
    """Intra-class diversity of a row: mean pairwise cosine distance within each diagnosis × skin-type
    class, averaged over the row's classes weighted by their size."""
    by_cell: dict[tuple[str, str], list[int]] = {}
    for i in members:
        by_cell.setdefault((_key(images[i].diagnosis), images[i].fst), []).append(i)
    values, weights = [], []
    for idx in by_cell.values():
        if (value := metrics.mean_pairwise_cosine_distance(embeds[idx])) is not None:
            values.append(value)
            weights.append(len(idx))
    return float(np.average(values, weights=weights)) if values else None


@dataclasses.dataclass
class Options:
    enabled: tuple[str, ...] = METRICS
    threshold: float = 0.95
    min_fid: int = 10
    kid_subsets: int = 100
    lpips_pairs: int = 200
    lpips_size: int = 256
    shown_pairs: int = 8
    seed: int = 0


def check_weights(weights: Weights, enabled: Iterable[str]) -> None:
    """Every missing weight file of the enabled metrics in one report, with where each one goes."""
    enabled = set(enabled)
    needs: list[tuple[str, metrics.WeightFile]] = []
    if "fid" in enabled:
        needs.append(("fid", metrics.inception_file(weights.inception)))
    if "lpips" in enabled:
        needs += [("lpips", f) for f in metrics.lpips_files(weights.lpips)]
    for metric in ("clip", "memorisation"):
        if metric in enabled:
            needs += [(metric, f) for f in metrics.clip_files(weights.clip) if (metric, f) not in needs]
    missing = [(metric, f) for metric, f in needs if not f.path.is_file()]
    if missing:
        problems = list(dict.fromkeys(metrics.missing_weights([f for _, f in missing])))
        skips = ",".join(dict.fromkeys(metric for metric, _ in missing))
        raise ProblemsError("evaluate: weight files", [*problems, f"or leave those metrics out with --skip {skips}"])


def evaluate(
    real: Path,
    synthetic: Path,
    *,
    weights: Weights,
    train: Path | None = None,
    out_dir: Path = Path("reports"),
    options: Options | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Compute every enabled metric per row and write `<out_dir>/<plan>.json`, `.md` and the plots in
    `<out_dir>/<plan>/`. Returns the JSON report."""
    from dermkohya import basemodel

    options = options or Options()
    unknown = set(options.enabled) - set(METRICS)
    if unknown:
        raise DermkohyaError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    check_weights(weights, options.enabled)
    real_images = read_real(real)
    syn_images = read_synthetic(synthetic)
    train = train or default_train(real)
    train_paths = read_train(train) if train and "memorisation" in options.enabled else []
    notes = []
    if "memorisation" in options.enabled and not train_paths:
        notes.append("memorisation not checked: no training images (give --train, or --real from a prepared heldout/ folder)")
    unmatched = sorted({s.diagnosis for s in syn_images} - {s.diagnosis for s in syn_images if any(_key(r.diagnosis) == _key(s.diagnosis) for r in real_images)})
    if unmatched:
        notes.append(f"no real images of {', '.join(unmatched)}: those rows have synthetic-only metrics")
    device = device or ("cuda" if _cuda() else "cpu")
    plan = synthetic.name
    rows = groups(real_images, syn_images)
    rng = np.random.default_rng(options.seed)
    used: dict[str, dict[str, str]] = {}

    inc_real = inc_syn = None
    if "fid" in options.enabled:
        net = metrics.load_inception(weights.inception, device)
        inc_real, inc_syn = inception_features(net, [r.path for r in real_images]), inception_features(net, [s.path for s in syn_images])
        used["inception"] = {"path": str(metrics.inception_file(weights.inception).path), "sha256": basemodel.sha256_path(metrics.inception_file(weights.inception).path)}
        del net
    lp = metrics.load_lpips(weights.lpips, device) if "lpips" in options.enabled else None
    if lp is not None:
        alex = metrics.lpips_files(weights.lpips)[0].path
        used["lpips"] = {"path": str(alex), "sha256": basemodel.sha256_path(alex)}
    clip_syn = clip_real = text_syn = None
    clip = None
    if "clip" in options.enabled or "memorisation" in options.enabled:
        clip = metrics.load_clip(weights.clip, device)
        used["clip"] = {"path": str(weights.clip), "sha256": basemodel.sha256_path(weights.clip)}
        clip_syn = clip_image_features(clip, [s.path for s in syn_images])
        clip_real = clip_image_features(clip, [r.path for r in real_images])
        prompts = sorted({s.prompt for s in syn_images})
        prompt_embeds = dict(zip(prompts, clip.texts(prompts)))
        text_syn = np.stack([prompt_embeds[s.prompt] for s in syn_images])
        cell_prompt = {(_key(s.diagnosis), s.fst): s.prompt for s in syn_images}

    table = []
    for group in rows:
        label = {"overall": "all", "skin type": f"FST {group.fst}", "diagnosis": group.diagnosis}.get(group.kind, f"{group.diagnosis} · FST {group.fst}")
        row: dict[str, Any] = {"group": group.kind, "label": label, "diagnosis": group.diagnosis, "fst": group.fst}
        row |= {"n_real": len(group.real), "n_synthetic": len(group.synthetic), **dict.fromkeys(ROW_METRICS)}
        attempts = sum(1 + syn_images[i].rejected for i in group.synthetic)
        row["rejection_rate"] = round(1 - len(group.synthetic) / attempts, 4) if attempts else None
        enough = len(group.real) >= 2 and len(group.synthetic) >= 2
        if inc_real is not None and enough:
            kid_mean, kid_std = metrics.kid(inc_real[group.real], inc_syn[group.synthetic], subsets=options.kid_subsets, seed=options.seed)
            row |= {"kid": kid_mean, "kid_std": kid_std}
            if min(len(group.real), len(group.synthetic)) >= options.min_fid:
                row["fid"] = metrics.fid(inc_real[group.real], inc_syn[group.synthetic])
        if lp is not None:
            if group.real:
                pairs = [(syn_images[i].path, real_images[int(rng.choice(group.real))].path) for i in _sample(rng, group.synthetic, options.lpips_pairs)]
                row["lpips_to_real"] = _mean(lpips_pairs(lp, pairs, options.lpips_size).tolist())
            if len(group.synthetic) >= 2:
                pairs = [(syn_images[a].path, syn_images[b].path) for a, b in _distinct_pairs(rng, group.synthetic, options.lpips_pairs)]
                row["lpips_diversity"] = _mean(lpips_pairs(lp, pairs, options.lpips_size).tolist())
        if clip_syn is not None and "clip" in options.enabled:
            row["clip_score"] = _mean(metrics.clip_scores(clip_syn[group.synthetic], text_syn[group.synthetic]).tolist())
            real_with_prompt = [i for i in group.real if (_key(real_images[i].diagnosis), real_images[i].fst) in cell_prompt]
            if real_with_prompt:
                texts = clip.texts([cell_prompt[(_key(real_images[i].diagnosis), real_images[i].fst)] for i in real_with_prompt])
                row["clip_score_real"] = _mean(metrics.clip_scores(clip_real[real_with_prompt], texts).tolist())
            row["clip_diversity"] = _cell_diversity(clip_syn, syn_images, group.synthetic)
            row["clip_diversity_real"] = _cell_diversity(clip_real, real_images, group.real)
        table.append(row)

    memo: dict[str, Any] | None = None
    if clip is not None and train_paths:
        memo = _memorisation(clip, lp, syn_images, train_paths, clip_syn, options)
        flagged = {p["synthetic_index"] for p in memo["pairs_flagged"]}
        for group, row in zip(rows, table):
            row["memorised"] = sum(1 for i in group.synthetic if i in flagged)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(out_dir / plan, table, syn_images, real_images, memo, synthetic)
    plan_json = _read_json(synthetic / "plan.json")
    report = {
        "plan": plan,
        "synthetic": str(synthetic),
        "real": str(real),
        "train": str(train) if train_paths else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dermkohya_version": __version__,
        "base_model": (plan_json or {}).get("plan", {}).get("model", {}).get("base"),
        "loras": (plan_json or {}).get("loras", []),
        "metrics": list(options.enabled),
        "weights": used,
        "options": dataclasses.asdict(options),
        "device": device,
        "rows": table,
        "memorisation": memo,
        "plots": {k: str(v.relative_to(out_dir)) for k, v in plots.items()},
        "notes": notes,
    }
    (out_dir / f"{plan}.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    (out_dir / f"{plan}.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _sample(rng: np.random.Generator, members: list[int], k: int) -> list[int]:
    return members if len(members) <= k else [members[i] for i in sorted(rng.choice(len(members), k, replace=False))]


def _distinct_pairs(rng: np.random.Generator, members: list[int], k: int) -> list[tuple[int, int]]:
    n = len(members)
    if n * (n - 1) // 2 <= k:
        return [(members[a], members[b]) for a in range(n) for b in range(a + 1, n)]
    pairs = set()
    while len(pairs) < k:
        a, b = rng.choice(n, 2, replace=False)
        pairs.add((members[min(a, b)], members[max(a, b)]))
    return sorted(pairs)


def _memorisation(
    clip: metrics.CLIPEmbedder, lp: metrics.LPIPSDistance | None, syn: list[Image_], train: list[Path], clip_syn: np.ndarray, options: Options
) -> dict[str, Any]:
    """Nearest training image per synthetic image (CLIP cosine); the flagged ones and the closest few
    are listed with their LPIPS distance when LPIPS is enabled."""
    train_embeds = clip_image_features(clip, train)
    best, sims = metrics.nearest_neighbours(clip_syn, train_embeds)
    order = np.argsort(-sims)
    flagged = [int(i) for i in order if sims[i] >= options.threshold]
    shown = sorted(set(flagged[: options.shown_pairs]) | {int(i) for i in order[: options.shown_pairs]}, key=lambda i: -sims[i])

    def pair(i: int) -> dict[str, Any]:
        return {"synthetic_index": i, "synthetic": str(syn[i].path), "train": str(train[best[i]]), "similarity": float(sims[i])}

    pairs_shown = [pair(i) for i in shown]
    if lp is not None and pairs_shown:
        distances = lpips_pairs(lp, [(Path(p["synthetic"]), Path(p["train"])) for p in pairs_shown], options.lpips_size)
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


# --- plots and markdown ------------------------------------------------------------------------------------


def _plots(folder: Path, table: list[dict[str, Any]], syn: list[Image_], real: list[Image_], memo: dict[str, Any] | None, synthetic: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    fst_rows = [r for r in table if r["group"] == "skin type"]
    panels = [(k, label) for k, label in (("fid", "FID ↓"), ("kid", "KID ↓"), ("lpips_to_real", "LPIPS to real ↓"), ("clip_score", "CLIP score ↑"), ("clip_diversity", "CLIP diversity ↑"), ("rejection_rate", "rejected ↓")) if any(r.get(k) is not None for r in fst_rows)]
    if fst_rows and panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
        labels = [r["fst"] for r in fst_rows]
        for ax, (key, label) in zip(axes[0], panels):
            values = [r.get(key) if r.get(key) is not None else np.nan for r in fst_rows]
            ax.bar(labels, values, color="#5b7fa6")
            baseline = {"clip_score": "clip_score_real", "clip_diversity": "clip_diversity_real"}.get(key)
            if baseline:
                ax.plot(labels, [r.get(baseline) if r.get(baseline) is not None else np.nan for r in fst_rows], "o", color="#c0392b", label="real")
                ax.legend(fontsize=7)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("Fitzpatrick type", fontsize=8)
        fig.tight_layout()
        plots["fst_metrics"] = folder / "fst_metrics.png"
        fig.savefig(plots["fst_metrics"], dpi=110)
        plt.close(fig)

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
                ax.imshow(_load_rgb(first.path))
            if r == 0:
                ax.set_title(f"FST {fst}", fontsize=8)
            if c == 0:
                ax.set_ylabel(diagnosis, fontsize=8)
    fig.tight_layout()
    plots["grid"] = folder / "grid.png"
    fig.savefig(plots["grid"], dpi=110)
    plt.close(fig)

    if memo and memo["pairs_shown"]:
        pairs = memo["pairs_shown"]
        fig, axes = plt.subplots(2, len(pairs), figsize=(1.6 * len(pairs), 3.6), squeeze=False)
        for c, p in enumerate(pairs):
            for r, key in enumerate(("synthetic", "train")):
                ax = axes[r][c]
                ax.imshow(_load_rgb(Path(p[key])))
                ax.set_xticks([])
                ax.set_yticks([])
            flag = " ⚑" if p["similarity"] >= memo["threshold"] else ""
            axes[0][c].set_title(f"cos {p['similarity']:.3f}{flag}", fontsize=7)
        axes[0][0].set_ylabel("synthetic", fontsize=8)
        axes[1][0].set_ylabel("nearest training", fontsize=8)
        fig.tight_layout()
        plots["memorisation"] = folder / "memorisation.png"
        fig.savefig(plots["memorisation"], dpi=110)
        plt.close(fig)
    return plots


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:

    from dermkohya.templating import file_environment

    env = file_environment(trim_blocks=True, fmt=_fmt)
    return env.get_template(REPORT_TEMPLATE).render(report=report, smoke=str(report.get("base_model") or "").startswith("random:"))
