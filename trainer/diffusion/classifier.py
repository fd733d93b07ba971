"""The small CNN that scores class-conditional image samples offline (DiT recipes): trained once
per dataset on the run's own training images (deterministic, CPU) and cached as a file.

Its argmax gives the conditional accuracy of samples; its penultimate layer the features of a
Fréchet distance ("FD", FID with this network instead of Inception): trainer/diffusion/image_eval.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.atomic import write_atomic

# Bump when the classifier's architecture or training recipe changes: old cache files then no
# longer match any key and are retrained.
ARCH_VERSION = 1
FEATURE_DIM = 64  # FD features: few enough that a few hundred samples give a full-rank covariance
_BATCH = 512  # images per forward when extracting features
# How the classifier is trained (part of the cache key): seconds on a CPU for the 8x8 digits.
TRAIN_RECIPE = {"epochs": 10, "batch_size": 64, "lr": 2e-3, "max_steps": 3000, "seed": 0}
# At most this many images of an ImageData's splits (a fixed subset, ImageData.real_images) are
# held as float to train and check the classifier: a prepared set of millions stays on disk, and
# max_steps x batch_size = 192k images is all the training could see anyway.
MAX_TRAIN_IMAGES, MAX_VAL_IMAGES = 50_000, 10_000


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


def as_cpu_images(x_BCHW: torch.Tensor) -> torch.Tensor:
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
    return _batched(classifier.features, as_cpu_images(x_BCHW)).double()


@torch.no_grad()
def accuracy(classifier: ImageClassifier, x_BCHW: torch.Tensor, labels_B: torch.Tensor) -> float:
    classifier.eval()
    pred_B = _batched(classifier, as_cpu_images(x_BCHW)).argmax(-1)
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
        x_NCHW, y_N = as_cpu_images(images_NCHW), labels_N.to("cpu", torch.int64)
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
    if hasattr(data, "train_images"):  # ImageData: all of a split up to the caps, a fixed subset beyond
        train, val = data.real_images(MAX_TRAIN_IMAGES), data.real_images(MAX_VAL_IMAGES, split="val")
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

    data: an ImageData (trained on its train split, accuracy measured on its val split: each up to
    MAX_TRAIN_IMAGES / MAX_VAL_IMAGES, a fixed subset of a larger one) or a tuple
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
        model.val_accuracy = accuracy(model, *plan.val) if plan.val is not None and len(plan.val[0]) else None
        blob = {"key": plan.key, "identity": json.dumps(plan.identity, sort_keys=True),
                "state_dict": model.state_dict(), "val_accuracy": model.val_accuracy}
        write_atomic(plan.path, lambda f: torch.save(blob, f))
    model.cache_path, model.cache_key = plan.path, plan.key
    if verbose:
        acc = "n/a" if model.val_accuracy is None else f"{model.val_accuracy:.2%}"
        how = "loaded from" if model.from_cache else "trained, cached in"
        print(f"eval classifier ({plan.source}): held-out accuracy {acc}; {how} {plan.path}", flush=True)
    return model
