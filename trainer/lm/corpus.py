"""Text corpora: which documents a recipe's data.source names, and reading them through HF
`datasets` (one document per row; nothing is downloaded for the embedded sources). Where
`datasets` is not installed (a bare GPU box), plain-text files (the stdlib included) and pydoc are
read with the standard library into `TextDocuments`, the same documents in the same order; json,
parquet and hub sources need `datasets`.

    "stdlib"   this Python's standard library sources (the pretraining default)
    "pydoc"    the stdlib's pydoc documentation topics: English prose, for fine-tuning
    a path     a local file, directory or glob of text / md / py / json / jsonl / parquet files
    a name     a hub dataset (offline only when already cached)

`preflight_data` is the cheap, os-only subset of the checks that the launcher runs before
spawning anything.
"""
from __future__ import annotations

import glob
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.datasets_io import GLOB_CHARS, load_hub, looks_like_local_path, no_download_count, one_line, quiet_datasets
from trainer.lm.tokenizer import check_tokenizer_path

# File extension -> `datasets` packaged builder. Text files are read whole: one file = one document.
BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text", ".py": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
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
    elif any(c in source for c in GLOB_CHARS):
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


def preflight_data(data_cfg: DataConfig, vocab_size: int | None = None) -> None:
    """Checks before any process is spawned, without reading the corpus: the source exists (a
    prepared directory or every data.mix entry: complete, same tokenizer, sizes and checksums),
    and the tokenizer loads. `vocab_size`: model.vocab_size, which a prepared vocabulary must fit."""
    from trainer.lm.token_shards import check_prepared_tokens
    from trainer.lm.tokenizer import build_tokenizer
    from trainer.prepared import looks_prepared

    prepared = [(path, f"data.mix.{path}") for path in data_cfg.mix]
    for path, key in prepared:
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"{key}: not a directory (a mixture names prepare-data outputs)")
    if not prepared and looks_prepared(data_cfg.source.strip()):
        prepared = [(data_cfg.source.strip(), "data.source")]
    elif not prepared:
        resolve_source(data_cfg)
    check_tokenizer_path(data_cfg)
    build_tokenizer(data_cfg)  # a directory without a usable tokenizer: one line here, not on every rank
    for path, key in prepared:
        check_prepared_tokens(data_cfg, path, vocab_size, key)


# ---------------------------------------------------------------------------------------------
# Loading through `datasets`


def _load_local(src: CorpusSource, label: str, cache_dir: str | None = None):
    import datasets

    kwargs = {}
    if src.builder == "text":
        # One file = one document; a stray undecodable byte (stdlib test data has some) is not fatal.
        kwargs = {"sample_by": "document", "encoding_errors": "replace"}
    # A private throw-away cache per call: several ranks on one machine never share (or lock)
    # a cache directory, and keep_in_memory means nothing refers to it once it is deleted.
    # prepare-data passes a cache directory of its own instead: the Arrow files there are
    # memory-mapped, so a corpus larger than memory can be read.
    with quiet_datasets(), no_download_count(), tempfile.TemporaryDirectory(prefix="sparseforge-data-") as cache:
        try:
            return datasets.load_dataset(src.builder, data_files=list(src.files), split="train",
                                         cache_dir=cache_dir or cache, keep_in_memory=cache_dir is None, **kwargs)
        except Exception as e:  # noqa: BLE001 - malformed json/parquet: say which source, one line
            raise ConfigError(f"data.source: cannot read {label} as {src.builder}: {one_line(e)}") from None


def _rows_within(sizes: np.ndarray, max_bytes: int) -> int:
    """How many leading rows of these UTF-8 sizes stay within max_bytes (at least one)."""
    return max(1, int(np.searchsorted(np.cumsum(sizes), max_bytes, side="right")))


def _cap_rows(ds, field: str, max_bytes: int):
    """Leading rows while their UTF-8 size stays within max_bytes (at least one row)."""
    import pyarrow.compute as pc

    if max_bytes <= 0 or len(ds) == 0:
        return ds
    keep = _rows_within(pc.fill_null(pc.binary_length(ds.data.column(field)), 0).to_numpy(), max_bytes)
    return ds if keep >= len(ds) else ds.select(range(keep))


class TextDocuments:
    """Documents in memory under one column name: the part of `datasets.Dataset` that
    trainer/lm/data.py reads (`len`, `column_names`, `ds[field]`, `ds[indices][field]`)."""

    def __init__(self, field: str, texts: list[str]):
        self.field, self.texts = field, texts

    @property
    def column_names(self) -> list[str]:
        return [self.field]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key != self.field:
                raise KeyError(key)
            return list(self.texts)
        return {self.field: [self.texts[i] for i in key]}


def _load_without_datasets(src: CorpusSource, data_cfg: DataConfig) -> TextDocuments:
    """What `datasets` would give for plain-text files and pydoc, read with the standard library:
    one document per file, decoded as its text builder does (UTF-8, bad bytes replaced, universal
    newlines), then capped by rows as `_cap_rows`."""
    if src.kind == "pydoc":
        texts = pydoc_topics()[1]
    elif src.kind == "local" and src.builder == "text":
        texts = []
        for path in src.files:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    else:
        what = f"{src.builder} files" if src.kind == "local" else "a hub dataset"
        raise ConfigError(f"data.source: reading {what} needs HF datasets (pip install datasets); "
                          "plain-text sources and pydoc do not")
    if not texts:
        raise ConfigError(f"data.source: {data_cfg.source} has no documents")
    if data_cfg.max_bytes > 0:
        texts = texts[:_rows_within(np.array([len(t.encode()) for t in texts]), data_cfg.max_bytes)]
    return TextDocuments(data_cfg.text_field, texts)


def load_corpus(data_cfg: DataConfig, cache_dir: str | None = None):
    """The corpus as a `datasets.Dataset` whose only column is `data_cfg.text_field` (a
    `TextDocuments` where `datasets` is not installed). `cache_dir`: local files are read into
    memory-mapped Arrow files there instead of into memory (prepare-data)."""
    src = resolve_source(data_cfg)
    try:
        import datasets  # noqa: F401 - the loader below; a bare GPU box has none
    except ImportError:
        return _load_without_datasets(src, data_cfg)
    field = data_cfg.text_field
    if src.kind == "hub":
        ds = load_hub(src.name, data_cfg.split)
    elif src.kind == "pydoc":
        import datasets

        ds = datasets.Dataset.from_dict({field: pydoc_topics()[1]})  # in memory: nothing cached
    else:
        ds = _load_local(src, data_cfg.source, cache_dir)
        if src.builder == "text" and field != "text":
            ds = ds.rename_column("text", field)  # the text builder always calls it "text"
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field: no column {field!r} in {data_cfg.source} "
                          f"(columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([field])
    if len(ds) == 0:
        raise ConfigError(f"data.source: {data_cfg.source} has no documents")
    return _cap_rows(ds, field, data_cfg.max_bytes)
