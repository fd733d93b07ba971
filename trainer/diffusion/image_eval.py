"""Offline evaluation of class-conditional image samples (DiT recipes); nothing is downloaded.

    frechet_distance          FD of two feature sets (as pytorch-fid computes it)
    evaluate_samples          {"acc", "fd"} of generated images against real ones
    inception_fid             the usual FID, only when Inception weights are already on this machine
    save_sample_grid          a PNG grid of samples

The classifier whose features the FD uses is trainer/diffusion/classifier.py. Its FD is comparable between runs on the same data (same cached classifier),
not with published FIDs; inception_fid is for that, where its weights exist.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from trainer.atomic import write_atomic
from trainer.diffusion.classifier import ImageClassifier, accuracy, as_cpu_images, classifier_features

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
    return {"acc": accuracy(classifier, samples_BCHW, labels_B),
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
            x = as_cpu_images(x_BCHW[i:i + batch_size]).to(device)
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

    x = as_cpu_images(samples_BCHW)
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
    return write_atomic(path, lambda f: grid.save(f, format="PNG"))
