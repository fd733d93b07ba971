"""Text data: corpus (through HF `datasets`) -> document split -> tokens -> windows -> rank shards.

Flow on every rank (each rank builds the same thing independently; nothing is downloaded):

    load_corpus        a `datasets.Dataset` with one document per row, from one of the offline
                       sources "stdlib" (Python source code), "pydoc" (English prose), or a local
                       path / hub dataset
    split_documents    whole documents held out for validation (fixed seed: same split for any train.seed)
    pack_documents     tokens of each document + eos, one 1-D tensor per split
    TextData           non-overlapping windows of seq_len + 1 tokens, visited in a seeded order per
                       epoch; global micro-batch k of an epoch is windows [k*G, (k+1)*G) of that
                       order (G = micro_batch_size * dp_size) and rank r takes rows [r*B, (r+1)*B)

`preflight_data` is the cheap, os-only subset of these checks that the launcher runs before
spawning anything.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig
from trainer.lm.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, check_tokenizer_path, one_line

__all__ = [
    "ByteTokenizer", "HFTokenizer", "build_tokenizer", "CorpusSource", "resolve_source",
    "pydoc_topics", "preflight_data", "load_corpus", "split_documents", "pack_documents", "make_windows",
    "unigram_entropy_nats", "TextData", "build_text_data",
]

# File extension -> `datasets` packaged builder. Text files are read whole: one file = one document.
BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text", ".py": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
}
# Extensions that mark a string as a file path (even an unsupported one) rather than a hub name.
_PATH_EXTS = set(BUILDERS) | {".csv", ".tsv", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar"}
_GLOB_CHARS = "*?["
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SPLIT_SEED = 0  # the train/val document split never depends on train.seed
_SUPPORTED = ", ".join(sorted(BUILDERS))
# The second embedded corpus, for fine-tuning on something clearly unlike the pretraining code:
# the documentation topics that ship inside the standard library for pydoc's `help("if")`
# (pydoc_data.topics.topics: ~80 topics, ~465 KB of English prose with grammar snippets, sorted
# by topic name; the text follows the running Python's version). It is a dict inside one .py
# file under pydoc_data/, so the stdlib source corpus (top-level files first) never reads it
# at the default caps, and it would be one giant document if it did.
PYDOC_MODULE = "pydoc_data.topics"


# ---------------------------------------------------------------------------------------------
# Where the corpus comes from (os only: shared by preflight and load_corpus)


@dataclass(frozen=True)
class CorpusSource:
    kind: str  # "local" (stdlib included) | "pydoc" | "hub"
    builder: str = ""  # datasets builder for local files: text | json | parquet
    files: tuple[str, ...] = ()
    name: str = ""  # hub dataset name


def looks_like_local_path(source: str) -> bool:
    """A string the user clearly meant as a path (so a missing one is an error, not a hub name)."""
    if source.startswith(("/", "./", "../", "~")) or any(c in source for c in _GLOB_CHARS):
        return True
    return os.path.splitext(source)[1].lower() in _PATH_EXTS


def _walk(root: str, skip_dirs: set[str] = frozenset()) -> list[str]:
    """Files under root in a deterministic (sorted) order; hidden and skipped dirs left out."""
    out = []
    for d, dirs, files in os.walk(root):
        # Sorting in place makes os.walk itself visit directories in sorted order.
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in skip_dirs)
        out.extend(os.path.join(d, f) for f in sorted(files) if not f.startswith("."))
    return out


def _usable(paths: Sequence[str]) -> list[str]:
    """Non-empty files with a supported extension (an empty file would be an empty document)."""
    return [p for p in paths if os.path.splitext(p)[1].lower() in BUILDERS
            and os.path.isfile(p) and os.path.getsize(p) > 0]


def _cap_files(paths: Sequence[str], max_bytes: int) -> list[str]:
    """Whole files in the given order until the next one would pass max_bytes (at least one)."""
    if max_bytes <= 0:
        return list(paths)
    out, total = [], 0
    for p in paths:
        size = os.path.getsize(p)
        if out and total + size > max_bytes:
            break
        out.append(p)
        total += size
    return out


def stdlib_files(max_bytes: int) -> list[str]:
    """The embedded default corpus: this Python's standard library sources, sorted, capped."""
    root = sysconfig.get_paths()["stdlib"]
    files = [p for p in _walk(root, _SKIP_DIRS) if p.endswith(".py") and os.path.getsize(p) > 0]
    if not files:
        raise ConfigError(f"data.source: stdlib: no .py files under {root}")
    return _cap_files(files, max_bytes)


def check_pydoc_topics() -> None:
    """The pydoc topics module exists (found, not imported: preflight stays cheap); some
    distributions strip pydoc_data from a minimal Python."""
    import importlib.util

    try:
        found = importlib.util.find_spec(PYDOC_MODULE) is not None
    except ImportError:  # pydoc_data itself missing
        found = False
    if not found:
        raise ConfigError(f"data.source: pydoc: this Python has no {PYDOC_MODULE} (its distribution stripped "
                          "the pydoc documentation topics); use another source")


def pydoc_topics() -> tuple[list[str], list[str]]:
    """(topic names, texts) of the pydoc corpus, sorted by name: one topic = one document."""
    check_pydoc_topics()
    import importlib

    topics = importlib.import_module(PYDOC_MODULE).topics
    names = sorted(name for name, text in topics.items() if text.strip())
    if len(names) < 2:
        raise ConfigError(f"data.source: pydoc: {PYDOC_MODULE} holds {len(names)} non-empty topic(s)")
    return names, [topics[name] for name in names]


def _one_builder(files: list[str], source: str) -> str:
    builders = sorted({BUILDERS[os.path.splitext(p)[1].lower()] for p in files})
    if len(builders) > 1:
        raise ConfigError(f"data.source: {source} mixes file types ({', '.join(builders)}); use one kind of file")
    return builders[0]


def _local_files(source: str) -> list[str]:
    """The usable files that a local file, directory or glob names; ConfigError if none."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = _usable(_walk(path))
        if not files:
            raise ConfigError(f"data.source: no non-empty {_SUPPORTED} files in directory {source}")
    elif os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in BUILDERS:
            raise ConfigError(f"data.source: unsupported file type {source} (use {_SUPPORTED})")
        if os.path.getsize(path) == 0:
            raise ConfigError(f"data.source: file is empty: {source}")
        files = [path]
    elif any(c in source for c in _GLOB_CHARS):
        files = _usable(sorted(glob.glob(path, recursive=True)))
        if not files:
            raise ConfigError(f"data.source: no non-empty {_SUPPORTED} files match {source}")
    else:
        raise ConfigError(f"data.source: path not found: {source}")
    return files


def resolve_source(data_cfg: DataConfig) -> CorpusSource:
    """Decide stdlib / pydoc / local / hub and list the local files (capped for text files)."""
    source = data_cfg.source.strip()
    if not source:
        raise ConfigError('data.source: empty (use "stdlib", "pydoc", a local path, or a hub dataset name)')
    if source == "stdlib":
        return CorpusSource("local", "text", tuple(stdlib_files(data_cfg.max_bytes)))
    if source == "pydoc":
        check_pydoc_topics()
        return CorpusSource("pydoc")
    if os.path.exists(os.path.expanduser(source)) or looks_like_local_path(source):
        files = _local_files(source)
        builder = _one_builder(files, source)
        if builder == "text":  # file size ~ text size only for plain text; others are capped per row
            files = _cap_files(files, data_cfg.max_bytes)
        return CorpusSource("local", builder, tuple(files))
    return CorpusSource("hub", name=source)


def preflight_data(data_cfg: DataConfig) -> None:
    """Cheap checks (no datasets import, no reading) before any process is spawned."""
    resolve_source(data_cfg)
    check_tokenizer_path(data_cfg)


# ---------------------------------------------------------------------------------------------
# Loading through `datasets`


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from every rank; restore the user's setting afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _load_local(src: CorpusSource, label: str):
    import datasets

    kwargs = {}
    if src.builder == "text":
        # One file = one document; a stray undecodable byte (stdlib test data has some) is not fatal.
        kwargs = {"sample_by": "document", "encoding_errors": "replace"}
    # A private throw-away cache per call: several ranks on one machine never share (or lock)
    # a cache directory, and keep_in_memory means nothing refers to it once it is deleted.
    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="sparseforge-data-") as cache:
        try:
            return datasets.load_dataset(src.builder, data_files=list(src.files), split="train",
                                         cache_dir=cache, keep_in_memory=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - malformed json/parquet: say which source, one line
            raise ConfigError(f"data.source: cannot read {label} as {src.builder}: {one_line(e)}") from None


def _load_hub(name: str, split: str):
    import datasets

    try:  # the shared HF cache: downloads are reused across runs and datasets locks it itself
        with _quiet_datasets():
            return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split...
        raise ConfigError(f"data.source: cannot load hub dataset {name!r} (split {split!r}): {one_line(e)}") from None


def _cap_rows(ds, field: str, max_bytes: int):
    """Leading rows while their UTF-8 size stays within max_bytes (at least one row)."""
    import pyarrow.compute as pc

    if max_bytes <= 0 or len(ds) == 0:
        return ds
    sizes = pc.fill_null(pc.binary_length(ds.data.column(field)), 0).to_numpy()
    keep = max(1, int(np.searchsorted(np.cumsum(sizes), max_bytes, side="right")))
    return ds if keep >= len(ds) else ds.select(range(keep))


def load_corpus(data_cfg: DataConfig):
    """The corpus as a `datasets.Dataset` whose only column is `data_cfg.text_field`."""
    src = resolve_source(data_cfg)
    field = data_cfg.text_field
    if src.kind == "hub":
        ds = _load_hub(src.name, data_cfg.split)
    elif src.kind == "pydoc":
        import datasets

        ds = datasets.Dataset.from_dict({field: pydoc_topics()[1]})  # in memory: nothing cached
    else:
        ds = _load_local(src, data_cfg.source)
        if src.builder == "text" and field != "text":
            ds = ds.rename_column("text", field)  # the text builder always calls it "text"
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field: no column {field!r} in {data_cfg.source} "
                          f"(columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([field])
    if len(ds) == 0:
        raise ConfigError(f"data.source: {data_cfg.source} has no documents")
    return _cap_rows(ds, field, data_cfg.max_bytes)


# ---------------------------------------------------------------------------------------------
# Split, tokenize, pack


def split_documents(num_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices, each sorted: the last val_fraction of a fixed permutation."""
    num_val = max(1, int(round(num_docs * val_fraction)))
    if num_docs - num_val < 1:
        raise ConfigError(f"data.source: {num_docs} document(s) cannot be split into train and validation "
                          f"(data.val_fraction={val_fraction}); give more files or rows")
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    return np.sort(perm[: num_docs - num_val]), np.sort(perm[num_docs - num_val:])


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
    """Train/val windows of one run, sharded over data-parallel ranks.

    Epoch e visits the training windows in a permutation seeded by (seed, e), cut into
    N // G global micro-batches of G = micro_batch_size * dp_size windows (the few left over are
    skipped that epoch, so no window repeats inside a batch). Rank r takes rows [r*B, (r+1)*B) of
    each global micro-batch. The order depends on G only, never on how G is split over ranks.
    """

    def __init__(self, tokenizer, train_tokens: torch.Tensor, val_tokens: torch.Tensor, seq_len: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.seq_len = seq_len
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.global_batch_size = micro_batch_size * dp_size  # G: windows per global micro-batch
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.train_windows = make_windows(train_tokens, seq_len)
        self.val_windows = make_windows(val_tokens, seq_len)
        self._check_sizes()
        self.batches_per_epoch = len(self.train_windows) // self.global_batch_size
        self._consumed = 0  # global micro-batches handed out so far (by every rank alike)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch
        self._entropy: float | None = None
        self.num_train_docs = self.num_val_docs = 0  # set by build_text_data, for the run summary

    def _check_sizes(self) -> None:
        for name, w, toks in (("training", self.train_windows, self.train_tokens),
                              ("validation", self.val_windows, self.val_tokens)):
            if len(w) == 0:
                raise ConfigError(f"data.seq_len: the {name} split has {toks.numel()} tokens, fewer than one "
                                  f"window of data.seq_len+1={self.seq_len + 1}; use more data or a shorter seq_len")
        if len(self.train_windows) < self.global_batch_size:
            raise ConfigError(f"data.source: the training split has {len(self.train_windows)} windows, fewer than "
                              f"one global micro-batch of {self.global_batch_size} (train.micro_batch_size x dp)")

    @property
    def num_train_tokens(self) -> int:
        return self.train_tokens.numel()

    @property
    def num_val_tokens(self) -> int:
        return self.val_tokens.numel()

    @property
    def unigram_entropy_nats(self) -> float:
        if self._entropy is None:  # computed once, on first use
            self._entropy = unigram_entropy_nats(self.train_tokens, self.vocab_size)
        return self._entropy

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            # (seed, epoch) as a seed sequence: seed 1 epoch 0 never repeats seed 0 epoch 1.
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.train_windows)))
        return self._perm[1]

    def global_batch_windows(self, n: int) -> np.ndarray:
        """Window indices of global micro-batch n (all ranks together, G of them)."""
        epoch, k = divmod(n, self.batches_per_epoch)
        G = self.global_batch_size
        return self._epoch_perm(epoch)[k * G:(k + 1) * G]

    def _batch(self, windows: torch.Tensor, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = windows[torch.from_numpy(idx)].long()
        return rows[:, :-1], rows[:, 1:]

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets), each [micro_batch_size, seq_len] int64, forever, from the saved position."""
        B, r = self.micro_batch_size, self.dp_rank
        while True:
            idx = self.global_batch_windows(self._consumed)[r * B:(r + 1) * B]
            # Counted before the yield: after k batches were handed out, state_dict() says k.
            self._consumed += 1
            yield self._batch(self.train_windows, idx)

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the first num_batches*G validation windows (in order, wrapping)."""
        B, G, n = self.micro_batch_size, self.global_batch_size, len(self.val_windows)
        out = []
        for b in range(num_batches):
            start = b * G + self.dp_rank * B
            out.append(self._batch(self.val_windows, np.arange(start, start + B) % n))
        return out

    def state_dict(self) -> dict:
        return {
            "global_micro_batches": self._consumed,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "num_train_windows": len(self.train_windows),
        }

    def load_state_dict(self, state: dict) -> None:
        # Exact resume needs the same order: same windows (corpus, tokenizer, seq_len), seed and G.
        saved = (state["seed"], state["num_train_windows"], state["global_batch_size"])
        here = (self.seed, len(self.train_windows), self.global_batch_size)
        if saved != here:
            raise ConfigError(
                f"data: checkpoint data state (seed, training windows, global micro-batch) = {saved} does not "
                f"match this run's {here}; train.seed, data.* or train.micro_batch_size x dp changed")
        self._consumed = int(state["global_micro_batches"])


def build_text_data(data_cfg: DataConfig, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                    seed: int = 0) -> TextData:
    """The one entry point: tokenizer + corpus + split + packing + this rank's batches."""
    tokenizer = build_tokenizer(data_cfg)
    ds = load_corpus(data_cfg)
    train_idx, val_idx = split_documents(len(ds), data_cfg.val_fraction)
    field = data_cfg.text_field
    data = TextData(tokenizer, tokenize_documents(ds, field, tokenizer, train_idx),
                    tokenize_documents(ds, field, tokenizer, val_idx), data_cfg.seq_len,
                    micro_batch_size, dp_rank, dp_size, seed)
    data.num_train_docs, data.num_val_docs = len(train_idx), len(val_idx)
    return data
