"""The generation filter's image checks: exposure, blankness and a perceptual hash for near-duplicates.

numpy (and PIL/scipy for the hash) only: `dermkohya generate` filters images with these, and their tests
run where torch is not installed.
"""

from __future__ import annotations

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114])


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in [0, 1] of an (H, W, 3) uint8 image."""
    return image[..., :3].astype(np.float64) @ _LUMA / 255.0


def image_problems(image: np.ndarray, *, min_std: float, max_clipped: float) -> list[str]:
    """Why an image is unusable: "blank" (almost no contrast), "overexposed"/"underexposed" (more than
    `max_clipped` of its pixels at white/black). Empty when it passes. NaN is checked before the
    float→uint8 conversion, by the caller, because uint8 cannot hold it."""
    luma = luminance(image)
    problems = []
    if luma.std() < min_std:
        problems.append("blank")
    if (luma >= 250 / 255).mean() > max_clipped:
        problems.append("overexposed")
    if (luma <= 5 / 255).mean() > max_clipped:
        problems.append("underexposed")
    return problems


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash (the DCT hash of imagehash/pHash): grey 32×32, 2-D DCT, the 8×8 lowest
    frequencies against their median. Near-duplicates differ in few bits whatever the seed noise."""
    from PIL import Image
    from scipy.fft import dctn

    grey = Image.fromarray(np.ascontiguousarray(image[..., :3])).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
