"""Image data (DiT recipes): decoded images (trainer/diffusion/image_source.py) or a prepared,
memory-mapped set (trainer/diffusion/image_memmap.py) -> split -> rank shards, in the order of
trainer/sampler.py.

    split_examples       whole images held out for validation (fixed seed: same split for any train.seed)
    ImageData            the training images in the sample stream of trainer/sampler.py: global
                         micro-batch k is stream positions [k*G, (k+1)*G) (G = micro_batch_size *
                         dp_size) and rank r takes rows [r*B, (r+1)*B)

The interface is TextData's (trainer/lm/data.py): train_batches(), val_batches(n), state_dict(),
load_state_dict(), global_batch_size; batches are (images_BCHW float32, labels_B int64). A prepared
set stays on disk: only the rows of each batch are read and converted to float.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch

from models.config import ModelConfig
from trainer.config import ConfigError, DataConfig
from trainer.diffusion.image_memmap import ImageArray, open_prepared_images, prepared_fingerprint
from trainer.diffusion.image_source import dataset_to_tensors, load_image_dataset
from trainer.prepared import looks_prepared
from trainer.sampler import SPLIT_SEED, GlobalBatchSampler, split_indices

_FLIP_STREAM = 0x666C6970  # "flip": keeps the flip draws apart from the epoch permutations
_FLIP_BLOCK = 4096  # stream positions per flip draw


def split_examples(num_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, each sorted: the last val_fraction of a fixed permutation."""
    return split_indices(num_examples, val_fraction, "data.val_fraction: {num_items} image(s) cannot be split into "
                                                     "train and validation (data.val_fraction={val_fraction}); give "
                                                     "more images")


def source_label(source: str, split: str) -> str:
    """Names the images in logs and classifier cache keys (a folder or hub dataset has splits)."""
    return "digits" if source.strip() == "digits" else f"{source}:{split}"


def _check_split(name: str, x, y, source: str) -> None:
    if isinstance(x, ImageArray):  # a prepared set: uint8 rows, labels int64 (memory-mapped)
        ok = isinstance(y, np.ndarray) and y.dtype == np.int64 and y.ndim == 1
    else:
        ok = x.ndim == 4 and x.dtype == torch.float32 and y.dtype == torch.int64
    if not ok or len(x) != len(y):
        raise ValueError(f"{name} split: want float32 [N, C, H, W] images (or an ImageArray) and int64 [N] "
                         f"labels, got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
    if len(x) == 0:
        raise ConfigError(f"data.source: the {name} split of {source or 'the images'} is empty")


def _gather(images, labels, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows idx of a split as (float32 images, int64 labels): copies, the split is untouched."""
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(images, ImageArray):  # only these rows are read from disk and converted
        return images.rows(idx), torch.from_numpy(np.array(labels[idx]))
    rows = torch.from_numpy(idx)
    return images[rows], labels[rows]


def _whole(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as tensors: the held ones, or a prepared split materialised as float."""
    if isinstance(images, ImageArray):
        return images.materialise(), torch.from_numpy(np.array(labels))
    return images, labels


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable data-parallel batches


class ImageData:
    """Train/val images of one run, sharded over data-parallel ranks.

    The training images come in the sample stream of trainer/sampler.py (epoch e visits them in
    a permutation seeded by (seed, e); global micro-batch k is stream positions [k*G, (k+1)*G) and
    rank r takes rows [r*B, (r+1)*B) of it). With hflip, the flip of each stream position is drawn
    from (seed, its block of positions): like the order, flips depend on the position only, never
    on how the stream is split over ranks, and a resumed run draws them again identically.

    Each split is float32 tensors in memory, or a prepared set: images an ImageArray (uint8,
    memory-mapped) and labels an int64 np.ndarray (memory-mapped), of which every batch reads and
    converts its own rows only. `fingerprint`: given by a prepared set (from its manifest).
    """

    def __init__(self, train_images_NCHW: torch.Tensor | ImageArray, train_labels_N: torch.Tensor | np.ndarray,
                 val_images_NCHW: torch.Tensor | ImageArray, val_labels_N: torch.Tensor | np.ndarray,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, hflip: bool = False,
                 num_classes: int | None = None, source: str = "", fingerprint: str | None = None):
        for name, x, y in (("training", train_images_NCHW, train_labels_N),
                           ("validation", val_images_NCHW, val_labels_N)):
            _check_split(name, x, y, source)
        self.train_images_NCHW, self.train_labels_N = train_images_NCHW, train_labels_N
        self.val_images_NCHW, self.val_labels_N = val_images_NCHW, val_labels_N
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.hflip = hflip
        self.in_channels, self.image_size = train_images_NCHW.shape[1], train_images_NCHW.shape[-1]
        self.num_classes = num_classes if num_classes is not None else int(train_labels_N.max()) + 1
        self.source = source
        self.sampler = GlobalBatchSampler(len(train_images_NCHW), micro_batch_size, dp_rank, dp_size, seed, "images")
        self.global_batch_size = self.sampler.global_batch_size  # G: images per global micro-batch
        self._fingerprint = fingerprint

    # -- summary ------------------------------------------------------------------------------

    @property
    def num_train_examples(self) -> int:
        return len(self.train_images_NCHW)

    @property
    def num_val_examples(self) -> int:
        return len(self.val_images_NCHW)

    num_train, num_val = num_train_examples, num_val_examples  # short names (the run summary uses them)

    def summary(self) -> str:
        """One line for the run log."""
        mapped = isinstance(self.train_images_NCHW, ImageArray)
        return (f"{self.num_train_examples:,} training / {self.num_val_examples:,} validation images "
                f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes"
                f"{f' ({self.source})' if self.source else ''}{', memory-mapped' if mapped else ''}"
                f"{', h-flips' if self.hflip else ''}")

    @property
    def fingerprint(self) -> str:
        """sha256 of the training split (pixels and labels; a prepared set's: of its files' sha256
        in the manifest): the data part of cache keys."""
        if self._fingerprint is None:  # computed once, on first use
            images, h = self.train_images_NCHW, hashlib.sha256()
            h.update(images.digest().encode() if isinstance(images, ImageArray) else
                     images.contiguous().numpy().tobytes())
            h.update(np.ascontiguousarray(self.train_labels_N).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- batches ------------------------------------------------------------------------------

    def flips(self, positions: range) -> np.ndarray:
        """bool [len(positions)]: which stream positions are flipped (all False without hflip),
        drawn per block of _FLIP_BLOCK positions from (seed, block): a position's flip does not
        depend on the batch layout."""
        if not self.hflip:
            return np.zeros(len(positions), dtype=bool)
        out = np.zeros(len(positions), dtype=bool)
        for i, pos in enumerate(positions):
            block, offset = divmod(pos, _FLIP_BLOCK)
            if i == 0 or offset == 0:
                draws = np.random.default_rng([self.seed, block, _FLIP_STREAM]).random(_FLIP_BLOCK) < 0.5
            out[i] = draws[offset]
        return out

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, C, H, W] float32 in [-1, 1], labels [B] int64), forever, from the saved position."""
        while True:
            _, idx = self.sampler.take()
            images_BCHW, labels_B = _gather(self.train_images_NCHW, self.train_labels_N, idx)
            flips_B = torch.from_numpy(self.flips(self.sampler.last_positions))
            if flips_B.any():
                images_BCHW[flips_B] = images_BCHW[flips_B].flip(-1)  # indexing copied: the split is untouched
            yield images_BCHW, labels_B

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the first num_batches*G validation images (in order, wrapping; no flips)."""
        out = []
        for b in range(num_batches):
            idx = self.sampler.val_indices(b, self.num_val_examples)
            out.append(_gather(self.val_images_NCHW, self.val_labels_N, idx))
        return out

    # -- whole splits, for evaluation ---------------------------------------------------------

    def train_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training split: (images [N, C, H, W], labels [N]); shared, do not modify. A
        prepared set is materialised as float on every call: prefer real_images(n)."""
        return _whole(self.train_images_NCHW, self.train_labels_N)

    def val_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole validation split: (images [N, C, H, W], labels [N]); as train_images."""
        return _whole(self.val_images_NCHW, self.val_labels_N)

    def real_images(self, n: int | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """n images of a split (all when n is None or more than there are) in a fixed seeded order:
        the same reference set for every evaluation of a run and for every train.seed. Only these
        n are read (and converted) from a prepared set."""
        images, labels = (self.train_images_NCHW, self.train_labels_N) if split == "train" else \
            (self.val_images_NCHW, self.val_labels_N)
        if n is None or n >= len(images):
            return _whole(images, labels)
        return _gather(images, labels, np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(images))[:n]))

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.sampler.state_dict("num_train_examples")

    def load_state_dict(self, state: dict) -> None:
        # data.hflip may change on purpose (augmentation on/off); it does not move the position.
        self.sampler.load_state_dict(state, "num_train_examples")


def build_image_data(data_cfg: DataConfig, model_cfg: ModelConfig, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, seed: int = 0) -> ImageData:
    """The one entry point: source + decoding + split + this rank's batches."""
    if looks_prepared(data_cfg.source):
        return _prepared_image_data(data_cfg, model_cfg, micro_batch_size, dp_rank, dp_size, seed)
    ds, value_max = load_image_dataset(data_cfg)
    images_NCHW, labels_N = dataset_to_tensors(
        ds, data_cfg.image_field, data_cfg.label_field, model_cfg.image_size, model_cfg.in_channels,
        model_cfg.num_classes, value_max, source=data_cfg.source)
    train_idx, val_idx = split_examples(len(images_NCHW), data_cfg.val_fraction)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return ImageData(images_NCHW[train_idx], labels_N[train_idx], images_NCHW[val_idx], labels_N[val_idx],
                     micro_batch_size, dp_rank, dp_size, seed, hflip=data_cfg.hflip,
                     num_classes=model_cfg.num_classes, source=source_label(data_cfg.source, data_cfg.split))


def _prepared_image_data(data_cfg: DataConfig, model_cfg: ModelConfig, micro_batch_size: int, dp_rank: int,
                         dp_size: int, seed: int) -> ImageData:
    """A `sparseforge prepare-data` directory, memory-mapped. Its split, fields and val_fraction are
    the ones it was prepared with (manifest.json), whatever data.split / data.val_fraction say."""
    manifest, splits = open_prepared_images(data_cfg.source, model_cfg)
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    return ImageData(train_x, train_y, val_x, val_y, micro_batch_size, dp_rank, dp_size, seed,
                     hflip=data_cfg.hflip, num_classes=model_cfg.num_classes,
                     source=source_label(manifest["source"], manifest["split"]),
                     fingerprint=prepared_fingerprint(manifest))
