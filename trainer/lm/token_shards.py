"""Reading prepared token data (trainer/lm/prepare.py writes it): one split of a prepared directory
as one virtual 1-D token array over memory-mapped shards, and the checks of a prepared directory
against a recipe (the launcher's preflight runs them before any rank starts).

Nothing is read until a window asks for it: np.memmap maps the shards, and a window copies only
its own seq_len + 1 tokens, so a rank's resident memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.prepared import check_files, read_manifest

KIND = "tokens"
# Files of a Hugging Face tokenizer directory that decide how text becomes ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
BYTE_IDENTITY = "byte-utf8-eos256"


def tokenizer_identity(spec: str) -> str:
    """What makes two tokenizers the same: "byte", or the sha256 of a directory's tokenizer files."""
    if spec == "byte":
        return BYTE_IDENTITY
    root = os.path.expanduser(spec)
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return "sha256:" + h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenArray:
    """A 1-D token tensor in memory (today's path) behind the interface of `TokenShards`."""

    def __init__(self, tokens):
        self.tokens = tokens
        self._np = tokens.numpy()
        self.num_tokens = tokens.numel()

    def read(self, start: int, length: int) -> np.ndarray:
        return self._np[start:start + length]

    def whole(self) -> np.ndarray:
        return self._np


class TokenShards:
    """Split `split` ("train" | "val") of a prepared directory as one virtual token array."""

    def __init__(self, directory: str, manifest: dict, split: str):
        info = manifest["splits"][split]
        self.dtype = np.dtype(manifest["dtype"])
        self.maps = [np.memmap(os.path.join(directory, shard["file"]), dtype=self.dtype, mode="r",
                               shape=(shard["tokens"],)) for shard in info["shards"]]
        self.starts = np.cumsum([0] + [shard["tokens"] for shard in info["shards"]])
        self.num_tokens = int(self.starts[-1])
        self.num_documents = int(info["documents"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) (a copy, across shard boundaries)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.num_tokens}")
        out, pos, end = [], start, start + length
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            take = min(end, int(self.starts[k + 1])) - pos
            local = pos - int(self.starts[k])
            out.append(self.maps[k][local:local + take])
            pos += take
            k += 1
        return np.concatenate(out) if len(out) > 1 else np.array(out[0])

    def whole(self) -> np.ndarray:
        """Every token of the split in memory as int32 (the in-memory path's dtype): for small
        splits and tests only."""
        return self.read(0, self.num_tokens).astype(np.int32)


def prepared_manifest(data_cfg: DataConfig, path: str, key: str = "data.source") -> dict:
    """The manifest of a prepared token directory, checked against the recipe's data section:
    the same tokenizer (identity and vocabulary) and the same validation fraction."""
    manifest = read_manifest(path, key, kind=KIND)
    tok = manifest["tokenizer"]
    here = tokenizer_identity(data_cfg.tokenizer)
    if tok["identity"] != here:
        raise ConfigError(f"{key}: {path} was prepared with tokenizer {tok['spec']!r}, not data.tokenizer="
                          f"{data_cfg.tokenizer!r} ({'other files' if tok['spec'] == data_cfg.tokenizer else 'another tokenizer'}); "
                          f"prepare it again with this recipe")
    if manifest["val_fraction"] != data_cfg.val_fraction:
        raise ConfigError(f"{key}: {path} was split with val_fraction {manifest['val_fraction']}, the recipe has "
                          f"data.val_fraction={data_cfg.val_fraction} (the split is fixed when preparing)")
    return manifest


def check_prepared_tokens(data_cfg: DataConfig, path: str, vocab_size: int | None, key: str = "data.source") -> dict:
    """Preflight of one prepared directory: manifest, recipe match, every shard's size and
    (data.verify_checksums) sha256, and the vocabulary against model.vocab_size."""
    manifest = prepared_manifest(data_cfg, path, key)
    check_files(path, manifest, key, checksums=data_cfg.verify_checksums)
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab_size is not None and vocab > vocab_size:
        raise ConfigError(f"{key}: {path} has a vocabulary of {vocab:,} ids, more than model.vocab_size={vocab_size:,}")
    return manifest
