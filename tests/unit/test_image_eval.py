"""trainer.diffusion.image_eval: cached digits classifier, Fréchet distance, sample metrics, Inception guard, grids."""
import os
import warnings

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from trainer.config import DataConfig
from trainer.diffusion.image_data import build_image_data
from trainer.diffusion.classifier import (FEATURE_DIM, classifier_cache_path, classifier_features, default_cache_dir,
                                         load_or_train_classifier)
from trainer.diffusion.image_eval import (InceptionUnavailable, evaluate_samples, find_inception_weights,
                                          frechet_distance, grid_size, inception_fid, save_sample_grid)


def _digits(image_size=8):
    return build_image_data(DataConfig(source="digits"), ModelConfig(family="dit", image_size=image_size), 16)


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """(classifier, cache_dir): trained once for the module in a private cache."""
    cache = str(tmp_path_factory.mktemp("classifiers"))
    return load_or_train_classifier(digits, cache), cache


def _small(n=200):
    # A quick tuple dataset (1 epoch) for the cache mechanics: training takes a fraction of a second.
    data = _digits()
    x, y = data.train_images()
    return x[:n], y[:n]


# --------------------------------------------------------------------------- classifier + cache


def test_classifier_accuracy_and_features(trained, digits):
    clf, cache = trained
    assert not clf.from_cache and clf.val_accuracy >= 0.95
    assert os.path.isfile(clf.cache_path) and os.path.dirname(clf.cache_path) == cache
    x, _ = digits.val_images()
    feats = classifier_features(clf, x[:7])
    assert feats.shape == (7, FEATURE_DIM) and feats.dtype == torch.float64
    assert clf(x[:7]).shape == (7, 10)


def test_classifier_is_cached(trained, digits):
    clf, cache = trained
    mtime = os.stat(clf.cache_path).st_mtime_ns
    again = load_or_train_classifier(digits, cache)
    assert again.from_cache and again.cache_path == clf.cache_path
    assert again.val_accuracy == clf.val_accuracy
    assert os.stat(clf.cache_path).st_mtime_ns == mtime  # read, not rewritten
    for (k, a), b in zip(clf.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert [f for f in os.listdir(cache) if f.endswith(".tmp")] == []


def test_cache_key_follows_the_data(digits, tmp_path, monkeypatch):
    base = classifier_cache_path(digits, str(tmp_path))
    assert base == classifier_cache_path(digits, str(tmp_path))
    assert classifier_cache_path(_digits(image_size=16), str(tmp_path)) != base  # image size
    assert classifier_cache_path(digits, str(tmp_path), epochs=3) != base  # training recipe
    x, y = digits.train_images()
    shifted = x.clone()
    shifted[0, 0, 0, 0] += 0.5
    assert classifier_cache_path((x, y), str(tmp_path)) != classifier_cache_path((shifted, y), str(tmp_path))
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path / "sf"))
    assert default_cache_dir() == str(tmp_path / "sf" / "classifiers")
    assert os.path.dirname(classifier_cache_path(digits)) == str(tmp_path / "sf" / "classifiers")
    monkeypatch.delenv("SPARSEFORGE_CACHE")
    assert default_cache_dir().endswith(os.path.join(".cache", "sparseforge", "classifiers"))


def test_corrupt_cache_is_retrained_with_a_warning(tmp_path):
    data = _small()
    rng_before = torch.get_rng_state()
    first = load_or_train_classifier(data, str(tmp_path), epochs=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    assert not first.from_cache and first.val_accuracy is None  # no held-out set given
    with open(first.cache_path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable.*retraining"):
        second = load_or_train_classifier(data, str(tmp_path), epochs=1)
    assert not second.from_cache
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)  # deterministic training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_or_train_classifier(data, str(tmp_path), epochs=1).from_cache  # repaired


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_identical_shifted_and_1d_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a.numpy(), a.clone())) < 1e-6
    near, far = frechet_distance(a, a + 0.1), frechet_distance(a, a + 1.0)
    assert abs(near - 16 * 0.01) < 1e-6 and abs(far - 16.0) < 1e-6  # a shift adds |shift|² only
    # 1-D: FD = (mu1 - mu2)² + s1² + s2² - 2 s1 s2, with the same (unbiased) variances as np.cov.
    x = np.random.default_rng(1).normal(0.5, 2.0, size=(400, 1))
    z = np.random.default_rng(2).normal(-1.0, 0.5, size=(300, 1))
    m1, m2, s1, s2 = x.mean(), z.mean(), x.std(ddof=1), z.std(ddof=1)
    expected = (m1 - m2) ** 2 + s1 ** 2 + s2 ** 2 - 2 * s1 * s2
    assert frechet_distance(x, z) == pytest.approx(expected, rel=1e-9)
    # With many samples, close to the FD of the true Gaussians: 1.5² + (2 - 0.5)².
    big_x = np.random.default_rng(3).normal(0.5, 2.0, size=(50_000, 1))
    big_z = np.random.default_rng(4).normal(-1.0, 0.5, size=(50_000, 1))
    assert frechet_distance(big_x, big_z) == pytest.approx(4.5, rel=0.05)
    # Fewer samples than features (singular covariances) still gives a finite, non-negative value.
    assert np.isfinite(frechet_distance(a[:8], a[8:16] + 1.0))


def test_evaluate_samples_real_vs_noise(trained, digits):
    clf, _ = trained
    train_x, _ = digits.train_images()
    val_x, val_y = digits.val_images()
    real = evaluate_samples(val_x, val_y, clf, train_x)
    noise_x = torch.rand(90, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = evaluate_samples(noise_x, val_y, clf, train_x)
    assert real["acc"] >= 0.95 and noise["acc"] <= 0.3
    assert real["fd"] > 0 and noise["fd"] > 10 * real["fd"]
    # Right images, wrong requested labels: features unchanged, accuracy at chance.
    wrong = evaluate_samples(val_x, (val_y + 1) % 10, clf, train_x)
    assert wrong["acc"] <= 0.1 and wrong["fd"] == pytest.approx(real["fd"], rel=1e-6)
    with pytest.raises(ValueError, match="classifier takes"):
        evaluate_samples(torch.zeros(2, 3, 8, 8), val_y[:2], clf, train_x)


# --------------------------------------------------------------------------- Inception guard


def test_inception_fid_is_none_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    package, path, message = find_inception_weights()
    if package is not None:  # pragma: no cover - only where weights and packages are installed
        pytest.skip(f"Inception available: {message}")
    assert "\n" not in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path) in message and "nothing is downloaded" in message
    x = torch.zeros(4, 1, 8, 8)
    with pytest.warns(InceptionUnavailable, match="inception_v3_google"):
        assert inception_fid(x, x) is None
    assert os.listdir(tmp_path) == []  # nothing was fetched


# --------------------------------------------------------------------------- sample grid


@pytest.mark.parametrize("with_labels", [False, True])
def test_save_sample_grid_png(tmp_path, with_labels):
    from PIL import Image

    samples = torch.full((20, 1, 8, 8), -1.0)
    samples[0] = 1.0  # the first tile white, the rest black
    samples[1] = 3.0  # out of range: clipped to white
    labels = torch.arange(20) % 10 if with_labels else None
    path = save_sample_grid(samples, str(tmp_path / "sub" / "grid.png"), nrow=10, labels=labels)
    assert path == str(tmp_path / "sub" / "grid.png")
    caption = 12 if with_labels else 0
    assert grid_size(20, 8, nrow=10, labels=with_labels) == (10 * 34 + 2, 2 * (34 + caption) + 2)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == grid_size(20, 8, nrow=10, labels=with_labels)
        top = 2 + caption
        assert img.getpixel((2 + 16, top + 16)) == (255, 255, 255)  # tile 0
        assert img.getpixel((2 + 34 + 16, top + 16)) == (255, 255, 255)  # tile 1, clipped
        assert img.getpixel((2 + 2 * 34 + 16, top + 16)) == (0, 0, 0)  # tile 2
    assert os.listdir(tmp_path / "sub") == ["grid.png"]  # no temporary file left
    rgb = save_sample_grid(torch.zeros(3, 3, 16, 16), str(tmp_path / "rgb.png"), nrow=2, scale=1)
    with Image.open(rgb) as img:
        assert img.size == (2 * 18 + 2, 2 * 18 + 2) and img.getpixel((2, 2)) == (128, 128, 128)
