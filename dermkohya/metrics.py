"""The maths behind the quality filter and the evaluation report, and the three feature networks.

Pure functions on arrays (perceptual hash, exposure, Fréchet distance, KID, cosine statistics) need
only numpy/scipy. The networks — pytorch-fid's Inception-v3 (`pt_inception-2015-12-05`), LPIPS with
an AlexNet backbone, and a CLIP model — are built from local files only: no PyPI package ships their
weights and nothing here downloads, so a missing file is a DermkohyaError that says which file and where.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya.errors import DermkohyaError

# --- image quality (the generation filter) -----------------------------------------------------------------

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


# --- the feature networks (local weights only) -------------------------------------------------------------

# What torch.load and load_state_dict raise for a file that is not the expected state dict.
_UNREADABLE = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_FILE = "alex.pth"


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs: where it was looked for and what it is, for the error message."""

    path: Path
    what: str


def missing_weights(files: list[WeightFile]) -> list[str]:
    return [f"{f.path}: missing — {f.what}" for f in files if not f.path.is_file()]


def inception_file(path: Path) -> WeightFile:
    path = path / INCEPTION_FILE if path.is_dir() else path
    return WeightFile(
        path,
        f"pytorch-fid's FID Inception-v3 weights `{INCEPTION_FILE}` (the `fid_weights` release asset of the "
        f"pytorch-fid project; torch-fidelity uses the same network): copy that file to this path",
    )


def lpips_files(folder: Path) -> list[WeightFile]:
    """LPIPS needs torchvision's ImageNet AlexNet (user-supplied) and the v0.1 linear layers (the `lpips`
    package ships them; a copy in the folder wins)."""
    return [
        WeightFile(
            folder / ALEXNET_FILE,
            f"torchvision's ImageNet AlexNet weights `{ALEXNET_FILE}` (what torchvision caches in "
            "~/.cache/torch/hub/checkpoints/ after models.alexnet(weights='IMAGENET1K_V1')): copy it into this folder",
        )
    ]


def _lpips_lin_path(folder: Path) -> Path:
    local = folder / LPIPS_LIN_FILE
    if local.is_file():
        return local
    from importlib import metadata

    try:
        shipped = Path(str(metadata.distribution("lpips").locate_file("lpips/weights/v0.1/alex.pth")))
    except metadata.PackageNotFoundError:
        shipped = None
    if shipped is None or not shipped.is_file():
        raise DermkohyaError(
            f"{local}: missing — LPIPS v0.1 linear layers `{LPIPS_LIN_FILE}`: `pip install lpips` in dermkohya's "
            "environment (it ships them), or copy lpips/weights/v0.1/alex.pth into this folder"
        )
    return shipped


def build_fid_inception() -> Any:
    """pytorch-fid's FID Inception-v3 (TensorFlow's 2015-12-05 graph, ported), random weights."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


class InceptionFeatures:
    """2048-d pool features as pytorch-fid computes them: bilinear resize to 299, [0,1] → [-1,1],
    the FID Inception blocks up to the final average pool."""

    def __init__(self, net: Any, device: str = "cpu") -> None:
        import torch

        self.device = device
        self.net = net.eval().to(device)
        names = [
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
            "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool",
        ]  # fmt: skip
        self.layers = torch.nn.Sequential(*(getattr(self.net, n) for n in names))

    def __call__(self, images: Any) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = F.interpolate(images.to(self.device, torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
            return self.layers(2 * x - 1).flatten(1).cpu().numpy()


def load_inception(path: Path, device: str = "cpu") -> InceptionFeatures:
    import torch

    file = inception_file(path)
    if problems := missing_weights([file]):
        raise DermkohyaError(problems[0])
    net = build_fid_inception()
    try:
        net.load_state_dict(torch.load(file.path, map_location="cpu", weights_only=True))
    except _UNREADABLE as exc:
        raise DermkohyaError(f"{file.path}: not the FID Inception weights ({str(exc).splitlines()[0]}); {file.what}") from None
    return InceptionFeatures(net, device)


# torchvision AlexNet `features.<i>` → the LPIPS slice holding layer i.
_ALEX_SLICES = {i: s for s, idx in enumerate(((0, 1), (2, 3, 4), (5, 6, 7), (8, 9), (10, 11)), start=1) for i in idx}


class LPIPSDistance:
    """LPIPS v0.1 (AlexNet) from the `lpips` package, with its backbone loaded from a local file."""

    def __init__(self, model: Any, device: str = "cpu") -> None:
        self.device = device
        self.model = model.eval().to(device)

    def __call__(self, a: Any, b: Any) -> np.ndarray:
        """Distances between paired (N, 3, H, W) batches in [0, 1]."""
        import torch

        with torch.inference_mode():
            return self.model(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1).flatten().cpu().numpy()


def build_lpips(alexnet_state: dict[str, Any], lin_path: Path) -> Any:
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=` flag
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, model_path=str(lin_path), verbose=False)
    backbone = {}
    for key, value in alexnet_state.items():
        parts = key.split(".")
        if parts[0] == "features":
            index = int(parts[1])
            backbone[f"slice{_ALEX_SLICES[index]}.{index}.{parts[2]}"] = value
    result = model.net.load_state_dict(backbone, strict=False)
    if result.missing_keys:
        raise ValueError(f"backbone lacks {', '.join(result.missing_keys[:3])}")
    return model.requires_grad_(False)


def load_lpips(folder: Path, device: str = "cpu") -> LPIPSDistance:
    import torch

    files = lpips_files(folder)
    if problems := missing_weights(files):
        raise DermkohyaError(problems[0])
    lin = _lpips_lin_path(folder)
    try:
        state = torch.load(files[0].path, map_location="cpu", weights_only=True)
        model = build_lpips(state, lin)
    except (*_UNREADABLE, KeyError) as exc:
        raise DermkohyaError(f"{files[0].path}: not torchvision AlexNet weights ({str(exc).splitlines()[0]}); {files[0].what}") from None
    return LPIPSDistance(model, device)


CLIP_REQUIRED = ("config.json", "preprocessor_config.json")


def clip_files(folder: Path) -> list[WeightFile]:
    what = (
        "a CLIP model saved with transformers (`CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained`, "
        "e.g. openai/clip-vit-large-patch14): put that folder here"
    )
    files = [WeightFile(folder / name, what) for name in CLIP_REQUIRED]
    if folder.is_dir() and not any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        files.append(WeightFile(folder / "model.safetensors", what))
    return files


class CLIPEmbedder:
    """Image and text embeddings from a local transformers CLIP folder: the towers' pooled outputs through
    the model's own projection heads, spelled out because get_*_features changed its return type in
    transformers 5 (what breaks torchmetrics' CLIPScore there)."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)

    def images(self, pil_images: list[Any]) -> np.ndarray:
        import torch

        pixels = self.processor(images=pil_images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled).cpu().numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            return self.model.text_projection(pooled).cpu().numpy()


def load_clip(folder: Path, device: str = "cpu") -> CLIPEmbedder:
    if problems := missing_weights(clip_files(folder)):
        raise DermkohyaError(problems[0])
    try:
        return CLIPEmbedder(folder, device)
    except (OSError, ValueError) as exc:
        raise DermkohyaError(f"{folder}: not a loadable CLIP folder ({str(exc).splitlines()[0]})") from None
