"""Image data (DiT recipes): decoded images (trainer/diffusion/image_source.py) -> split ->
rank shards, in the order of trainer/sampler.py.

    split_examples       whole images held out for validation (fixed seed: same split for any train.seed)
    ImageData            the training images in the sample stream of trainer/sampler.py: global
                         micro-batch k is stream positions [k*G, (k+1)*G) (G = micro_batch_size *
                         dp_size) and rank r takes rows [r*B, (r+1)*B)

The interface is TextData's (trainer/lm/data.py): train_batches(), val_batches(n), state_dict(),
load_state_dict(), global_batch_size; batches are (images_BCHW float32, labels_B int64).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch

from models.config import ModelConfig
from trainer.config import ConfigError, DataConfig
from trainer.diffusion.image_source import dataset_to_tensors, load_image_dataset
from trainer.sampler import SPLIT_SEED, GlobalBatchSampler, split_indices

_FLIP_STREAM = 0x666C6970  # "flip": keeps the flip draws apart from the epoch permutations
_FLIP_BLOCK = 4096  # stream positions per flip draw


def split_examples(num_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, each sorted: the last val_fraction of a fixed permutation."""
    return split_indices(num_examples, val_fraction, "data.val_fraction: {num_items} image(s) cannot be split into "
                                                     "train and validation (data.val_fraction={val_fraction}); give "
                                                     "more images")


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable data-parallel batches


class ImageData:
    """Train/val images of one run, sharded over data-parallel ranks.

    The training images come in the sample stream of trainer/sampler.py (epoch e visits them in
    a permutation seeded by (seed, e); global micro-batch k is stream positions [k*G, (k+1)*G) and
    rank r takes rows [r*B, (r+1)*B) of it). With hflip, the flip of each stream position is drawn
    from (seed, its block of positions): like the order, flips depend on the position only, never
    on how the stream is split over ranks, and a resumed run draws them again identically.
    """

    def __init__(self, train_images_NCHW: torch.Tensor, train_labels_N: torch.Tensor,
                 val_images_NCHW: torch.Tensor, val_labels_N: torch.Tensor, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, hflip: bool = False,
                 num_classes: int | None = None, source: str = ""):
        for name, x, y in (("training", train_images_NCHW, train_labels_N),
                           ("validation", val_images_NCHW, val_labels_N)):
            if x.ndim != 4 or x.dtype != torch.float32 or y.dtype != torch.int64 or len(x) != len(y):
                raise ValueError(f"{name} split: want float32 [N, C, H, W] images and int64 [N] labels, "
                                 f"got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
            if len(x) == 0:
                raise ConfigError(f"data.source: the {name} split of {source or 'the images'} is empty")
        self.train_images_NCHW, self.train_labels_N = train_images_NCHW, train_labels_N
        self.val_images_NCHW, self.val_labels_N = val_images_NCHW, val_labels_N
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.hflip = hflip
        self.in_channels, self.image_size = train_images_NCHW.shape[1], train_images_NCHW.shape[-1]
        self.num_classes = num_classes if num_classes is not None else int(train_labels_N.max()) + 1
        self.source = source
        self.sampler = GlobalBatchSampler(len(train_images_NCHW), micro_batch_size, dp_rank, dp_size, seed, "images")
        self.global_batch_size = self.sampler.global_batch_size  # G: images per global micro-batch
        self._fingerprint: str | None = None

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
        return (f"{self.num_train_examples:,} training / {self.num_val_examples:,} validation images "
                f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes"
                f"{f' ({self.source})' if self.source else ''}{', h-flips' if self.hflip else ''}")

    @property
    def fingerprint(self) -> str:
        """sha256 of the training split (pixels and labels): the data part of cache keys."""
        if self._fingerprint is None:  # computed once, on first use
            h = hashlib.sha256()
            h.update(self.train_images_NCHW.contiguous().numpy().tobytes())
            h.update(self.train_labels_N.contiguous().numpy().tobytes())
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
            images_BCHW, labels_B = self.train_images_NCHW[idx], self.train_labels_N[idx]
            flips_B = torch.from_numpy(self.flips(self.sampler.last_positions))
            if flips_B.any():
                images_BCHW[flips_B] = images_BCHW[flips_B].flip(-1)  # indexing copied: the split is untouched
            yield images_BCHW, labels_B

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the first num_batches*G validation images (in order, wrapping; no flips)."""
        out = []
        for b in range(num_batches):
            idx = torch.from_numpy(self.sampler.val_indices(b, self.num_val_examples))
            out.append((self.val_images_NCHW[idx], self.val_labels_N[idx]))
        return out

    # -- whole splits, for evaluation ---------------------------------------------------------

    def train_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training split: (images [N, C, H, W], labels [N]); shared, do not modify."""
        return self.train_images_NCHW, self.train_labels_N

    def val_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole validation split: (images [N, C, H, W], labels [N]); shared, do not modify."""
        return self.val_images_NCHW, self.val_labels_N

    def real_images(self, n: int | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """n images of a split (all when n is None or more than there are) in a fixed seeded order:
        the same reference set for every evaluation of a run and for every train.seed."""
        images, labels = self.train_images() if split == "train" else self.val_images()
        if n is None or n >= len(images):
            return images, labels
        idx = torch.from_numpy(np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(images))[:n]))
        return images[idx], labels[idx]

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.sampler.state_dict("num_train_examples")

    def load_state_dict(self, state: dict) -> None:
        # data.hflip may change on purpose (augmentation on/off); it does not move the position.
        self.sampler.load_state_dict(state, "num_train_examples")


def build_image_data(data_cfg: DataConfig, model_cfg: ModelConfig, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, seed: int = 0) -> ImageData:
    """The one entry point: source + decoding + split + this rank's batches."""
    ds, value_max = load_image_dataset(data_cfg)
    images_NCHW, labels_N = dataset_to_tensors(
        ds, data_cfg.image_field, data_cfg.label_field, model_cfg.image_size, model_cfg.in_channels,
        model_cfg.num_classes, value_max, source=data_cfg.source)
    train_idx, val_idx = split_examples(len(images_NCHW), data_cfg.val_fraction)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    # Names the images in logs and classifier cache keys (a folder or hub dataset has splits).
    source = "digits" if data_cfg.source.strip() == "digits" else f"{data_cfg.source}:{data_cfg.split}"
    return ImageData(images_NCHW[train_idx], labels_N[train_idx], images_NCHW[val_idx], labels_N[val_idx],
                     micro_batch_size, dp_rank, dp_size, seed, hflip=data_cfg.hflip,
                     num_classes=model_cfg.num_classes, source=source)
