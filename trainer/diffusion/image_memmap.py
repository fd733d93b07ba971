"""Prepared image sets, the reading side: the files trainer/diffusion/prepare_images.py writes in the
format of trainer/prepared.py, checked against the recipe, memory-mapped and read row by row.

    DIR/train_images.bin   uint8 [N_train, C, H, W]     DIR/train_labels.bin   int64 [N_train]
    DIR/val_images.bin     uint8 [N_val, C, H, W]       DIR/val_labels.bin     int64 [N_val]

A stored pixel x is the float x / value_max * 2 - 1 (manifest value_max), computed as
x / (value_max / 2) - 1: the very operation of the in-memory decoder (image_source.decode_chunk),
so the rows are bitwise what it gives whenever the stored values are the source's own.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from models.config import ConfigError, ModelConfig
from trainer.prepared import MANIFEST, check_files, read_manifest

KIND = "images"
SPLITS = ("train", "val")
RECIPE_KEYS = ("image_size", "in_channels", "num_classes")  # must equal the model's
_CHUNK = 512  # rows converted at a time when a whole split is materialised


def image_file(split: str) -> str:
    return f"{split}_images.bin"


def label_file(split: str) -> str:
    return f"{split}_labels.bin"


class ImageArray:
    """uint8 images [N, C, H, W] (a read-only np.memmap of a prepared set) read as float32 in
    [-1, 1], only the rows asked for."""

    ndim = 4

    def __init__(self, pixels_NCHW: np.ndarray, value_max: float):
        self.pixels_NCHW, self.value_max = pixels_NCHW, float(value_max)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels_NCHW.shape)

    @property
    def dtype(self):
        return self.pixels_NCHW.dtype

    def __len__(self) -> int:
        return len(self.pixels_NCHW)

    def _to_float(self, x_BCHW: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x_BCHW).to(torch.float32) / (self.value_max / 2) - 1.0

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """float32 [len(idx), C, H, W]: fancy indexing copies just these rows out of the map."""
        return self._to_float(self.pixels_NCHW[np.asarray(idx, dtype=np.int64)])

    def digest(self) -> str:
        """sha256 of the stored bytes and value_max, read a chunk at a time."""
        h = hashlib.sha256(repr(self.value_max).encode())
        for start in range(0, len(self), _CHUNK):
            h.update(np.ascontiguousarray(self.pixels_NCHW[start:start + _CHUNK]))
        return h.hexdigest()

    def materialise(self) -> torch.Tensor:
        """The whole array as float32 [N, C, H, W] (evaluation asked for all of it), in chunks."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for start in range(0, len(self), _CHUNK):
            out[start:start + _CHUNK] = self._to_float(np.array(self.pixels_NCHW[start:start + _CHUNK]))
        return out


def check_recipe(path: str, manifest: dict, model_cfg: ModelConfig, key: str = "data.source") -> None:
    """The set's resolution, channels and classes are the model's (one line naming both values)."""
    for name in RECIPE_KEYS:
        have, want = manifest.get(name), getattr(model_cfg, name)
        if have != want:
            raise ConfigError(f"{key}: {path} was prepared with {name}={have}, the recipe has model.{name}={want} "
                              f"(prepare the images again for this recipe)")


def _check_layout(path: str, manifest: dict, key: str) -> None:
    """The manifest's counts, geometry, dtype and file sizes agree (a hand-edited manifest would
    otherwise map the wrong shapes)."""
    missing = [k for k in (*RECIPE_KEYS, "value_max", "dtype", "splits", "files") if k not in manifest]
    if missing:
        raise ConfigError(f"{key}: {path}/{MANIFEST} lacks {', '.join(missing)} (prepare the images again)")
    if manifest["dtype"] != "uint8":
        raise ConfigError(f"{key}: {path}/{MANIFEST} has dtype {manifest['dtype']!r}; image sets are uint8")
    value_max = manifest["value_max"]
    if not isinstance(value_max, (int, float)) or not 0 < value_max <= 255:
        raise ConfigError(f"{key}: {path}/{MANIFEST} has value_max={value_max!r}; want a number in (0, 255]")
    row = manifest["in_channels"] * manifest["image_size"] ** 2
    for split in SPLITS:
        n = manifest["splits"].get(split, {}).get("images")
        for name, width in ((image_file(split), row), (label_file(split), 8)):
            listed = manifest["files"].get(name, {}).get("bytes")
            if not isinstance(n, int) or n < 1 or listed != n * width:
                raise ConfigError(f"{key}: {path}/{MANIFEST} lists {name} with {listed} bytes for {n} {split} "
                                  f"images of {width} bytes each (prepare the images again)")


def check_prepared_images(path: str, model_cfg: ModelConfig | None, checksums: bool = True,
                          key: str = "data.source") -> dict:
    """The manifest of a finished prepared image set that fits the recipe (when model_cfg is given),
    its files present with their sizes (and sha256 when `checksums`); one-line ConfigError otherwise."""
    manifest = read_manifest(path, key, kind=KIND)
    _check_layout(path, manifest, key)
    if model_cfg is not None:  # before the checksums: a wrong resolution is told without reading the shards
        check_recipe(path, manifest, model_cfg, key)
    check_files(path, manifest, key, checksums=checksums)
    return manifest


def prepared_fingerprint(manifest: dict) -> str:
    """sha256 of the training split as the manifest names it (its files' sha256 and how they read):
    the data part of cache keys, without reading the pixels."""
    body = {name: manifest["files"][name]["sha256"] for name in (image_file("train"), label_file("train"))}
    body.update({k: manifest[k] for k in (*RECIPE_KEYS, "value_max")})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def open_prepared_images(path: str, model_cfg: ModelConfig) -> tuple[dict, dict[str, tuple[ImageArray, np.ndarray]]]:
    """(manifest, {split: (images, labels int64 [N] memmap)}), read-only maps: nothing is loaded.
    Sizes are checked (cheap); checksums are the launcher's preflight (data.verify_checksums)."""
    manifest = check_prepared_images(path, model_cfg, checksums=False)
    directory = os.path.expanduser(path)
    C, S = manifest["in_channels"], manifest["image_size"]
    splits = {}
    for split in SPLITS:
        n = manifest["splits"][split]["images"]
        pixels = np.memmap(os.path.join(directory, image_file(split)), dtype=np.uint8, mode="r", shape=(n, C, S, S))
        labels = np.memmap(os.path.join(directory, label_file(split)), dtype="<i8", mode="r", shape=(n,))
        splits[split] = (ImageArray(pixels, manifest["value_max"]), labels)
    return manifest, splits
