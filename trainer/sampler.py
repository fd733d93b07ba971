"""The data order shared by text windows (trainer/lm/data.py), mixtures (trainer/lm/mixture.py)
and images (trainer/diffusion/image_data.py): a fixed train/validation split, then one
deterministic stream of training samples, cut into global micro-batches over the data-parallel
ranks.

The stream: position i is item perm_e[i mod N] of epoch e = i // N, where perm_e is a permutation
of the N training items seeded by (seed, e). Global micro-batch k is positions [k*G, (k+1)*G) of
the stream (G = micro_batch_size * dp_size) and rank r takes positions [k*G + r*B, k*G + (r+1)*B).
The stream depends on (seed, N) only, as Megatron's consumed-samples sampler: a run resumed with
another dp size, micro-batch size or accumulation continues the same stream from the same sample
(an optimizer step of the same global batch sees the same samples). A global micro-batch that
straddles an epoch boundary may hold an item twice; within an epoch no item repeats.
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
        self.consumed_samples = 0  # stream positions handed out so far (by every rank alike)
        self.last_positions = range(0)  # this rank's stream positions of the batch taken last
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            # (seed, epoch) as a seed sequence: seed 1 epoch 0 never repeats seed 0 epoch 1. The
            # same order as rng.permutation(N), shuffled in place as int32 (half the memory of a
            # corpus-sized int64 permutation, and no int64 copy on the way).
            perm = np.arange(self.num_items, dtype=np.int32 if self.num_items < 2 ** 31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1]

    def items(self, start: int, count: int) -> np.ndarray:
        """Item indices at stream positions [start, start + count) (across epoch boundaries)."""
        out, pos, end = [], start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_items)
            take = min(end - pos, self.num_items - offset)
            out.append(self._epoch_perm(epoch)[offset:offset + take])
            pos += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def global_batch(self, n: int) -> np.ndarray:
        """Item indices of global micro-batch n of this run's G (all ranks together)."""
        return self.items(n * self.global_batch_size, self.global_batch_size)

    @property
    def consumed(self) -> int:
        """Global micro-batches of this run's G handed out so far."""
        return self.consumed_samples // self.global_batch_size

    @property
    def rank_rows(self) -> slice:
        """This rank's rows of a global micro-batch."""
        B = self.micro_batch_size
        return slice(self.dp_rank * B, (self.dp_rank + 1) * B)

    def take(self) -> tuple[int, np.ndarray]:
        """(first stream position, this rank's item indices) of the next global micro-batch, which
        counts as handed out from here on; `last_positions` then says where its rows sit."""
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        self.consumed_samples += self.global_batch_size
        self.last_positions = range(first, first + self.micro_batch_size)
        return first, self.items(first, self.micro_batch_size)

    def val_indices(self, batch: int, num_val: int) -> np.ndarray:
        """This rank's slice of validation batch `batch`: items in order, wrapping."""
        start = batch * self.global_batch_size + self.dp_rank * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size) % num_val

    def state_dict(self, count_key: str) -> dict:
        return {"consumed_samples": self.consumed_samples, "global_micro_batches": self.consumed,
                "global_batch_size": self.global_batch_size, "seed": self.seed, count_key: self.num_items}

    def load_state_dict(self, state: dict, count_key: str) -> None:
        # Exact resume needs the same stream: same items (corpus, tokenizer, seq_len or images)
        # and seed. G may differ (another dp size or micro-batch size): the stream goes on from
        # the same sample.
        if "seed" not in state or count_key not in state:
            raise ConfigError(f"data: the checkpoint's data state is not of this data source (keys "
                              f"{', '.join(sorted(state))}); data.source, data.mix or data.streaming changed")
        saved, here = (state["seed"], state[count_key]), (self.seed, self.num_items)
        if saved != here:
            raise ConfigError(
                f"data: checkpoint data state (seed, training {self.noun}) = {saved} does not match this run's "
                f"{here}; train.seed or data.* changed")
        consumed = state.get("consumed_samples")
        if consumed is None:  # written before the stream was per sample: whole global batches
            consumed = int(state["global_micro_batches"]) * int(state["global_batch_size"])
        self.consumed_samples = int(consumed)
