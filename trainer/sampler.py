"""The data order shared by text windows (trainer/lm/data.py) and images
(trainer/diffusion/image_data.py): a fixed train/validation split, then deterministic, resumable
global micro-batches cut over the data-parallel ranks.

Epoch e visits the N training items in a permutation seeded by (seed, e), cut into N // G global
micro-batches of G = micro_batch_size * dp_size items (the few left over are skipped that epoch,
so no item repeats inside a batch). Rank r takes rows [r*B, (r+1)*B) of each global micro-batch.
The order depends on G only, never on how G is split over ranks.
"""
from __future__ import annotations

import numpy as np

from models.config import ConfigError

SPLIT_SEED = 0  # the train/validation split never depends on train.seed


def split_indices(num_items: int, val_fraction: float, too_few: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, each sorted: the last val_fraction of a fixed permutation. `too_few`:
    the error when num_items cannot be split (formatted with num_items and val_fraction)."""
    num_val = max(1, int(round(num_items * val_fraction)))
    if num_items - num_val < 1:
        raise ConfigError(too_few.format(num_items=num_items, val_fraction=val_fraction))
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_items)
    return np.sort(perm[: num_items - num_val]), np.sort(perm[num_items - num_val:])


class GlobalBatchSampler:
    """Which training items each rank takes at each micro step, and where a resumed run goes on.

    Args:
        num_items: training items (windows, images); at least one global micro-batch.
        noun: what the items are, for error messages ("windows", "images").
    """

    def __init__(self, num_items: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 noun: str = "items"):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.num_items, self.noun = num_items, noun
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.global_batch_size = micro_batch_size * dp_size  # G
        if num_items < self.global_batch_size:
            raise ConfigError(f"data.source: the training split has {num_items} {noun}, fewer than one global "
                              f"micro-batch of {self.global_batch_size} (train.micro_batch_size x dp)")
        self.batches_per_epoch = num_items // self.global_batch_size
        self.consumed = 0  # global micro-batches handed out so far (by every rank alike)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            # (seed, epoch) as a seed sequence: seed 1 epoch 0 never repeats seed 0 epoch 1.
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items))
        return self._perm[1]

    def global_batch(self, n: int) -> np.ndarray:
        """Item indices of global micro-batch n (all ranks together, G of them)."""
        epoch, k = divmod(n, self.batches_per_epoch)
        G = self.global_batch_size
        return self._epoch_perm(epoch)[k * G:(k + 1) * G]

    @property
    def rank_rows(self) -> slice:
        """This rank's rows of a global micro-batch."""
        B = self.micro_batch_size
        return slice(self.dp_rank * B, (self.dp_rank + 1) * B)

    def take(self) -> tuple[int, np.ndarray]:
        """(n, this rank's item indices) of the next global micro-batch n, which counts as handed
        out from here on (after k batches, state_dict() says k)."""
        n = self.consumed
        self.consumed += 1
        return n, self.global_batch(n)[self.rank_rows]

    def val_indices(self, batch: int, num_val: int) -> np.ndarray:
        """This rank's slice of validation batch `batch`: items in order, wrapping."""
        start = batch * self.global_batch_size + self.dp_rank * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size) % num_val

    def state_dict(self, count_key: str) -> dict:
        return {"global_micro_batches": self.consumed, "global_batch_size": self.global_batch_size,
                "seed": self.seed, count_key: self.num_items}

    def load_state_dict(self, state: dict, count_key: str) -> None:
        # Exact resume needs the same order: same items (corpus, tokenizer, seq_len or images),
        # seed and G.
        saved = (state["seed"], state[count_key], state["global_batch_size"])
        here = (self.seed, self.num_items, self.global_batch_size)
        if saved != here:
            raise ConfigError(
                f"data: checkpoint data state (seed, training {self.noun}, global micro-batch) = {saved} does not "
                f"match this run's {here}; train.seed, data.* or train.micro_batch_size x dp changed")
        self.consumed = int(state["global_micro_batches"])
