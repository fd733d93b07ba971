"""Data mixtures (data.mix: {prepared directory: weight}): several prepared token datasets sampled
by weight into one deterministic, resumable sample stream.

Position i of the stream draws its dataset from the weights with a generator keyed by (seed,
block of i) (blocks of _BLOCK positions), so the choice of every position is fixed whatever the
batch layout. Within dataset d, its j-th draw takes window j of d's own stream (trainer/sampler.py:
a seeded permutation per epoch of d's windows). The state is the stream position plus how many
draws each dataset has had, so a resume (also under another dp size) continues exactly. The
realised share of each dataset is logged as data/mix/<name>.

Validation interleaves the datasets' validation windows the same way with a fixed generator (not
train.seed): the same validation batches at every evaluation and for every seed.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.sampler import SPLIT_SEED, GlobalBatchSampler

_BLOCK = 4096  # stream positions per dataset draw
_MIX_STREAM = 0x6D6978  # "mix": keeps the draws apart from the epoch permutations


def mixture_name(path: str) -> str:
    """A short name of a mixture entry for logs: its directory's base name."""
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) or path


class MixtureData:
    """The TextData interface over several prepared datasets (`parts`: their TextData objects;
    trainer/lm/data.py::build_mixture builds them)."""

    def __init__(self, parts: list, names: list[str], weights: list[float], micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.parts, self.names = parts, names
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        first = parts[0]
        self.tokenizer, self.vocab_size, self.seq_len = first.tokenizer, first.vocab_size, first.seq_len
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.global_batch_size = micro_batch_size * dp_size
        # Each dataset's own window stream; the layout arguments only fix G (never used to take).
        self.streams = [GlobalBatchSampler(p.num_train_windows, 1, 0, 1, seed + 7919 * (d + 1), "windows")
                        for d, p in enumerate(parts)]
        self.consumed_samples = 0
        self.draws = np.zeros(len(parts), dtype=np.int64)  # draws of each dataset before consumed_samples
        self._block: tuple[int, np.ndarray] | None = None
        self._since_log = np.zeros(len(parts), dtype=np.int64)
        self.num_train_docs = sum(p.num_train_docs for p in parts)
        self.num_val_docs = sum(p.num_val_docs for p in parts)

    # -- summary ------------------------------------------------------------------------------

    @property
    def num_train_tokens(self) -> int:
        return sum(p.num_train_tokens for p in self.parts)

    @property
    def unigram_entropy_nats(self) -> float:
        """The entropy of the weighted mixture of the datasets' unigram distributions is not in
        the manifests; the weighted mean of theirs is a lower bound, reported as the reference."""
        return float(sum(w * p.unigram_entropy_nats for w, p in zip(self.weights, self.parts)))

    def summary(self) -> str:
        return "mixture " + ", ".join(f"{n} {w:.3f} ({p.num_train_windows:,} windows)"
                                      for n, w, p in zip(self.names, self.weights, self.parts))

    # -- the stream ---------------------------------------------------------------------------

    def choices(self, start: int, count: int, seed: int | None = None) -> np.ndarray:
        """The dataset of stream positions [start, start + count)."""
        seed = self.seed if seed is None else seed
        out = np.empty(count, dtype=np.int64)
        pos = start
        while pos < start + count:
            block, offset = divmod(pos, _BLOCK)
            if self._block is None or self._block[0] != (seed, block):
                rng = np.random.default_rng([seed, _MIX_STREAM, block])
                self._block = ((seed, block), rng.choice(len(self.parts), size=_BLOCK, p=self.weights))
            take = min(start + count - pos, _BLOCK - offset)
            out[pos - start:pos - start + take] = self._block[1][offset:offset + take]
            pos += take
        return out

    def _take(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, window) of this rank's rows of the next global micro-batch."""
        G, B = self.global_batch_size, self.micro_batch_size
        ds = self.choices(self.consumed_samples, G)
        # The j-th draw of dataset d overall: draws before this batch + earlier rows of this batch.
        within = np.empty(G, dtype=np.int64)
        for d in range(len(self.parts)):
            rows = np.flatnonzero(ds == d)
            within[rows] = self.draws[d] + np.arange(len(rows))
            self.draws[d] += len(rows)
            self._since_log[d] += len(rows)
        self.consumed_samples += G
        mine = slice(self.dp_rank * B, (self.dp_rank + 1) * B)
        windows = np.array([self.streams[d].items(int(j), 1)[0] for d, j in zip(ds[mine], within[mine])])
        return ds[mine], windows

    def _batch(self, ds: np.ndarray, windows: np.ndarray, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.seq_len + 1
        tokens = [(self.parts[d].train if split == "train" else self.parts[d].val).read(int(k) * W, W)
                  for d, k in zip(ds, windows)]
        rows = torch.from_numpy(np.stack(tokens).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self._batch(*self._take(), "train")

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the first num_batches*G validation positions: datasets drawn by
        weight with a fixed generator, each dataset's validation windows in order, wrapping."""
        G, B = self.global_batch_size, self.micro_batch_size
        ds = self.choices(0, num_batches * G, seed=SPLIT_SEED + _MIX_STREAM)
        within = np.empty_like(ds)
        for d, part in enumerate(self.parts):
            rows = np.flatnonzero(ds == d)
            within[rows] = np.arange(len(rows)) % part.num_val_windows
        out = []
        for b in range(num_batches):
            mine = slice(b * G + self.dp_rank * B, b * G + (self.dp_rank + 1) * B)
            out.append(self._batch(ds[mine], within[mine], "val"))
        return out

    def metrics(self) -> dict[str, float]:
        """The realised share of each dataset in the global batches since the previous call."""
        total = int(self._since_log.sum())
        if total == 0:
            return {}
        out = {f"data/mix/{n}": float(c) / total for n, c in zip(self.names, self._since_log)}
        self._since_log[:] = 0
        return out

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "mix_draws": self.draws.tolist(), "seed": self.seed,
                "mix": {n: [float(w), p.num_train_windows] for n, w, p in zip(self.names, self.weights, self.parts)}}

    def load_state_dict(self, state: dict) -> None:
        here = {n: [float(w), p.num_train_windows] for n, w, p in zip(self.names, self.weights, self.parts)}
        saved = state.get("mix")
        if saved is None or saved != here or state["seed"] != self.seed:
            raise ConfigError(f"data: checkpoint data state (mixture {saved}, seed {state.get('seed')}) does not match "
                              f"this run's (mixture {here}, seed {self.seed}); data.mix, data.* or train.seed changed")
        self.consumed_samples = int(state["consumed_samples"])
        self.draws = np.asarray(state["mix_draws"], dtype=np.int64)
