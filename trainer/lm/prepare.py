"""`sparseforge prepare-data` for text: a recipe's corpus tokenized once, by several processes, into
memory-mapped token shards that every rank maps (trainer/lm/token_shards.py reads them).

The token streams are exactly today's in-memory ones (trainer/lm/data.py): the corpus the recipe
names (data.source, text_field, split, max_bytes), split by document with `split_documents`
(data.val_fraction), each split's documents in corpus order, each followed by eos. So training
from the directory sees the same windows in the same order as training from the source.

    DIR/train_00000.bin  tokens (uint16 when the vocabulary fits, else uint32), parts of about
    DIR/train_00000.idx  --shard-tokens; .idx: uint64 end offset of each document in the part
    DIR/val_00000.bin    (a part cuts both splits at the same document, so it is a resume point)
    DIR/manifest.json    last: tokenizer identity and vocabulary, counts, source, sha256 per file,
                         the unigram entropy of the training tokens

Resume: after each part, .partial/progress.json records the finished parts and the next document;
a killed run leaves no manifest (training refuses the directory in one line) and a rerun with the
same recipe goes on from the last finished part; a rerun with another recipe is refused.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from trainer.atomic import write_atomic
from trainer.config import Config, ConfigError, DataConfig
from trainer.lm.token_shards import KIND, token_dtype, tokenizer_identity
from trainer.prepared import MANIFEST, PARTIAL, file_sha256, fsync_file, read_manifest, write_manifest

DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MB of uint16 per part
DOCS_PER_TASK = 256  # documents per tokenization task handed to a worker
PROGRESS = "progress.json"


# ---------------------------------------------------------------------------------------------
# Tokenization workers


_worker_tokenizer = None


def _init_worker(data_cfg: DataConfig) -> None:
    from trainer.lm.tokenizer import build_tokenizer

    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(data_cfg)


def _encode(texts: list) -> list[np.ndarray]:
    return _worker_tokenizer.encode_batch(t or "" for t in texts)  # a null row is an empty document


# ---------------------------------------------------------------------------------------------
# Writing parts


class _SplitWriter:
    """The open part file of one split: tokens appended, document ends remembered."""

    def __init__(self, partial: str, split: str, part: int, dtype: np.dtype, eos_id: int):
        self.name = f"{split}_{part:05d}"
        self.path = os.path.join(partial, self.name + ".bin")
        self.file = open(self.path, "wb")
        self.dtype, self.eos = dtype, np.array([eos_id], dtype=dtype)
        self.ends: list[int] = []
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        arr = ids.astype(self.dtype, copy=False)
        self.file.write(arr.tobytes())
        self.file.write(self.eos.tobytes())
        self.tokens += len(arr) + 1
        self.ends.append(self.tokens)

    def finish(self, out_dir: str) -> list[dict]:
        """Move the part in place (synced); its shard record, or nothing for an empty part."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if not self.ends:
            os.unlink(self.path)
            return []
        idx = os.path.join(os.path.dirname(self.path), self.name + ".idx")
        with open(idx, "wb") as f:
            f.write(np.asarray(self.ends, dtype=np.uint64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        record = {"file": self.name + ".bin", "index": self.name + ".idx", "tokens": self.tokens,
                  "documents": len(self.ends)}
        for path in (self.path, idx):
            os.replace(path, os.path.join(out_dir, os.path.basename(path)))
        return [record]


def _identity(data_cfg: DataConfig, tokenizer) -> dict:
    """What a rerun must share with the run that started the directory."""
    src = data_cfg.source.strip()
    return {"source": os.path.abspath(os.path.expanduser(src)) if os.path.exists(os.path.expanduser(src)) else src,
            "text_field": data_cfg.text_field, "split": data_cfg.split, "max_bytes": data_cfg.max_bytes,
            "val_fraction": data_cfg.val_fraction,
            "tokenizer": {"spec": data_cfg.tokenizer, "identity": tokenizer_identity(data_cfg.tokenizer),
                          "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id)}}


def _start(out_dir: str, identity: dict) -> dict | None:
    """The saved progress to resume from (a fresh one when starting), or None when the directory
    already holds this data; ConfigError when it holds something else."""
    partial = os.path.join(out_dir, PARTIAL)
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        manifest = read_manifest(out_dir, "--out", kind=KIND)
        if manifest["identity"] != identity:
            raise ConfigError(f"--out: {out_dir} already holds data prepared from {manifest['identity']['source']} "
                              f"with other settings; choose another directory or delete it")
        return None
    progress_path = os.path.join(partial, PROGRESS)
    if os.path.isfile(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        if progress["identity"] != identity:
            raise ConfigError(f"--out: {out_dir} holds an unfinished prepare-data of {progress['identity']['source']} "
                              f"with other settings; rerun that one, or delete the directory")
    elif os.path.isdir(out_dir) and not os.path.isdir(partial) and os.listdir(out_dir):
        raise ConfigError(f"--out: {out_dir} exists and is not a prepare-data output; choose an empty or new directory")
    else:
        progress = {"identity": identity, "next_doc": 0, "parts": 0, "shards": {"train": [], "val": []}}
    # Files of a part that was being written when the run stopped are not in the progress record.
    keep = {name for shards in progress["shards"].values() for s in shards for name in (s["file"], s["index"])}
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        if name.endswith((".bin", ".idx")) and name not in keep:
            os.unlink(os.path.join(out_dir, name))
    if not os.path.isfile(progress_path):
        shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial, exist_ok=True)
    for name in os.listdir(partial):
        if name.endswith((".bin", ".idx")):
            os.unlink(os.path.join(partial, name))
    return progress


def _save_progress(partial: str, progress: dict, counts: np.ndarray) -> None:
    np.save(os.path.join(partial, "unigram_counts.tmp.npy"), counts)
    os.replace(os.path.join(partial, "unigram_counts.tmp.npy"), os.path.join(partial, "unigram_counts.npy"))
    write_atomic(os.path.join(partial, PROGRESS), lambda f: f.write(json.dumps(progress)), binary=False)


def _count(counts: np.ndarray, pending: list, eos_id: int) -> None:
    """Add the pending training documents (and their eos) to the unigram counts; empty the list."""
    if pending:
        counts += np.bincount(np.concatenate(pending).astype(np.int64), minlength=len(counts))[:len(counts)]
        counts[eos_id] += len(pending)
        pending.clear()


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    return float(-(p * np.log(p)).sum())


def _texts(ds, field: str, start: int, end: int):
    for a in range(start, end, DOCS_PER_TASK):
        yield ds[list(range(a, min(a + DOCS_PER_TASK, end)))][field]


def prepare_text(cfg: Config, out_dir: str, num_proc: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 progress_bar: bool = True) -> dict:
    """Tokenize the recipe's corpus into `out_dir` (resuming an unfinished run); the manifest."""
    from trainer.lm.corpus import load_corpus
    from trainer.lm.data import split_documents
    from trainer.lm.tokenizer import build_tokenizer

    data_cfg = cfg.data
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    tokenizer = build_tokenizer(data_cfg)
    identity = _identity(data_cfg, tokenizer)
    progress = _start(out_dir, identity)
    if progress is None:
        print(f"prepare-data: {out_dir} already holds this data; nothing to do", file=sys.stderr)
        return read_manifest(out_dir, "--out", kind=KIND)
    partial = os.path.join(out_dir, PARTIAL)
    t0 = time.perf_counter()
    ds = load_corpus(data_cfg, cache_dir=os.path.join(partial, "cache"))
    num_docs, field = len(ds), data_cfg.text_field
    _, val_idx = split_documents(num_docs, data_cfg.val_fraction)
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[val_idx] = True
    dtype, vocab = token_dtype(tokenizer.vocab_size), int(tokenizer.vocab_size)
    counts_path = os.path.join(partial, "unigram_counts.npy")
    counts = np.load(counts_path) if progress["next_doc"] and os.path.isfile(counts_path) else np.zeros(vocab, np.int64)
    num_proc = max(1, num_proc if num_proc is not None else min(os.cpu_count() or 1, 16))
    start = progress["next_doc"]
    bar = _bar(progress_bar, num_docs, start)
    pool = multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (data_cfg,)) if num_proc > 1 else None
    if pool is None:
        _init_worker(data_cfg)
    try:
        encoded = (pool.imap(_encode, _texts(ds, field, start, num_docs)) if pool is not None
                   else map(_encode, _texts(ds, field, start, num_docs)))
        writers, doc, pending = None, start, []
        for arrays in encoded:
            for ids in arrays:
                if writers is None:
                    writers = _open_part(partial, progress["parts"], dtype, tokenizer.eos_id)
                writers["val" if is_val[doc] else "train"].add(ids)
                if not is_val[doc]:
                    pending.append(ids)
                doc += 1
                # A part ends at a document boundary of both splits: the point a rerun resumes from.
                if writers["train"].tokens >= shard_tokens or doc == num_docs:
                    _count(counts, pending, tokenizer.eos_id)
                    for split, writer in writers.items():
                        progress["shards"][split] += writer.finish(out_dir)
                    progress["parts"] += 1
                    progress["next_doc"] = doc
                    _save_progress(partial, progress, counts)
                    writers = None
            _count(counts, pending, tokenizer.eos_id)
            if bar is not None:
                bar.update(len(arrays))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    manifest = _manifest(out_dir, identity, progress, dtype, counts, time.perf_counter() - t0)
    shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _open_part(partial: str, part: int, dtype: np.dtype, eos_id: int) -> dict[str, _SplitWriter]:
    return {split: _SplitWriter(partial, split, part, dtype, eos_id) for split in ("train", "val")}


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a bare box: no bar
        return None
    return tqdm(total=total, initial=initial, unit="doc", desc="prepare-data", file=sys.stderr, dynamic_ncols=True)


def _manifest(out_dir: str, identity: dict, progress: dict, dtype: np.dtype, counts: np.ndarray,
              seconds: float) -> dict:
    files = {}
    for shards in progress["shards"].values():
        for shard in shards:
            for name in (shard["file"], shard["index"]):
                path = os.path.join(out_dir, name)
                fsync_file(path)
                files[name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    splits = {split: {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                      "shards": shards} for split, shards in progress["shards"].items()}
    for split, info in splits.items():
        if info["tokens"] == 0:
            raise ConfigError(f"data.source: {identity['source']}: the {split} split is empty")
    manifest = {"kind": KIND, "identity": identity, "tokenizer": identity["tokenizer"], "dtype": dtype.name,
                "source": identity["source"], "val_fraction": identity["val_fraction"], "splits": splits,
                "unigram_entropy_nats": _entropy(counts), "files": files,
                "prepare_seconds_last_run": round(seconds, 3)}
    write_manifest(out_dir, manifest)
    return read_manifest(out_dir, "--out", kind=KIND)
