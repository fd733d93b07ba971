"""Tokenizers: byte-level by default (no files, no downloads), or a local Hugging Face one.

Both expose the same small surface the data pipeline needs:
`vocab_size`, `eos_id`, `encode(text) -> np.ndarray`, `encode_batch(texts) -> list[np.ndarray]`,
`decode(ids) -> str`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Sequence

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.datasets_io import one_line

HF_EXTRA_HINT = "pip install sparseforge[hf]"


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 ends a document (and doubles as padding)."""

    eos_id = 256
    pad_id = 256
    vocab_size = 257  # ids actually used: 256 bytes + eos; fits the tiny model's 260

    def encode(self, text: str) -> np.ndarray:
        # One C-level copy instead of a Python object per byte: the stdlib corpus is ~8 MB.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        # Special ids are not text; bytes cut mid-character decode to U+FFFD, not an exception.
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (never from the network)."""

    def __init__(self, path: str):
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"data.tokenizer: {path} needs the transformers package: {HF_EXTRA_HINT}")
        from transformers import AutoTokenizer  # lazy: heavy, and only the `hf` extra has it

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad tokenizer path
            raise ConfigError(f"data.tokenizer: cannot load tokenizer from {path}: {one_line(e)}") from None
        eos = self._tok.eos_token_id
        if eos is None:
            eos = self._tok.sep_token_id  # BERT-style tokenizers mark boundaries with [SEP]
        if eos is None:
            raise ConfigError(f"data.tokenizer: tokenizer at {path} has no eos (or sep) token")
        self.eos_id = int(eos)
        self.pad_id = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)  # includes added tokens, unlike `.vocab_size`

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        # Documents are longer than model_max_length on purpose (we pack them), so no warning.
        out = self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(np.asarray(ids).tolist())


def check_tokenizer_path(data_cfg: DataConfig) -> None:
    """Cheap pre-launch check: "byte", or an existing local directory and the hf extra."""
    spec = data_cfg.tokenizer
    if spec == "byte":
        return
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise ConfigError(f"data.tokenizer: path not found: {spec} (use \"byte\" or a local tokenizer directory)")
    if not os.path.isdir(path):
        raise ConfigError(f"data.tokenizer: expected a tokenizer directory, got a file: {spec}")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"data.tokenizer: {spec} needs the transformers package: {HF_EXTRA_HINT}")


def build_tokenizer(data_cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    check_tokenizer_path(data_cfg)
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    return HFTokenizer(os.path.expanduser(data_cfg.tokenizer))
