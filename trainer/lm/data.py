"""Text data: corpus (trainer/lm/corpus.py) -> document split -> tokens -> windows -> rank shards.

Flow on every rank (each rank builds the same thing independently; nothing is downloaded):

    load_corpus        a `datasets.Dataset` with one document per row (trainer/lm/corpus.py)
    split_documents    whole documents held out for validation (fixed seed: same split for any train.seed)
    pack_documents     tokens of each document + eos, one 1-D tensor per split
    TextData           non-overlapping windows of seq_len + 1 tokens, in the sample stream of
                       trainer/sampler.py: global micro-batch k is stream positions [k*G, (k+1)*G)
                       (G = micro_batch_size * dp_size) and rank r takes rows [r*B, (r+1)*B)

A prepared directory (`sparseforge prepare-data`, trainer/lm/prepare.py) holds the same token
streams on disk: TextData then reads windows from memory-mapped shards (trainer/lm/token_shards.py)
and nothing is tokenized at start-up. data.mix samples several of them (trainer/lm/mixture.py).
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig
from trainer.lm.corpus import load_corpus
from trainer.lm.token_shards import TokenArray, TokenShards, prepared_manifest
from trainer.lm.tokenizer import build_tokenizer
from trainer.prepared import looks_prepared
from trainer.sampler import GlobalBatchSampler, split_indices


# ---------------------------------------------------------------------------------------------
# Split, tokenize, pack


def split_documents(num_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices, each sorted: the last val_fraction of a fixed permutation."""
    return split_indices(num_docs, val_fraction, "data.source: {num_items} document(s) cannot be split into train "
                                                 "and validation (data.val_fraction={val_fraction}); give more files "
                                                 "or rows")


def pack_documents(token_arrays: Sequence[np.ndarray], eos_id: int) -> torch.Tensor:
    """Documents' tokens each followed by eos, as one 1-D int32 tensor (int32: 4x smaller than int64)."""
    eos = np.array([eos_id], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for arr in token_arrays:
        pieces.append(arr)
        pieces.append(eos)
    if not pieces:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_numpy(np.concatenate(pieces).astype(np.int32, copy=False))


def tokenize_documents(ds, field: str, tokenizer, indices: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Tokenize the chosen rows of the dataset (in index order) and pack them."""
    arrays: list[np.ndarray] = []
    for start in range(0, len(indices), chunk):
        texts = ds[indices[start:start + chunk].tolist()][field]
        arrays.extend(tokenizer.encode_batch(t or "" for t in texts))  # a null row is an empty doc
    return pack_documents(arrays, tokenizer.eos_id)


def make_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N, seq_len + 1] non-overlapping windows (a view); the tail shorter than a window is dropped."""
    n = tokens.numel() // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].view(n, seq_len + 1)


def unigram_entropy_nats(tokens: torch.Tensor | np.ndarray, vocab_size: int | None = None) -> float:
    """Shannon entropy (nats) of the token frequency distribution: the loss of a unigram model."""
    arr = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    counts = np.bincount(arr.astype(np.int64, copy=False), minlength=vocab_size or 0)
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable data-parallel batches


class TextData:
    """Train/val windows of one run, sharded over data-parallel ranks (trainer/sampler.py).

    Args:
        train_tokens, val_tokens: each split's token stream: a 1-D int tensor in memory, or a
            `TokenShards` over a prepared directory's memory-mapped shards.
        unigram_entropy: of the training tokens, when known (a prepared manifest has it).
    """

    def __init__(self, tokenizer, train_tokens, val_tokens, seq_len: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 unigram_entropy: float | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.seq_len = seq_len
        self.train = train_tokens if isinstance(train_tokens, TokenShards) else TokenArray(train_tokens)
        self.val = val_tokens if isinstance(val_tokens, TokenShards) else TokenArray(val_tokens)
        self.num_train_windows = self.train.num_tokens // (seq_len + 1)  # the short tail is dropped
        self.num_val_windows = self.val.num_tokens // (seq_len + 1)
        for name, n, toks in (("training", self.num_train_windows, self.train),
                              ("validation", self.num_val_windows, self.val)):
            if n == 0:
                raise ConfigError(f"data.seq_len: the {name} split has {toks.num_tokens} tokens, fewer than one "
                                  f"window of data.seq_len+1={seq_len + 1}; use more data or a shorter seq_len")
        self.sampler = GlobalBatchSampler(self.num_train_windows, micro_batch_size, dp_rank, dp_size, seed, "windows")
        self.micro_batch_size, self.global_batch_size = micro_batch_size, self.sampler.global_batch_size
        self._entropy = unigram_entropy
        self.num_train_docs = self.num_val_docs = 0  # set by build_text_data, for the run summary

    @property
    def train_tokens(self) -> torch.Tensor:
        """The whole training stream (in memory: only for the in-memory path and tests)."""
        return torch.from_numpy(np.asarray(self.train.whole()))

    @property
    def val_tokens(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.val.whole()))

    @property
    def num_train_tokens(self) -> int:
        return self.train.num_tokens

    @property
    def num_val_tokens(self) -> int:
        return self.val.num_tokens

    @property
    def unigram_entropy_nats(self) -> float:
        if self._entropy is None:  # computed once, on first use
            self._entropy = unigram_entropy_nats(self.train.whole(), self.vocab_size)
        return self._entropy

    def _batch(self, tokens, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.seq_len + 1
        rows = torch.from_numpy(np.stack([tokens.read(int(k) * W, W) for k in idx]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets), each [micro_batch_size, seq_len] int64, forever, from the saved position."""
        while True:
            _, idx = self.sampler.take()
            yield self._batch(self.train, idx)

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the first num_batches*G validation windows (in order, wrapping)."""
        return [self._batch(self.val, self.sampler.val_indices(b, self.num_val_windows))
                for b in range(num_batches)]

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return self.sampler.state_dict("num_train_windows")

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state, "num_train_windows")


def build_text_data(data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                    seed: int = 0):
    """The one entry point: this rank's batches of a mixture (data.mix), a prepared directory, or
    the corpus tokenized here (tokenizer + corpus + split + packing)."""
    if data_cfg.mix:
        return build_mixture(data_cfg, micro_batch_size, dp_rank, dp_size, seed)
    tokenizer = build_tokenizer(data_cfg)
    if looks_prepared(data_cfg.source):
        return prepared_text_data(data_cfg, data_cfg.source.strip(), tokenizer, micro_batch_size, dp_rank, dp_size,
                                  seed)
    ds = load_corpus(data_cfg)
    train_idx, val_idx = split_documents(len(ds), data_cfg.val_fraction)
    field = data_cfg.text_field
    data = TextData(tokenizer, tokenize_documents(ds, field, tokenizer, train_idx),
                    tokenize_documents(ds, field, tokenizer, val_idx), data_cfg.seq_len,
                    micro_batch_size, dp_rank, dp_size, seed)
    data.num_train_docs, data.num_val_docs = len(train_idx), len(val_idx)
    return data


def prepared_text_data(data_cfg: DataConfig, path: str, tokenizer, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, seed: int = 0, key: str = "data.source") -> TextData:
    """TextData over a prepared directory's memory-mapped shards: nothing tokenized here."""
    manifest = prepared_manifest(data_cfg, path, key)
    directory = os.path.expanduser(path)
    train, val = TokenShards(directory, manifest, "train"), TokenShards(directory, manifest, "val")
    data = TextData(tokenizer, train, val, data_cfg.seq_len, micro_batch_size, dp_rank, dp_size, seed,
                    unigram_entropy=manifest["unigram_entropy_nats"])
    data.num_train_docs, data.num_val_docs = train.num_documents, val.num_documents
    return data


def build_mixture(data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
    """A `MixtureData` (trainer/lm/mixture.py) over the prepared directories of data.mix."""
    from trainer.lm.mixture import MixtureData, mixture_name

    tokenizer = build_tokenizer(data_cfg)
    paths = list(data_cfg.mix)
    parts = [prepared_text_data(data_cfg, path, tokenizer, micro_batch_size, dp_rank, dp_size, seed,
                                key=f"data.mix.{path}") for path in paths]
    names = [mixture_name(p) for p in paths]
    if len(set(names)) != len(names):  # two directories of the same base name: name them by path
        names = paths
    return MixtureData(parts, names, [data_cfg.mix[p] for p in paths], micro_batch_size, dp_rank, dp_size, seed)
