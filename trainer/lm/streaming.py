"""Streaming text data: an HF iterable dataset read, sharded, tokenized and packed on the fly, resumable per rank.

For corpora too big to prepare first (data.streaming=true). Flow on every rank, nothing held
beyond a bounded buffer:

    open_stream        datasets.load_dataset(..., streaming=True) of a hub name or of the local files
                       that resolve_source lists (trainer/lm/corpus.py), then this rank's share:
                       split_dataset_by_node(rank=dp_rank, world_size=dp_size)
    holdout            document j of this rank's stream (j counted from 0 in every pass) is validation
                       when j % k == k - 1, k = round(1 / data.val_fraction); never trained on
    StreamingTextData  training documents are tokenized `read_docs` at a time and appended (each +
                       eos, as pack_documents) to a token buffer; a micro-batch is the next
                       micro_batch_size x (seq_len + 1) tokens cut into windows (as make_windows).
                       At the end of the rank's stream the next pass starts again at its beginning,
                       in the same order (no shuffle beyond the source's own order).

The position (`state_dict`) is the iterable dataset's own state after the last document read,
the tokens left in the buffer and the counters: a fresh object given it yields the batches the
uninterrupted one would. It is per rank, so it is only valid under the same dp size and rank.
data.max_bytes does not apply: a stream is read whole, pass after pass.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Iterator

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig
from trainer.datasets_io import no_download_count, one_line, quiet_datasets
from trainer.lm.corpus import CorpusSource, resolve_source
from trainer.lm.data import make_windows, pack_documents, unigram_entropy_nats
from trainer.lm.tokenizer import build_tokenizer

READ_DOCS = 32  # training documents tokenized per refill: one encode_batch call, and the bound on texts held
ENTROPY_VAL_BATCHES = 8  # validation batches the entropy estimate reads when no evaluation has yet


def holdout_every(val_fraction: float) -> int:
    """k: every k-th document of a rank's stream is held out for validation."""
    k = round(1 / val_fraction)
    if k < 2:
        raise ConfigError(f"data.val_fraction: {val_fraction} under data.streaming would hold out every document; "
                          "use 0.66 or less")
    return k


def stream_source(data_cfg: DataConfig) -> CorpusSource:
    """What data.source names, for streaming: all listed files (no max_bytes cap); pydoc refused."""
    src = resolve_source(dataclasses.replace(data_cfg, max_bytes=0))
    if src.kind == "pydoc":  # also a config rule; kept here for callers that skip validate
        raise ConfigError("data.streaming: not with data.source=pydoc (a small corpus held in memory); "
                          "use data.streaming=false")
    return src


def import_datasets():
    """HF datasets, or one line where it is not installed (a bare GPU box)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.streaming: needs HF datasets (pip install datasets)") from None
    return datasets


def open_stream(src: CorpusSource, data_cfg: DataConfig, dp_rank: int, dp_size: int):
    """This rank's share of the source as a new IterableDataset: its own iteration state, at the start."""
    datasets = import_datasets()
    from datasets.distributed import split_dataset_by_node

    try:
        # A private throw-away cache (as corpus.py): ranks on one machine never share its lock
        # files, and streaming reads the files themselves, not the cache.
        with quiet_datasets(), tempfile.TemporaryDirectory(prefix="sparseforge-stream-") as cache:
            if src.kind == "hub":  # the shared HF cache, as load_hub; streaming needs the hub online
                ds = datasets.load_dataset(src.name, split=data_cfg.split, streaming=True)
            else:
                kwargs = {"sample_by": "document", "encoding_errors": "replace"} if src.builder == "text" else {}
                with no_download_count():
                    ds = datasets.load_dataset(src.builder, data_files=list(src.files), split="train",
                                               streaming=True, cache_dir=cache, **kwargs)
    except Exception as e:  # noqa: BLE001 - offline hub, unknown name, bad split: one line
        raise ConfigError(f"data.source: cannot stream {data_cfg.source!r}: {one_line(e)}") from None
    return split_dataset_by_node(ds, rank=dp_rank, world_size=dp_size)


class StreamingTextData:
    """Batches of one rank read from a stream, with the interface of TextData (trainer/lm/data.py).

    Memory: at most `read_docs` document texts at once, and a token buffer of fewer than one
    micro-batch of tokens plus the tokens of those documents (`peak_buffered_docs` and
    `peak_buffered_tokens` record the largest seen). Counters are this rank's, since its start.
    """

    def __init__(self, data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, read_docs: int = READ_DOCS):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        import_datasets()  # at start-up, not at the first batch
        self.cfg, self.src = data_cfg, stream_source(data_cfg)
        self.tokenizer = build_tokenizer(data_cfg)
        self.vocab_size, self.seq_len = self.tokenizer.vocab_size, data_cfg.seq_len
        self.micro_batch_size, self.global_batch_size = micro_batch_size, micro_batch_size * dp_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed  # unused: the order is the source's (kept for the TextData signature)
        self.k, self.read_docs = holdout_every(data_cfg.val_fraction), read_docs
        # The text builder names its column "text" whatever data.text_field says (as corpus.py).
        self.column = "text" if self.src.kind == "local" and self.src.builder == "text" else data_cfg.text_field
        # Position: pass number, documents read in this pass, the dataset's state after them.
        self._pass, self._docs_in_pass, self._ds_state = 0, 0, None
        self._tokens = np.zeros(0, dtype=np.int32)  # read, not yet handed out
        self._ds = self._it = None  # this pass's dataset and iterator; opened (and positioned) on the next read
        self.num_batches = self.num_train_tokens = self.num_train_docs = 0
        self.peak_buffered_docs = self.peak_buffered_tokens = 0
        self._val: tuple[int, torch.Tensor, bool, int] | None = None  # (tokens asked, windows, complete, docs)

    # -- reading documents ----------------------------------------------------------------------

    def _text(self, example: dict) -> str:
        if self.column not in example:
            raise ConfigError(f"data.text_field: no column {self.column!r} in {self.cfg.source} "
                              f"(columns: {', '.join(example)})")
        return example[self.column] or ""  # a null row is an empty document, as in data.py

    def _next_example(self, it) -> dict | None:
        """The next row, or None at the end of the stream; a malformed file is one line."""
        try:
            return next(it)
        except StopIteration:
            return None
        except Exception as e:  # noqa: BLE001 - bad json/parquet found mid-stream
            raise ConfigError(f"data.source: cannot read {self.cfg.source!r}: {one_line(e)}") from None

    def _read_training_docs(self, max_docs: int) -> list[str]:
        """Up to max_docs training documents of this rank's stream, passing to the next pass at its end."""
        texts: list[str] = []
        while len(texts) < max_docs:
            if self._it is None:
                ds = open_stream(self.src, self.cfg, self.dp_rank, self.dp_size)
                if self._ds_state is not None:
                    ds.load_state_dict(self._ds_state)
                self._ds, self._it = ds, iter(ds)
            example = self._next_example(self._it)
            if example is None:
                if self._docs_in_pass == 0:
                    raise ConfigError(f"data.source: dp rank {self.dp_rank}'s share of {self.cfg.source} is empty "
                                      f"(dp={self.dp_size}); use more documents or files, or fewer dp ranks")
                # A fresh dataset per pass: a reloaded one would restart from its loaded state.
                self._pass, self._docs_in_pass, self._ds_state, self._it = self._pass + 1, 0, None, None
                continue
            held_out = self._docs_in_pass % self.k == self.k - 1
            self._docs_in_pass += 1
            if not held_out:
                texts.append(self._text(example))
        self._ds_state = self._ds.state_dict()  # after the last document read: what the buffer holds
        return texts

    def _refill(self) -> None:
        texts = self._read_training_docs(self.read_docs)
        self.peak_buffered_docs = max(self.peak_buffered_docs, len(texts))
        packed = pack_documents(self.tokenizer.encode_batch(texts), self.tokenizer.eos_id).numpy()
        self._tokens = np.concatenate([self._tokens, packed])
        self.num_train_docs += len(texts)
        self.peak_buffered_tokens = max(self.peak_buffered_tokens, len(self._tokens))

    # -- the TextData interface -----------------------------------------------------------------

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets), each [micro_batch_size, seq_len] int64, forever, from the saved position."""
        need = self.micro_batch_size * (self.seq_len + 1)
        while True:
            while len(self._tokens) < need:
                self._refill()
            rows = torch.from_numpy(self._tokens[:need].astype(np.int64)).view(self.micro_batch_size, -1)
            self._tokens = self._tokens[need:].copy()  # copy: the next refill's base is not kept alive
            # Counted before the yield: a checkpoint taken while this batch trains starts after it.
            self.num_batches += 1
            self.num_train_tokens += need
            yield rows[:, :-1], rows[:, 1:]

    def _val_windows(self, num_windows: int) -> torch.Tensor:
        """At least num_windows windows (fewer if the stream holds fewer) of this rank's first held-out
        documents, from the start of a fresh stream; cached, so every call sees the same ones."""
        want = num_windows * (self.seq_len + 1)
        if self._val is not None and (self._val[0] >= want or self._val[2]):
            return self._val[1]
        it, arrays, count, docs, j = iter(open_stream(self.src, self.cfg, self.dp_rank, self.dp_size)), [], 0, 0, 0
        complete = False
        while count < want:
            example = self._next_example(it)
            if example is None:
                complete = True
                break
            if j % self.k == self.k - 1:
                arrays.append(self.tokenizer.encode(self._text(example)))
                count += len(arrays[-1]) + 1
                docs += 1
            j += 1
        windows = make_windows(pack_documents(arrays, self.tokenizer.eos_id), self.seq_len)
        if len(windows) == 0:
            raise ConfigError(f"data.seq_len: the validation documents of dp rank {self.dp_rank} hold {count} tokens, "
                              f"fewer than one window of data.seq_len+1={self.seq_len + 1}; use more data, a larger "
                              "data.val_fraction or a shorter seq_len")
        self._val = (want, windows, complete, docs)
        return windows

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """num_batches batches of this rank's first held-out windows (in order, wrapping); the same on
        every call, whatever the training position."""
        B = self.micro_batch_size
        windows = self._val_windows(num_batches * B)
        out = []
        for b in range(num_batches):
            rows = windows[torch.arange(b * B, (b + 1) * B) % len(windows)].long()
            out.append((rows[:, :-1], rows[:, 1:]))
        return out

    @property
    def num_val_docs(self) -> int:
        """Held-out documents read for validation so far (0 before the first evaluation)."""
        return self._val[3] if self._val is not None else 0

    @property
    def unigram_entropy_nats(self) -> float:
        """An estimate: the unigram entropy of the validation windows' tokens (this rank's first
        held-out documents), not of the whole stream, which is never read at once."""
        if self._val is None:
            self._val_windows(ENTROPY_VAL_BATCHES * self.micro_batch_size)
        return unigram_entropy_nats(self._val[1].flatten(), self.vocab_size)

    def _stream_id(self) -> tuple:
        return self.cfg.source, self.cfg.tokenizer, self.k

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"streaming": True, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "stream": self._stream_id(),
                "pass": self._pass, "docs_in_pass": self._docs_in_pass, "dataset": self._ds_state,
                "tokens": torch.from_numpy(self._tokens.copy()), "num_batches": self.num_batches,
                "num_train_tokens": self.num_train_tokens, "num_train_docs": self.num_train_docs}

    def load_state_dict(self, state: dict) -> None:
        """Go on from `state` (this object's or a fresh one's): the same stream, dp size and rank only."""
        if not state.get("streaming"):
            raise ConfigError("data.streaming: the checkpoint's data position was written with data.streaming=false; "
                              "resume it with data.streaming=false")
        if state["dp_size"] != self.dp_size:
            raise ConfigError(f"data.streaming: the checkpoint was written with dp={state['dp_size']}, this run has "
                              f"dp={self.dp_size}; a streaming position is per rank")
        if state["dp_rank"] != self.dp_rank:  # same dp size, another layout (checkpoint.py fell back to rank 0's)
            raise ConfigError(f"data.streaming: dp rank {self.dp_rank} found the position of dp rank "
                              f"{state['dp_rank']}; resume with the checkpoint's parallel layout (a streaming "
                              "position is per rank)")
        if tuple(state["stream"]) != self._stream_id():
            raise ConfigError(f"data.streaming: the checkpoint streamed (data.source, data.tokenizer, holdout k) = "
                              f"{tuple(state['stream'])}, this run {self._stream_id()}; a position only holds in the "
                              "same stream")
        self._pass, self._docs_in_pass, self._ds_state = state["pass"], state["docs_in_pass"], state["dataset"]
        self._tokens = state["tokens"].numpy().astype(np.int32, copy=True)
        self.num_batches, self.num_train_tokens = state["num_batches"], state["num_train_tokens"]
        self.num_train_docs = state["num_train_docs"]
        self._it = None  # the next read opens the stream at the loaded position


def build_streaming_data(data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                         seed: int = 0) -> StreamingTextData:
    """The entry point for data.streaming=true, as build_text_data for prepared-in-memory data."""
    return StreamingTextData(data_cfg, micro_batch_size, dp_rank, dp_size, seed)
