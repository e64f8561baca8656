"""Downstream utility: does adding synthetic images to the real training set help a classifier, per skin type?

`dermkohya utility` trains the same classifier on (a) the real training split and (b) real + synthetic
images (per-skin-type shares, see `data.py`), for several seeds each, and scores both on the real
held-out split — AUROC, balanced accuracy per skin type and overall, the equal-opportunity gap — with
bootstrap CIs and the paired difference (b) − (a). Writes `reports/utility-<name>.json` and `.md`, the
plot and one record per trained seed under `reports/utility-<name>/runs/` (a rerun resumes from them).

This is the test that matters for a synthetic set (FID says nothing about whether a classifier gets
better on dark skin), and the one most easily over-read: see the README's "What the utility numbers mean".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya import __version__
from dermkohya.files import sha256_file
from dermkohya.utility import data, report, scores
from dermkohya.utility.classifier import TrainOptions, run_seed

ARMS = {"real": "(a) real", "real_synthetic": "(b) real + synthetic"}


@dataclasses.dataclass(frozen=True)
class Options:
    training: TrainOptions = TrainOptions()
    seeds: int = 3
    seed: int = 0  # the first training seed and the synthetic draw's seed; seeds are seed, seed+1, …
    shares: dict[str, float] | None = None  # None: data.DEFAULT_SHARES
    bootstrap: int = 200
    min_images: int = 10
    min_positives: int = 5
    device: str | None = None


def _fingerprint(arm: str, items: list[data.Item], heldout: list[data.Item], classes: list[str], training: TrainOptions, weights_sha: str | None) -> str:
    """What a seed's record depends on; a record with another fingerprint is never reused."""
    content = {
        "arm": arm, "classes": classes, "weights_sha256": weights_sha,
        "training": {k: v for k, v in dataclasses.asdict(training).items() if k not in ("weights", "workers")},
        "train": [(str(i.path), i.label, i.fst) for i in items], "heldout": [(str(i.path), i.label, i.fst) for i in heldout],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(
    train: Path, heldout: Path, synthetic: Path, *, name: str | None = None, out_dir: Path = Path("reports"),
    options: Options = Options(), progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train every (arm, seed) not yet recorded, score both arms, write the report; returns the JSON report."""
    name = name or synthetic.name
    sets = data.read_sets(train, heldout, synthetic)
    shares = options.shares if options.shares is not None else dict(data.DEFAULT_SHARES)
    added, mix_table = data.mix(sets, shares, options.seed)
    arms = {"real": sets.train, "real_synthetic": sets.train + added}
    weights_sha = sha256_file(options.training.weights) if options.training.weights and Path(options.training.weights).is_file() else None
    device = _device(options.device)
    folder = out_dir / f"utility-{name}"
    seeds = [options.seed + k for k in range(options.seeds)]
    probs: dict[str, list[np.ndarray]] = {arm: [] for arm in arms}
    losses: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm, items in arms.items():
            fingerprint = _fingerprint(arm, items, sets.heldout, sets.classes, options.training, weights_sha)
            record = run_seed(folder / "runs" / f"{arm}-seed{seed}.json", fingerprint, arm, seed, items, sets.heldout,
                              len(sets.classes), options.training, device)
            probs[arm].append(np.asarray(record.probs, dtype=np.float64))
            losses[arm][str(seed)] = record.losses
            if progress:
                progress(f"{ARMS[arm]}, seed {seed}: {record.train_images} training images, {record.seconds:.1f} s on {record.device}, final loss {record.losses[-1] if record.losses else float('nan'):.4f}")

    held = scores.Held(np.array([i.label for i in sets.heldout]), np.array([i.fst for i in sets.heldout], dtype=object), probs)
    result = report.assemble(held, sets, arms, options, seeds)
    plan = _read_json(synthetic / "plan.json") or {}
    result = {
        "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dermkohya_version": __version__,
        "train": str(train), "heldout": str(heldout), "synthetic": str(synthetic),
        "base_model": plan.get("plan", {}).get("model", {}).get("base"), "device": device,
        "model": {"name": options.training.model, "weights": str(options.training.weights) if options.training.weights else None,
                  "weights_sha256": weights_sha, "pretrained": weights_sha is not None},
        "training": {k: v for k, v in dataclasses.asdict(options.training).items() if k not in ("model", "weights")},
        "seeds": seeds, "bootstrap_resamples": options.bootstrap, "min_images": options.min_images, "min_positives": options.min_positives,
        "classes": sets.classes, "synthetic_shares": shares, "mix": mix_table, **result, "losses": losses, "notes": sets.notes,
    }  # fmt: skip
    return report.write(result, out_dir, folder)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
