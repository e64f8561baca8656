"""The evaluation's statistics on feature arrays: Fréchet distance, KID, and CLIP cosine statistics.

numpy only, never torch: the networks that make the features live in `networks.py`, and these functions
are tested on known cases where torch is not installed.
"""

from __future__ import annotations

import numpy as np

# --- distribution distances --------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (N, D) feature matrix, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need an (N >= 2, D) feature matrix, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), the Fréchet distance of two Gaussians.

    Tr((Σ1Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1^½ Σ2 Σ1^½ (symmetric, PSD, same
    spectrum as Σ1Σ2): the value pytorch-fid's scipy.linalg.sqrtm gives, ten times faster at 2048
    dimensions and without its ridge for the singular covariances of small sets."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (biased upwards for small N: prefer KID below a few thousand images).

    With fewer images than dimensions (every diagnosis × skin-type cell) it is computed exactly in sample
    space: with Σ = AᵀA for the centred rows A/√(n−1), Tr((Σ1Σ2)^½) is the nuclear norm of A1A2ᵀ."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if max(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    if min(len(a), len(b)) < 2:
        raise ValueError("FID needs at least 2 samples on each side")
    ca = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)
    diff = a.mean(axis=0) - b.mean(axis=0)
    nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + (ca**2).sum() + (cb**2).sum() - 2 * nuclear)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(a, b) = (a·b/d + 1)³ (Bińkowski et al., KID)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def kid(features_a: np.ndarray, features_b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over random subsets), unbiased at any sample size, hence the metric for small
    diagnosis × skin-type cells. Subsets are drawn without replacement from each set, with a fixed seed."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# --- embedding statistics (CLIP) ---------------------------------------------------------------------------


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-pair CLIP score, 100·max(cos(image, text), 0), as torchmetrics defines it."""
    cos = (normalise_rows(image_embeds) * normalise_rows(text_embeds)).sum(axis=1)
    return 100.0 * np.maximum(cos, 0.0)


def mean_pairwise_cosine_distance(embeds: np.ndarray) -> float | None:
    """Intra-class diversity: the mean of 1 − cos over all distinct pairs (None below two images)."""
    if len(embeds) < 2:
        return None
    unit = normalise_rows(embeds)
    sims = unit @ unit.T
    n = len(unit)
    return float(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))


def nearest_neighbours(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of the most cosine-similar reference row and that similarity."""
    sims = normalise_rows(queries) @ normalise_rows(references).T
    best = sims.argmax(axis=1)
    return best, sims[np.arange(len(queries)), best]
