"""Offline evaluation of class-conditional image samples (DiT recipes); nothing is downloaded.

    ImageClassifier           a small CNN trained on the run's own training images: its argmax gives
                              the conditional accuracy of samples, its penultimate layer the features
                              of a Fréchet distance ("FD", FID with this network instead of Inception)
    load_or_train_classifier  trained once per dataset (deterministic, CPU) and cached as a file
    frechet_distance          FD of two feature sets (as pytorch-fid computes it)
    evaluate_samples          {"acc", "fd"} of generated images against real ones
    inception_fid             the usual FID, only when Inception weights are already on this machine
    save_sample_grid          a PNG grid of samples

The FD of this classifier is comparable between runs on the same data (same cached classifier),
not with published FIDs; inception_fid is for that, where its weights exist.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ARCH_VERSION", "TRAIN_RECIPE", "ImageClassifier", "default_cache_dir", "classifier_cache_key", "train_classifier",
    "classifier_cache_path", "load_or_train_classifier", "classifier_features", "frechet_distance", "evaluate_samples",
    "InceptionUnavailable", "find_inception_weights", "inception_fid", "grid_size", "save_sample_grid",
]

# Bump when the classifier's architecture or training recipe changes: old cache files then no
# longer match any key and are retrained.
ARCH_VERSION = 1
FEATURE_DIM = 64  # FD features: few enough that a few hundred samples give a full-rank covariance
_BATCH = 512  # images per forward when extracting features
# How the classifier is trained (part of the cache key): seconds on a CPU for the 8x8 digits.
TRAIN_RECIPE = {"epochs": 10, "batch_size": 64, "lr": 2e-3, "max_steps": 3000, "seed": 0}


# ---------------------------------------------------------------------------------------------
# The classifier


class ImageClassifier(nn.Module):
    """conv 3x3 -> conv 3x3 stride 2 -> pool to 4x4 -> linear (features, F = 64) -> linear (logits)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32,
                 feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(4)  # any image size -> 4x4 (8x8 digits: already 4x4)
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        # Filled in by load_or_train_classifier:
        self.val_accuracy: float | None = None  # held-out accuracy at training time
        self.from_cache = False  # True when the weights were loaded rather than trained now
        self.cache_path: str | None = None
        self.cache_key: str | None = None

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """[B, F] penultimate activations, before the ReLU: no dead (constant 0) feature dimension
        to make the FD covariance singular."""
        h = F.relu(self.conv1(x_BCHW))
        h = F.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """[B, num_classes] logits."""
        return self.head(F.relu(self.features(x_BCHW)))


@contextlib.contextmanager
def _one_thread():
    """The classifier's steps are tiny: on shared cores, intra-op threads cost more than they save
    (measured ~20x slower with 2 threads on a busy 2-core machine). The caller's setting comes back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_cpu_images(x_BCHW: torch.Tensor) -> torch.Tensor:
    # Samples may leave [-1, 1] a little; saved images would be clipped, so they are judged clipped.
    return x_BCHW.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)


@torch.no_grad()
def _batched(fn, x_BCHW: torch.Tensor) -> torch.Tensor:
    with _one_thread():
        return torch.cat([fn(x_BCHW[i:i + _BATCH]) for i in range(0, len(x_BCHW), _BATCH)])


@torch.no_grad()
def classifier_features(classifier: ImageClassifier, x_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, F] float64 features of images in [-1, 1] (on any device; computed on the CPU)."""
    classifier.eval()
    return _batched(classifier.features, _as_cpu_images(x_BCHW)).double()


@torch.no_grad()
def _accuracy(classifier: ImageClassifier, x_BCHW: torch.Tensor, labels_B: torch.Tensor) -> float:
    classifier.eval()
    pred_B = _batched(classifier, _as_cpu_images(x_BCHW)).argmax(-1)
    return float((pred_B == labels_B.to("cpu")).double().mean())


@torch.enable_grad()  # callers evaluate under no_grad; training needs autograd regardless
def train_classifier(images_NCHW: torch.Tensor, labels_N: torch.Tensor, num_classes: int, *,
                     epochs: int = TRAIN_RECIPE["epochs"], batch_size: int = TRAIN_RECIPE["batch_size"],
                     lr: float = TRAIN_RECIPE["lr"], max_steps: int = TRAIN_RECIPE["max_steps"],
                     seed: int = TRAIN_RECIPE["seed"]) -> ImageClassifier:
    """A fresh ImageClassifier trained with Adam on (images, labels); deterministic for a seed."""
    # A private RNG state: training the classifier in the middle of a run must not move the run's
    # own random stream (dropout, noise, timesteps), or evaluation would change the training.
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        model = ImageClassifier(images_NCHW.shape[1], images_NCHW.shape[-1], num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        x_NCHW, y_N = _as_cpu_images(images_NCHW), labels_N.to("cpu", torch.int64)
        steps_per_epoch = math.ceil(len(x_NCHW) / batch_size)
        # Large datasets get fewer epochs: a bounded cost (max_steps) at evaluation time.
        epochs = max(1, min(epochs, max_steps // max(steps_per_epoch, 1)))
        total, step = epochs * steps_per_epoch, 0
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_NCHW), generator=gen)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                for group in opt.param_groups:  # cosine to 0: the last steps settle the weights
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(x_NCHW[idx]), y_N[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> str:
    root = os.environ.get("SPARSEFORGE_CACHE")
    if root:
        return os.path.join(os.path.expanduser(root), "classifiers")
    return os.path.join(os.path.expanduser("~"), ".cache", "sparseforge", "classifiers")


def _checksum(images_NCHW: torch.Tensor, labels_N: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images_NCHW.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(labels_N.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def classifier_cache_key(identity: dict) -> str:
    """sha256 of the identity (dataset, image geometry, classes, architecture and training recipe)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _identity(source: str, train, val, checksum: str, num_classes: int, train_kwargs: dict) -> dict:
    images_NCHW = train[0]
    return {"source": source, "num_train": len(images_NCHW), "num_val": len(val[0]) if val else 0,
            "train_sha256": checksum, "image_size": int(images_NCHW.shape[-1]),
            "in_channels": int(images_NCHW.shape[1]), "num_classes": int(num_classes),
            "arch_version": ARCH_VERSION, "feature_dim": FEATURE_DIM, "train": train_kwargs}


def _write_atomic(write, path: str) -> None:
    """write(binary file) into a temporary file of our own in the same directory, then rename:
    concurrent ranks or runs never read a half-written file nor rename each other's."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_cached(path: str, key: str, identity: dict) -> ImageClassifier | None:
    """The cached classifier, or None (warning once) when the file is unreadable or not this key."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != key:
            raise ValueError(f"it holds key {str(blob.get('key'))[:16]}, not {key[:16]}")
        model = ImageClassifier(identity["in_channels"], identity["image_size"], identity["num_classes"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, foreign: retrain, never fail evaluation
        first = (str(e).strip().splitlines() or [""])[0]
        warnings.warn(f"classifier cache {path} is unreadable ({type(e).__name__}: {first}); retraining",
                      stacklevel=3)
        return None
    model.val_accuracy = blob.get("val_accuracy")
    model.eval()
    return model


@dataclass
class _Plan:
    """What load_or_train_classifier trains on, and where the result is cached."""
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int
    source: str
    recipe: dict
    identity: dict
    key: str
    path: str


def _plan(data, cache_dir, val, num_classes, source, train_kwargs) -> _Plan:
    if hasattr(data, "train_images"):  # ImageData
        train, val = data.train_images(), data.val_images()
        num_classes = data.num_classes
        source = data.source or source
        checksum = data.fingerprint
    else:
        train = (data[0], data[1])
        checksum = _checksum(*train)
        if num_classes is None:
            num_classes = max(int(train[1].max()), int(val[1].max()) if val else -1) + 1
    unknown = sorted(set(train_kwargs) - set(TRAIN_RECIPE))
    if unknown:
        raise TypeError(f"load_or_train_classifier: unknown training option(s) {', '.join(unknown)} "
                        f"(known: {', '.join(TRAIN_RECIPE)})")
    recipe = {**TRAIN_RECIPE, **train_kwargs}
    identity = _identity(source, train, val, checksum, num_classes, recipe)
    key = classifier_cache_key(identity)
    path = os.path.join(cache_dir or default_cache_dir(), f"classifier-{key[:24]}.pt")
    return _Plan(train, val, num_classes, source, recipe, identity, key, path)


def classifier_cache_path(data, cache_dir: str | None = None, *, val=None, num_classes: int | None = None,
                          source: str = "tensors", **train_kwargs) -> str:
    """The file load_or_train_classifier reads or writes for these arguments (nothing is trained)."""
    return _plan(data, cache_dir, val, num_classes, source, train_kwargs).path


def load_or_train_classifier(data, cache_dir: str | None = None, *, val=None, num_classes: int | None = None,
                             source: str = "tensors", verbose: bool = False, **train_kwargs) -> ImageClassifier:
    """The classifier of a dataset: loaded from cache_dir when trained before, else trained and cached.

    data: an ImageData (trained on its train split, accuracy measured on its val split) or a tuple
    (images [N, C, H, W] in [-1, 1], labels [N]) with `val` an optional held-out (images, labels).
    The file is cache_dir/classifier-<key>.pt, key = classifier_cache_key(dataset identity:
    source, sizes, sha256 of the training images and labels, image size, channels, classes,
    ARCH_VERSION, training recipe). cache_dir: $SPARSEFORGE_CACHE/classifiers or
    ~/.cache/sparseforge/classifiers. train_kwargs override TRAIN_RECIPE. The result is in eval
    mode on the CPU and has .val_accuracy, .from_cache, .cache_path and .cache_key.
    """
    plan = _plan(data, cache_dir, val, num_classes, source, train_kwargs)
    model = _load_cached(plan.path, plan.key, plan.identity) if os.path.exists(plan.path) else None
    if model is not None:
        model.from_cache = True
    else:
        model = train_classifier(*plan.train, plan.num_classes, **plan.recipe)
        model.val_accuracy = _accuracy(model, *plan.val) if plan.val is not None and len(plan.val[0]) else None
        blob = {"key": plan.key, "identity": json.dumps(plan.identity, sort_keys=True),
                "state_dict": model.state_dict(), "val_accuracy": model.val_accuracy}
        _write_atomic(lambda f: torch.save(blob, f), plan.path)
    model.cache_path, model.cache_key = plan.path, plan.key
    if verbose:
        acc = "n/a" if model.val_accuracy is None else f"{model.val_accuracy:.2%}"
        how = "loaded from" if model.from_cache else "trained, cached in"
        print(f"eval classifier ({plan.source}): held-out accuracy {acc}; {how} {plan.path}", flush=True)
    return model


# ---------------------------------------------------------------------------------------------
# Fréchet distance and sample metrics


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets [N, F] (N >= 2 each):
    |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½), computed as pytorch-fid does."""
    from scipy import linalg

    def stats(f):
        f = f.detach().cpu().double().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, dtype=np.float64)
        f = f.reshape(len(f), -1)
        if len(f) < 2:
            raise ValueError(f"frechet_distance: need at least 2 feature vectors per set, got {len(f)}")
        return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))

    mu_a, sigma_a = stats(feats_a)
    mu_b, sigma_b = stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    diff = mu_a - mu_b
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all() or (np.iscomplexobj(covmean)
                                          and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)):
        # A singular product (fewer samples than features): sqrtm of the nearby regular matrix.
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives the square root of a PSD product tiny imaginary parts; large ones mean
        # the statistics are broken (as pytorch-fid, refuse rather than report a wrong number).
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                             f"in sqrtm(S_a S_b); feature statistics are degenerate")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)  # a distance: a tiny negative value is round-off of identical statistics


def evaluate_samples(samples_BCHW: torch.Tensor, labels_B: torch.Tensor, classifier: ImageClassifier,
                     reference_BCHW: torch.Tensor) -> dict[str, float]:
    """{"acc": share of samples the classifier assigns to their requested label,
    "fd": Fréchet distance between classifier features of the samples and of the reference images}."""
    if len(samples_BCHW) != len(labels_B):
        raise ValueError(f"evaluate_samples: {len(samples_BCHW)} samples but {len(labels_B)} labels")
    expected = (classifier.in_channels, classifier.image_size, classifier.image_size)
    for name, x in (("samples", samples_BCHW), ("reference", reference_BCHW)):
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"evaluate_samples: {name} are {tuple(x.shape[1:])}, the classifier takes {expected}")
    return {"acc": _accuracy(classifier, samples_BCHW, labels_B),
            "fd": frechet_distance(classifier_features(classifier, samples_BCHW),
                                   classifier_features(classifier, reference_BCHW))}


# ---------------------------------------------------------------------------------------------
# Inception FID, only from weights already on disk


class InceptionUnavailable(UserWarning):
    """inception_fid was skipped: no Inception network can be built without a download."""


# (package that defines the network, weight file name in the torch hub cache, as they download it)
_INCEPTION_WEIGHTS = (
    ("pytorch_fid", "pt_inception-2015-12-05-6726825d.pth"),  # the TF FID Inception: published numbers
    ("torchvision", "inception_v3_google-0cc3c7bd.pth"),  # ImageNet Inception-v3: close, not identical
)


def find_inception_weights() -> tuple[str | None, str | None, str]:
    """(package, weights path, message): the first usable Inception, or (None, None, why not: one line)."""
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    missing = []
    for package, name in _INCEPTION_WEIGHTS:
        path = os.path.join(checkpoints, name)
        has_package = importlib.util.find_spec(package) is not None
        has_tv = package == "torchvision" or importlib.util.find_spec("torchvision") is not None
        if has_package and has_tv and os.path.isfile(path):
            return package, path, f"inception FID: {package} with {path}"
        lacks = [x for x, ok in ((f"the {package} package", has_package), ("torchvision", has_tv),
                                 (path, os.path.isfile(path))) if not ok]
        missing.append(f"{package} needs {' and '.join(dict.fromkeys(lacks))}")
    return None, None, f"inception FID skipped (nothing is downloaded): {'; '.join(missing)}"


class _FirstOutput(nn.Module):
    """pytorch-fid's InceptionV3 returns a list of [B, 2048, 1, 1] blocks: the first, flat."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0].flatten(1)


def _inception_network(package: str, path: str) -> tuple[nn.Module, bool]:
    """(network mapping [B, 3, H, W] to [B, 2048], whether it takes [0, 1] rather than [-1, 1])."""
    if package == "pytorch_fid":
        from pytorch_fid.inception import InceptionV3

        # Its weights come through torch.hub's load_state_dict_from_url, which reads the file
        # found above from the hub cache instead of downloading it.
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
        return _FirstOutput(net).eval(), True
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.fc = nn.Identity()  # the 2048-d pool features
    resize = nn.Upsample(size=(299, 299), mode="bilinear", align_corners=False)
    return nn.Sequential(resize, net).eval(), False  # Google's Inception takes [-1, 1] itself


def inception_fid(samples_BCHW: torch.Tensor, reference_BCHW: torch.Tensor, batch_size: int = 50,
                  device: str | torch.device = "cpu") -> float | None:
    """FID with Inception pool features when the weights are already on this machine, else None
    with an InceptionUnavailable warning naming the missing file (never downloads)."""
    package, path, message = find_inception_weights()
    if package is None:
        warnings.warn(message, InceptionUnavailable, stacklevel=2)
        return None
    net, unit_range = _inception_network(package, path)
    net.to(device)

    @torch.no_grad()
    def feats(x_BCHW):
        out = []
        for i in range(0, len(x_BCHW), batch_size):
            x = _as_cpu_images(x_BCHW[i:i + batch_size]).to(device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB
            out.append(net((x + 1) / 2 if unit_range else x).double().cpu())
        return torch.cat(out)

    return frechet_distance(feats(samples_BCHW), feats(reference_BCHW))


# ---------------------------------------------------------------------------------------------
# Sample grid


_CAPTION = 12  # pixels of the label strip above each tile


def grid_size(num: int, image_size: int, nrow: int = 10, scale: int | None = None, labels: bool = False,
              pad: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of save_sample_grid's PNG."""
    scale = scale or max(1, 32 // image_size)
    tile = image_size * scale
    caption = _CAPTION if labels else 0
    cols, rows = min(nrow, num), math.ceil(num / nrow)
    return cols * (tile + pad) + pad, rows * (tile + caption + pad) + pad


def save_sample_grid(samples_BCHW: torch.Tensor, path: str, nrow: int = 10,
                     labels: torch.Tensor | Sequence[int] | None = None, scale: int | None = None) -> str:
    """Write samples (in [-1, 1], clipped) as a PNG grid of nrow tiles per row, each upscaled
    (nearest) by scale (default: to at least 32 px) with its label above it when given; atomic.
    Returns the path."""
    from PIL import Image, ImageDraw

    x = _as_cpu_images(samples_BCHW)
    B, C, H, W = x.shape
    if C not in (1, 3):
        raise ValueError(f"save_sample_grid: images need 1 or 3 channels, got {C}")
    if labels is not None and len(labels) != B:
        raise ValueError(f"save_sample_grid: {B} samples but {len(labels)} labels")
    scale = scale or max(1, 32 // H)
    pad, caption = 2, _CAPTION if labels is not None else 0
    width, height = grid_size(B, H, nrow, scale, labels is not None, pad)
    pixels_BHWC = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, nrow)
        left, top = pad + c * (W * scale + pad), pad + r * (H * scale + caption + pad)
        tile = Image.fromarray(pixels_BHWC[i, :, :, 0] if C == 1 else pixels_BHWC[i]).convert("RGB")
        grid.paste(tile.resize((W * scale, H * scale), Image.NEAREST), (left, top + caption))
        if labels is not None:
            draw.text((left + 1, top), str(int(labels[i])), fill=(0, 0, 0))
    _write_atomic(lambda f: grid.save(f, format="PNG"), path)
    return path
