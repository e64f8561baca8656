"""The evaluation's metrics (one file each, found by `registry.py`), the maths they share (`maths.py`,
numpy only), the generation filter's image checks (`quality.py`) and the feature networks (`networks.py`,
torch imported only when a network is loaded).

`from dermkohya import metrics` stays light: it imports no torch, so the filter and the maths work (and
are tested) without it.
"""

from dermkohya.metrics.maths import (
    clip_scores,
    fid,
    frechet_distance,
    gaussian_stats,
    kid,
    mean_pairwise_cosine_distance,
    mmd2_unbiased,
    nearest_neighbours,
    normalise_rows,
)
from dermkohya.metrics.networks import (
    ALEXNET_FILE,
    INCEPTION_FILE,
    LPIPS_LIN_FILE,
    WeightFile,
    Weights,
    clip_files,
    inception_file,
    load_clip,
    load_inception,
    load_lpips,
    lpips_files,
    missing_weights,
)
from dermkohya.metrics.quality import hamming, image_problems, luminance, phash

__all__ = [
    "ALEXNET_FILE", "INCEPTION_FILE", "LPIPS_LIN_FILE", "WeightFile", "Weights", "clip_files", "clip_scores", "fid",
    "frechet_distance", "gaussian_stats", "hamming", "image_problems", "inception_file", "kid", "load_clip",
    "load_inception", "load_lpips", "lpips_files", "luminance", "mean_pairwise_cosine_distance", "missing_weights",
    "mmd2_unbiased", "nearest_neighbours", "normalise_rows", "phash",
]  # fmt: skip
