"""The three feature networks the metrics share, built from local files only, and the images fed to them.

pytorch-fid's Inception-v3 (`pt_inception-2015-12-05`), LPIPS with an AlexNet backbone, and a CLIP model:
no PyPI package ships their weights and nothing here downloads, so a missing file is a DermkohyaError
that says which file and where. torch is imported inside the functions, so importing this module (and
the metric registry) costs nothing where torch is not installed.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya.errors import DermkohyaError

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



@dataclass(frozen=True)
class Weights:
    """Where each network's files are: `--inception`, `--lpips`, `--clip`, by default under `--weights`."""

    inception: Path
    lpips: Path
    clip: Path

    @classmethod
    def under(cls, folder: Path, inception: Path | None = None, lpips: Path | None = None, clip: Path | None = None) -> Weights:
        return cls(inception or folder / INCEPTION_FILE, lpips or folder / "lpips", clip or folder / "clip")

    def files(self, network: str) -> list[WeightFile]:
        """The files a network (a metric's `networks` entry) loads from, for the check before anything runs."""
        if network == "inception":
            return [inception_file(self.inception)]
        if network == "lpips":
            return lpips_files(self.lpips)
        if network == "clip":
            return clip_files(self.clip)
        raise ValueError(f"unknown network {network!r}; networks: inception, lpips, clip")


# --- images through the networks ---------------------------------------------------------------------------

BATCH = 32


def load_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _tensor(path: Path, size: int) -> Any:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(load_rgb(path), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]


def _batches(items: list[Any], size: int = BATCH) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def inception_features(net: InceptionFeatures, paths: list[Path]) -> np.ndarray:
    import torch

    return np.concatenate([net(torch.stack([_tensor(p, 299) for p in chunk])) for chunk in _batches(paths)])


def clip_image_features(clip: CLIPEmbedder, paths: list[Path]) -> np.ndarray:
    return np.concatenate([clip.images([load_rgb(p) for p in chunk]) for chunk in _batches(paths)])


def lpips_pairs(net: LPIPSDistance, pairs: list[tuple[Path, Path]], size: int = 256) -> np.ndarray:
    import torch

    out = []
    for chunk in _batches(pairs):
        a = torch.stack([_tensor(x, size) for x, _ in chunk])
        b = torch.stack([_tensor(y, size) for _, y in chunk])
        out.append(net(a, b))
    return np.concatenate(out) if out else np.zeros(0)
