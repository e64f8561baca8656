"""One training run of the utility study: a timm classifier trained on one arm's images with one seed, and
its probabilities on the held-out images, kept as a record so an interrupted study resumes per seed.

Why timm: the two architectures the literature on synthetic dermatology data uses (ResNet-18,
EfficientNet-B0) with one call, and pretrained weights from a local file only (`--weights`; nothing is
downloaded): without one the network starts from scratch, which on a small dataset measures little.
Deterministic on the CPU for a seed (data order, flips, initialisation all seeded); on a GPU cuDNN is
put in deterministic mode, and bf16 autocast may still differ in the last bits between GPU models.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dermkohya.errors import DermkohyaError
from dermkohya.records import Record
from dermkohya.utility.data import Item

MODELS = ("resnet18", "efficientnet_b0")


class SeedRun(Record):
    """What one (arm, seed) training run produced; reused when the study's fingerprint is unchanged."""

    KIND: ClassVar[str] = "utility-seed"
    REMEDY: ClassVar[str] = "delete it and rerun `dermkohya utility` (that seed is trained again)"

    fingerprint: str
    arm: str
    seed: int
    heldout: list[str]
    probs: list[list[float]]
    train_images: int
    epochs: int
    losses: list[float]
    seconds: float
    device: str


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    model: str = "resnet18"
    weights: Path | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    image_size: int = 224
    workers: int = 0


def create_model(options: TrainOptions, classes: int) -> Any:
    """A timm model with `classes` outputs; backbone weights from `options.weights` (its classifier is dropped)."""
    import timm

    if options.model not in timm.list_models():
        raise DermkohyaError(f"--model {options.model!r}: not a timm architecture; use {' or '.join(MODELS)} (or any name `timm.list_models()` gives)")
    if options.weights is None:
        return timm.create_model(options.model, pretrained=False, num_classes=classes)
    if not Path(options.weights).is_file():
        raise DermkohyaError(f"--weights {options.weights}: no such file; give a local {options.model} state dict (.safetensors or .pth) or leave it out to train from scratch")
    try:
        return timm.create_model(options.model, pretrained=True, num_classes=classes,
                                 pretrained_cfg_overlay={"file": str(options.weights), "num_classes": 1000})
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DermkohyaError(f"--weights {options.weights}: not a {options.model} state dict ({str(exc).splitlines()[0][:200]}); "
                             f"give weights of that architecture or another --model") from exc


class _Images:
    """A torch dataset over image files: resized (shorter side) and centre-cropped; training adds flips."""

    def __init__(self, items: list[Item] | list[Path], size: int, mean: tuple[float, ...], std: tuple[float, ...], train: bool) -> None:
        self.paths = [i.path if isinstance(i, Item) else i for i in items]
        self.labels = [i.label if isinstance(i, Item) else -1 for i in items]
        self.size, self.train = size, train
        self.mean, self.std = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch
        from PIL import Image, ImageOps

        with Image.open(self.paths[i]) as im:
            im = ImageOps.fit(im.convert("RGB"), (self.size, self.size), Image.Resampling.BILINEAR)
        x = (np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0 - self.mean) / self.std
        tensor = torch.from_numpy(np.ascontiguousarray(x))
        if self.train:
            flips = torch.rand(2)
            if flips[0] < 0.5:
                tensor = tensor.flip(2)
            if flips[1] < 0.5:
                tensor = tensor.flip(1)
        return tensor, self.labels[i]


def _seed_everything(seed: int) -> Any:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def train_and_predict(train: list[Item], heldout: list[Item], classes: int, options: TrainOptions, seed: int, device: str) -> tuple[np.ndarray, list[float]]:
    """Train from `seed`, return (held-out probabilities (n, classes), mean loss per epoch)."""
    import torch
    from torch.utils.data import DataLoader

    generator = _seed_everything(seed)
    model = create_model(options, classes).to(device)
    config = model.pretrained_cfg
    mean, std = config.get("mean", (0.485, 0.456, 0.406)), config.get("std", (0.229, 0.224, 0.225))
    loader = DataLoader(_Images(train, options.image_size, mean, std, True), batch_size=options.batch_size, shuffle=True,
                        generator=generator, num_workers=options.workers, drop_last=len(train) > options.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, options.epochs * len(loader)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    losses = []
    for _ in range(options.epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        losses.append(round(total / max(count, 1), 5))
    model.eval()
    out = []
    held = DataLoader(_Images(heldout, options.image_size, mean, std, False), batch_size=options.batch_size, num_workers=options.workers)
    with torch.no_grad():
        for x, _ in held:
            with autocast:
                logits = model(x.to(device))
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.float64), losses


def run_seed(record_path: Path, fingerprint: str, arm: str, seed: int, train: list[Item], heldout: list[Item], classes: int,
             options: TrainOptions, device: str) -> SeedRun:  # fmt: skip
    """The record of (arm, seed): read back when it exists with this fingerprint, trained and written otherwise."""
    if record_path.is_file():
        done = SeedRun.read(record_path)
        if done.fingerprint == fingerprint:
            return done
        raise DermkohyaError(f"{record_path}: made by a study with other inputs or settings; give another --name, "
                             f"or delete {record_path.parent} to start this one afresh")
    start = time.monotonic()
    probs, losses = train_and_predict(train, heldout, classes, options, seed, device)
    run = SeedRun(fingerprint=fingerprint, arm=arm, seed=seed, heldout=[str(i.path) for i in heldout],
                  probs=[[round(float(v), 6) for v in row] for row in probs], train_images=len(train),
                  epochs=options.epochs, losses=losses, seconds=round(time.monotonic() - start, 2), device=device)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    run.write(record_path)
    return run
