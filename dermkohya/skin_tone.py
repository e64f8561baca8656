"""Skin-tone fidelity without any network: the Individual Typology Angle (ITA°) of an image's healthy skin.

Why: a generator asked for Fitzpatrick type VI that draws type III skin has failed the very people a
balanced synthetic set is for, and FID/CLIP cannot see it. ITA° = arctan((L* − 50) / b*) · 180/π on the
CIELAB colour of healthy skin is the colorimetric proxy dermatology uses (Chardon et al. 1991; Del Bino
& Bernerd 2013), with six classes: very light > 55° (→ I), light 41–55° (II), intermediate 28–41° (III),
tan 10–28° (IV), brown −30–10° (V), dark < −30° (VI). ITA measures *colour*, Fitzpatrick *sun reaction*:
the two agree only roughly, so agreement is counted within ±1 class.

The healthy-skin mask, in order (an image is first reduced to at most 256 px a side):
1. clipped pixels: L* ≤ 3 or L* ≥ 97 (shadows, blown highlights);
2. hair and other thin dark lines: a morphological black-hat of L* (closing minus image) above 8 L* units;
3. specular highlights, printed labels and other small bright spots: a white top-hat above 8 L* units;
4. the lesion — the region most atypical in colour or texture: pixels far (ΔE*ab) from a robust skin
   colour (the median of the image border first, then of the kept pixels, three rounds), or in a
   neighbourhood whose mean ΔE or L* texture (local standard deviation) is unusual; grown by a margin.
The ITA is taken from the median L* and median b* of what is left.

Limits (said in the report too): it assumes healthy skin is the larger part of the picture and the
lesion differs from it in colour or texture; a lesion filling the frame, diffuse redness, tattoos,
vitiligo or a strong colour cast move the figure. White balance and exposure change ITA directly, so
photographs from different cameras are comparable only roughly; dark hair on very dark skin can stay
in the mask. Less than 5 % of the image left as skin gives no ITA (counted as unmeasured).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya.bootstrap import DEFAULT_RESAMPLES, bootstrap
from dermkohya.files import write_atomic
from dermkohya.skin import FST_GROUPS, FST_TYPES

ITA_BOUNDS: tuple[float, ...] = (55.0, 41.0, 28.0, 10.0, -30.0)  # lower bounds of classes I … V
ITA_NAMES = {"I": "very light", "II": "light", "III": "intermediate", "IV": "tan", "V": "brown", "VI": "dark"}
DRIFT_DEGREES = 10.0
MIN_AGREEMENT = 0.5
MAX_SIDE = 256
MIN_SKIN_FRACTION = 0.05
CLIPPED_DARK, CLIPPED_BRIGHT = 3.0, 97.0
LINE_CONTRAST = 8.0  # L* units a hair line / highlight differs from its surroundings
MIN_DELTA_E = 10.0  # never call skin atypical closer than this to the skin colour
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
_CODES = np.arange(256) / 255.0
_LINEAR = np.where(_CODES <= 0.04045, _CODES / 12.92, ((_CODES + 0.055) / 1.055) ** 2.4)  # sRGB code → linear


# --- colour ------------------------------------------------------------------------------------------------


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of an (..., 3) uint8 sRGB array."""
    linear = _LINEAR[np.asarray(rgb, dtype=np.uint8)]
    t = (linear @ _SRGB_TO_XYZ.T) / _WHITE_D65
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """uint8 sRGB of an (..., 3) CIELAB array (out-of-gamut values clipped): for tests and plots."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    t = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE_D65
    linear = np.clip(t @ np.linalg.inv(_SRGB_TO_XYZ).T, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8)


def ita_degrees(lightness: float, b: float) -> float:
    """ITA° = arctan((L* − 50) / b*) · 180/π; b* ≤ 0 (never skin) is taken as a tiny positive b*."""
    return float(np.degrees(np.arctan((lightness - 50.0) / max(b, 1e-6))))


def ita_class(ita: float) -> str:
    """The ITA class, named by the Fitzpatrick type it corresponds to (I … VI)."""
    for fst, bound in zip(FST_TYPES, ITA_BOUNDS):
        if ita > bound:
            return fst
    return FST_TYPES[-1]


def agrees(requested: str, measured: str, tolerance: int = 1) -> bool | None:
    """Whether a measured ITA class is within `tolerance` classes of a requested type or group ("I-II");
    None for a requested value that is no skin type."""
    ends = requested.split("-") if requested in FST_GROUPS else [requested]
    if any(e not in FST_TYPES for e in ends) or measured not in FST_TYPES:
        return None
    lo, hi = FST_TYPES.index(ends[0]), FST_TYPES.index(ends[-1])
    return lo - tolerance <= FST_TYPES.index(measured) <= hi + tolerance


# --- the healthy-skin mask ---------------------------------------------------------------------------------


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


def _robust_threshold(values: np.ndarray, floor: float) -> float:
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * 1.4826
    return max(floor, median + 3.0 * mad)


def skin_mask(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, Lab) of an (H, W, 3) uint8 image: True where the pixel is taken as healthy skin."""
    from scipy import ndimage

    lab = srgb_to_lab(rgb)
    lightness = lab[..., 0]
    h, w = lightness.shape
    side = min(h, w)
    usable = (lightness > CLIPPED_DARK) & (lightness < CLIPPED_BRIGHT)
    line = _odd(side / 25)
    hair = ndimage.grey_closing(lightness, size=(line, line)) - lightness > LINE_CONTRAST
    bright = lightness - ndimage.grey_opening(lightness, size=(line, line)) > LINE_CONTRAST
    thin = ndimage.binary_dilation(hair | bright, iterations=max(1, side // 128))
    candidate = usable & ~thin
    if not candidate.any():
        return candidate, lab

    frame = np.zeros_like(candidate)
    edge = max(1, side // 6)
    frame[:edge], frame[-edge:], frame[:, :edge], frame[:, -edge:] = True, True, True, True
    seed_pixels = candidate & frame
    reference = np.median(lab[seed_pixels if seed_pixels.sum() >= 0.05 * frame.sum() else candidate], axis=0)

    window = _odd(side / 16)
    weight = ndimage.uniform_filter(candidate.astype(np.float64), window) + 1e-9
    local_mean = ndimage.uniform_filter(lightness * candidate, window) / weight
    local_sq = ndimage.uniform_filter(lightness**2 * candidate, window) / weight
    texture = np.sqrt(np.maximum(local_sq - local_mean**2, 0.0))
    keep = candidate
    for _ in range(3):
        delta = np.linalg.norm(lab - reference, axis=-1)
        region = ndimage.uniform_filter(delta * candidate, window) / weight
        base = keep if keep.sum() else candidate
        atypical = (
            (delta > _robust_threshold(delta[base], MIN_DELTA_E))
            | (region > _robust_threshold(region[base], MIN_DELTA_E / 2))
            | (texture > _robust_threshold(texture[base], LINE_CONTRAST / 2))
        )
        lesion = ndimage.binary_dilation(atypical, iterations=max(1, side // 64))
        keep = candidate & ~lesion
        if keep.sum() == 0:
            break
        reference = np.median(lab[keep], axis=0)
    return keep, lab


# --- one image ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tone:
    """One image's measured skin tone; `ita` is None (with `reason`) when too little skin was found."""

    path: str
    fst: str
    lightness: float | None
    b: float | None
    ita: float | None
    ita_class: str | None
    agrees: bool | None
    skin_fraction: float
    reason: str | None = None


def load_rgb(path: Path, max_side: int = MAX_SIDE) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max_side / max(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX)
        return np.asarray(im, dtype=np.uint8)


def measure_array(rgb: np.ndarray, fst: str = "", path: str = "") -> Tone:
    """The ITA of an image already in memory, against requested type `fst` (may be empty)."""
    mask, lab = skin_mask(rgb)
    fraction = float(mask.mean())
    if fraction < MIN_SKIN_FRACTION:
        return Tone(path, fst, None, None, None, None, None, round(fraction, 4), f"only {fraction:.1%} of the image kept as healthy skin")
    lightness, b = float(np.median(lab[..., 0][mask])), float(np.median(lab[..., 2][mask]))
    ita = ita_degrees(lightness, b)
    cls = ita_class(ita)
    return Tone(path, fst, round(lightness, 3), round(b, 3), round(ita, 3), cls, agrees(fst, cls) if fst else None, round(fraction, 4))


def measure(path: Path, fst: str = "") -> Tone:
    return measure_array(load_rgb(path), fst, str(path))


def measure_all(images: Iterable[tuple[Path, str]]) -> list[Tone]:
    """Tones of (path, requested skin type) pairs, in order."""
    return [measure(path, fst) for path, fst in images]


# --- per skin type -----------------------------------------------------------------------------------------


def summarise(tones: Sequence[Tone], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per requested skin type: `{n, n_measured, ita_median, ita_iqr: [q25, q75], agreement, exact_agreement,
    ita_median_ci, agreement_ci}`; agreement is the fraction within ±1 ITA class, over measured images."""
    order = [f for f in (*FST_TYPES, *FST_GROUPS) if any(t.fst == f for t in tones)]
    out: dict[str, dict[str, Any]] = {}
    for fst in order:
        group = [t for t in tones if t.fst == fst]
        measured = [t for t in group if t.ita is not None]
        row: dict[str, Any] = {"n": len(group), "n_measured": len(measured), "ita_median": None, "ita_iqr": None,
                               "agreement": None, "exact_agreement": None, "ita_median_ci": None, "agreement_ci": None}
        if measured:
            ita = np.array([t.ita for t in measured], dtype=np.float64)
            hits = np.array([bool(t.agrees) for t in measured], dtype=np.float64)
            q25, q75 = np.percentile(ita, [25, 75])
            median_ci = bootstrap(lambda i: float(np.median(ita[i])), np.arange(ita.size), resamples=resamples, seed=seed)
            agreement_ci = bootstrap(lambda i: float(hits[i].mean()), np.arange(hits.size), resamples=resamples, seed=seed)
            row |= {
                "ita_median": round(float(np.median(ita)), 3),
                "ita_iqr": [round(float(q25), 3), round(float(q75), 3)],
                "agreement": round(float(hits.mean()), 4),
                "exact_agreement": round(float(np.mean([t.ita_class == t.fst for t in measured])), 4),
                "ita_median_ci": [round(v, 3) for v in median_ci.as_list()] if median_ci else None,
                "agreement_ci": [round(v, 4) for v in agreement_ci.as_list()] if agreement_ci else None,
            }
        out[fst] = row
    return out


def drift(synthetic: dict[str, dict[str, Any]], real: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Skin types whose synthetic images are too light, with why: the synthetic median ITA° more than
    DRIFT_DEGREES above the real held-out median of that type; without measured real images of the type,
    agreement below MIN_AGREEMENT."""
    flagged: dict[str, str] = {}
    for fst, row in synthetic.items():
        if row["ita_median"] is None:
            continue
        reference = real.get(fst, {}).get("ita_median")
        if reference is not None:
            if row["ita_median"] - reference > DRIFT_DEGREES:
                flagged[fst] = f"synthetic median ITA {row['ita_median']:.1f}° is {row['ita_median'] - reference:.1f}° lighter than real {reference:.1f}°"
        elif row["agreement"] is not None and row["agreement"] < MIN_AGREEMENT:
            flagged[fst] = f"no real images of type {fst}; only {row['agreement']:.0%} of synthetic images within ±1 ITA class"
    return flagged


def report(real: Sequence[Tone], synthetic: Sequence[Tone], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The `skin_tone` section of an evaluation report."""
    syn, ref = summarise(synthetic, resamples=resamples, seed=seed), summarise(real, resamples=resamples, seed=seed)
    flagged = drift(syn, ref)
    return {
        "method": "ITA° = arctan((L* − 50)/b*) on the median CIELAB of a healthy-skin mask (hair, highlights, "
        "clipped pixels and the most atypical region removed); agreement = within ±1 ITA class of the requested type",
        "classes": {fst: ITA_NAMES[fst] for fst in FST_TYPES},
        "bounds": list(ITA_BOUNDS),
        "drift_degrees": DRIFT_DEGREES,
        "min_agreement": MIN_AGREEMENT,
        "bootstrap_resamples": resamples,
        "types": [f for f in (*FST_TYPES, *FST_GROUPS) if f in syn or f in ref],
        "synthetic": {"per_fst": syn, "unmeasured": sum(t.ita is None for t in synthetic)},
        "real": {"per_fst": ref, "unmeasured": sum(t.ita is None for t in real)},
        "drift": list(flagged),
        "drift_reasons": flagged,
    }


def write_tones_csv(path: Path, real: Sequence[Tone], synthetic: Sequence[Tone]) -> Path:
    """Every image's measurement, so a flagged skin type can be traced to its images."""
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(Tone)]
    writer = csv.DictWriter(buffer, fieldnames=["set", *fields], lineterminator="\n")
    writer.writeheader()
    for name, tones in (("real", real), ("synthetic", synthetic)):
        for tone in tones:
            writer.writerow({"set": name, **dataclasses.asdict(tone)})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def plot(path: Path, real: Sequence[Tone], synthetic: Sequence[Tone]) -> Path:
    """ITA° distributions per requested skin type, synthetic beside real, over the six ITA class bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fsts = [f for f in (*FST_TYPES, *FST_GROUPS) if any(t.fst == f for t in (*real, *synthetic))]
    fig, ax = plt.subplots(figsize=(1.3 * max(len(fsts), 3) + 2, 4))
    edges = [90.0, *ITA_BOUNDS, -90.0]
    for i, fst in enumerate(FST_TYPES):
        ax.axhspan(edges[i + 1], edges[i], color="#000000", alpha=0.04 * (i % 2), lw=0)
        ax.text(len(fsts) - 0.45, (max(edges[i + 1], -80) + min(edges[i], 80)) / 2, f"{fst} {ITA_NAMES[fst]}", fontsize=7, va="center")
    for bound in ITA_BOUNDS:
        ax.axhline(bound, color="#999999", lw=0.6, ls=":")
    jitter = np.random.default_rng(0)
    for offset, tones, colour, label in ((-0.18, synthetic, "#2f6db0", "synthetic"), (0.18, real, "#c0392b", "real held-out")):
        data = [[t.ita for t in tones if t.fst == f and t.ita is not None] for f in fsts]
        positions = [i + offset for i, d in enumerate(data) if d]
        if positions:
            ax.boxplot([d for d in data if d], positions=positions, widths=0.3, manage_ticks=False, showfliers=False,
                       boxprops={"color": colour}, whiskerprops={"color": colour}, capprops={"color": colour}, medianprops={"color": colour, "lw": 2})
            for i, d in enumerate(data):
                ax.scatter(i + offset + jitter.uniform(-0.08, 0.08, len(d)), d, s=8, color=colour, alpha=0.6, lw=0)
            ax.plot([], [], "s", color=colour, label=label)
    ax.set_xticks(range(len(fsts)), [f"FST {f}" for f in fsts])
    ax.set_xlim(-0.6, len(fsts) + 0.6)
    ax.set_ylim(-90, 90)
    ax.set_ylabel("ITA° (healthy skin)")
    ax.set_title("Skin tone per requested Fitzpatrick type", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
