"""metrics: the maths proved on known cases (numpy only: these run where torch is not installed), the
registry, and the networks on small random-weight files (no real weights; skipped without torch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from _imports import heavy_imports
from PIL import Image

from dermkohya import metrics
from dermkohya.errors import DermkohyaError
from dermkohya.metrics import maths, networks, quality, registry
from dermkohya.metrics.base import Column, Metric

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install -e '.[ml]')")


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields (uint8), unlike each other but natural enough for a perceptual hash."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BICUBIC)) for c in coarse])


def random_features(images: np.ndarray, dim: int = 16, seed: int = 0) -> np.ndarray:
    """A small random two-layer feature extractor on 4×4 colour means: deterministic and nonlinear, like
    Inception's pool features, in numpy."""
    rng = np.random.default_rng(seed)
    n, size = len(images), images.shape[1]
    x = (images.astype(np.float64) / 255).reshape(n, 4, size // 4, 4, size // 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    w1, w2 = rng.normal(size=(x.shape[1], 32)), rng.normal(size=(32, dim)) / np.sqrt(32)
    return np.tanh(np.tanh(x @ w1 - w1.sum(axis=0) / 2) @ w2)


# --- the quality filter ------------------------------------------------------------------------------------


def test_phash_separates_near_duplicates_from_different_images() -> None:
    images = random_images(6, size=64)
    noisy = np.clip(images[0].astype(int) + np.random.default_rng(1).integers(-6, 7, images[0].shape), 0, 255).astype(np.uint8)
    h = [quality.phash(im) for im in images]
    assert quality.hamming(h[0], h[0]) == 0
    assert quality.hamming(h[0], quality.phash(noisy)) <= 4
    assert min(quality.hamming(a, b) for i, a in enumerate(h) for b in h[i + 1 :]) > 10
    assert quality.hamming(0b1011, 0b0110) == 3 and 0 <= h[0] < 2**64


def test_image_problems_names_blank_and_exposure() -> None:
    grey = np.full((16, 16, 3), 128, np.uint8)
    white = np.full((16, 16, 3), 255, np.uint8)
    black = np.zeros((16, 16, 3), np.uint8)
    half_white = random_images(1, 16)[0].copy()
    half_white[:, :10] = 255
    kw = {"min_std": 0.02, "max_clipped": 0.5}
    assert quality.image_problems(grey, **kw) == ["blank"]
    assert quality.image_problems(white, **kw) == ["blank", "overexposed"]
    assert quality.image_problems(black, **kw) == ["blank", "underexposed"]
    assert quality.image_problems(half_white, **kw) == ["overexposed"]
    assert quality.image_problems(random_images(1, 16)[0], **kw) == []


# --- FID ---------------------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric() -> None:
    x = random_features(random_images(200, seed=1))
    y = random_features(random_images(200, seed=2))
    assert abs(maths.fid(x, x)) < 1e-6
    assert maths.fid(x, y) > 0
    assert maths.fid(x, y) == pytest.approx(maths.fid(y, x), rel=1e-6)


def test_frechet_distance_matches_the_closed_form_for_gaussians() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)  # diagonal covariances commute
    assert maths.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(closed, rel=1e-9)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    assert maths.frechet_distance(mu1, sigma, mu1, 4 * sigma) == pytest.approx(np.trace(sigma), rel=1e-8)  # (1-2)² Tr Σ
    # from samples: the estimate converges to the closed form
    x = rng.normal(size=(40000, 5)) * s1 + mu1
    y = rng.normal(size=(40000, 5)) * s2 + mu2
    assert maths.fid(x, y) == pytest.approx(closed, rel=0.03)


def test_frechet_distance_agrees_with_pytorch_fid(tmp_path: Path) -> None:
    """The same number as pytorch-fid's own calculate_frechet_distance (scipy sqrtm) on real-shaped stats."""
    calculate_frechet_distance = pytest.importorskip("pytorch_fid.fid_score").calculate_frechet_distance  # imports torch

    x = random_features(random_images(300, seed=6), dim=64)
    y = random_features(random_images(300, seed=7), dim=64) * 1.1 + 0.01
    ours = maths.frechet_distance(*maths.gaussian_stats(x), *maths.gaussian_stats(y))
    theirs = calculate_frechet_distance(*maths.gaussian_stats(x), *maths.gaussian_stats(y))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)


def test_fid_in_sample_space_equals_the_covariance_route() -> None:
    """Fewer images than dimensions (small cells): the nuclear-norm form gives the covariance form's value."""
    x = random_features(random_images(20, seed=8), dim=64)
    y = random_features(random_images(30, seed=9), dim=64) * 1.2
    assert maths.fid(x, y) == pytest.approx(maths.frechet_distance(*maths.gaussian_stats(x), *maths.gaussian_stats(y)), rel=1e-6)
    assert abs(maths.fid(x, x)) < 1e-6


# --- KID ---------------------------------------------------------------------------------------------------


def test_mmd_estimator_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(1, 1, size=(5, 3))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a, b) for a in x for b in y) / 30
    assert maths.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_where_the_biased_estimator_is_not() -> None:
    """Same distribution on both sides: the unbiased MMD² averages to zero even at n = 10, while the
    V-statistic (diagonals kept) is clearly positive — so the test can tell the two apart."""
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(10, 8)), rng.normal(size=(10, 8))
        unbiased.append(maths.mmd2_unbiased(x, y))
        kxx, kyy, kxy = (x @ x.T / 8 + 1) ** 3, (y @ y.T / 8 + 1) ** 3, (x @ y.T / 8 + 1) ** 3
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(len(biased))


def test_kid_separates_distributions_and_is_reproducible() -> None:
    same_a = random_features(random_images(60, seed=3))
    same_b = random_features(random_images(60, seed=4))
    other = random_features(np.clip(random_images(60, seed=5).astype(int) + 80, 0, 255).astype(np.uint8))
    near, _ = maths.kid(same_a, same_b, subsets=50, subset_size=30)
    far, far_std = maths.kid(same_a, other, subsets=50, subset_size=30)
    assert far > near and far > 3 * far_std
    assert maths.kid(same_a, other, subsets=10, subset_size=20, seed=7) == maths.kid(same_a, other, subsets=10, subset_size=20, seed=7)


# --- CLIP statistics ---------------------------------------------------------------------------------------


def test_cosine_statistics() -> None:
    e = np.eye(3)
    assert maths.mean_pairwise_cosine_distance(e) == pytest.approx(1.0)
    assert maths.mean_pairwise_cosine_distance(np.ones((4, 3))) == pytest.approx(0.0, abs=1e-12)
    assert maths.mean_pairwise_cosine_distance(np.ones((1, 3))) is None
    assert maths.clip_scores(np.array([[1.0, 0], [1, 0]]), np.array([[2.0, 0], [-1, 0]])).tolist() == [100.0, 0.0]
    best, sims = maths.nearest_neighbours(np.array([[1.0, 0.1], [0, 1]]), np.array([[0, 2.0], [3, 0]]))
    assert best.tolist() == [1, 0] and sims[1] == pytest.approx(1.0)


# --- the registry -------------------------------------------------------------------------------------------


def test_registry_finds_every_metric_file_in_table_order() -> None:
    assert [m.name for m in registry.all_metrics()] == ["fid", "kid", "lpips", "clip_score", "clip_diversity", "skin_tone", "rejection", "memorisation"]
    assert registry.skip_names() == ("fid", "lpips", "clip", "skin_tone", "memorisation")  # before the registry: all but skin_tone
    assert registry.row_keys() == [
        "fid", "fid_ci", "kid", "kid_std", "kid_ci", "lpips_to_real", "lpips_to_real_ci", "lpips_diversity", "clip_score",
        "clip_score_real", "clip_score_ci", "clip_diversity", "clip_diversity_real", "ita_median", "ita_median_real",
        "ita_agreement", "rejection_rate", "memorised",
    ]  # fmt: skip
    for metric in registry.all_metrics():
        assert metric.help and metric.columns and set(metric.networks) <= {"inception", "lpips", "clip"}, metric.name
    assert "fid (fid, kid)" in registry.skip_help() and "memorisation." in registry.skip_help()
    assert callable(metrics.fid) and callable(metrics.kid)  # no metric file shadows a function of the package


def test_register_refuses_a_name_or_column_key_that_is_taken() -> None:
    class Twin(Metric):
        name, skip, help, position = "twin", "twin", "x", 99
        columns = (Column("fid", "again"),)

    with pytest.raises(ValueError, match="column key\\(s\\) fid already belong"):
        registry.register(Twin())
    Twin.name, Twin.columns = "kid", (Column("twin", "twin"),)
    with pytest.raises(ValueError, match="'kid' is registered twice"):
        registry.register(Twin())
    assert "twin" not in registry.row_keys()


def test_the_metrics_and_the_filter_import_no_torch() -> None:
    """The registry, the maths and the filter load without torch (scipy only for the perceptual hash)."""
    code = "from dermkohya.metrics import registry; from dermkohya import metrics, evaluate; registry.all_metrics()"
    assert heavy_imports(code, ("torch", "torchvision", "transformers")) == []


# --- the networks, built from random-weight files ----------------------------------------------------------


def save_random_inception(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    net = networks.build_fid_inception()
    for module in net.modules():  # torchvision skips init: keep activations at scale through 90+ layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(1.0)
    torch.save(net.state_dict(), path)
    return path


def save_random_lpips(folder: Path) -> Path:
    import torch
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    torch.save(features, folder / networks.ALEXNET_FILE)
    return folder


def save_tiny_clip(folder: Path, tokenizer_cache: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from dermkohya import basemodel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "vocab_size": basemodel.CLIP_VOCAB_SIZE, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(str(folder))
    cache = basemodel.build_tokenizer_cache(tokenizer_cache)
    CLIPTokenizer.from_pretrained(str(cache / basemodel.CLIP_L_TOKENIZER_ID.replace("/", "_"))).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@needs_torch
def test_inception_from_a_local_file_gives_2048_features(tmp_path: Path) -> None:
    import torch

    net = networks.load_inception(save_random_inception(tmp_path / networks.INCEPTION_FILE))
    images = torch.from_numpy(random_images(3, 64)).permute(0, 3, 1, 2).float() / 255
    features = net(images)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    assert np.array_equal(net(images), features)
    assert networks.load_inception(tmp_path).net is not None  # a folder holding the file works too


@needs_torch
def test_lpips_of_an_image_with_itself_is_zero(tmp_path: Path) -> None:
    import torch

    folder = save_random_lpips(tmp_path / "lpips")
    lp = networks.load_lpips(folder)
    stored = torch.load(folder / networks.ALEXNET_FILE)
    assert torch.equal(lp.model.net.slice1._modules["0"].weight, stored["features.0.weight"])
    assert torch.equal(lp.model.net.slice5._modules["10"].weight, stored["features.10.weight"])
    x = torch.from_numpy(random_images(4, 64, seed=1)).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(random_images(4, 64, seed=2)).permute(0, 3, 1, 2).float() / 255
    assert np.allclose(lp(x, x), 0.0, atol=1e-7)
    d = lp(x, y)
    assert (d > 0).all() and np.allclose(d, lp(y, x), rtol=1e-5)


@needs_torch
def test_clip_from_a_local_folder(tmp_path: Path) -> None:
    clip = networks.load_clip(save_tiny_clip(tmp_path / "clip", tmp_path / "tok"))
    pictures = [Image.fromarray(im) for im in random_images(3, 48)]
    images = clip.images(pictures)
    texts = clip.texts(["melanoma on Fitzpatrick skin type VI", "nevus"])
    assert images.shape == (3, 16) and texts.shape == (2, 16)
    scores = maths.clip_scores(images[:2], texts)
    assert ((scores >= 0) & (scores <= 100)).all()
    assert maths.mean_pairwise_cosine_distance(clip.images([pictures[0]] * 3)) == pytest.approx(0.0, abs=1e-6)


@needs_torch
def test_missing_weight_files_are_named_with_where_they_go(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match=rf"{tmp_path}/{networks.INCEPTION_FILE}: missing — pytorch-fid's FID Inception-v3 weights"):
        networks.load_inception(tmp_path)
    with pytest.raises(DermkohyaError, match=rf"lpips/{networks.ALEXNET_FILE}: missing — torchvision's ImageNet AlexNet weights"):
        networks.load_lpips(tmp_path / "lpips")
    with pytest.raises(DermkohyaError, match=r"clip/config.json: missing — a CLIP model saved with transformers"):
        networks.load_clip(tmp_path / "clip")
    (tmp_path / "wrong.pth").write_bytes(b"not a state dict")
    with pytest.raises(DermkohyaError, match="not the FID Inception weights"):
        networks.load_inception(tmp_path / "wrong.pth")
