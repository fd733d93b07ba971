"""Reading data sources through HF `datasets`, shared by text (trainer/lm/corpus.py) and images
(trainer/diffusion/image_source.py): local path or hub name, hub datasets, quiet progress bars,
one-line errors."""
from __future__ import annotations

import contextlib
import os

from trainer.config import ConfigError

# Extensions that mark a string as a file path (even an unsupported one) rather than a hub name.
PATH_EXTS = {".txt", ".text", ".md", ".py", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".gz", ".bz2",
             ".xz", ".zst", ".zip", ".tar"}
GLOB_CHARS = "*?["


def looks_like_local_path(source: str) -> bool:
    """A string the user clearly meant as a path (so a missing one is an error, not a hub name)."""
    if source.startswith(("/", "./", "../", "~")) or any(c in source for c in GLOB_CHARS):
        return True
    return os.path.splitext(source)[1].lower() in PATH_EXTS


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars from every rank; restore the user's setting afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextlib.contextmanager
def no_download_count():
    """No hub request from a packaged builder (json/text/parquet) on local files: datasets counts a
    "download" with a HEAD request (3 s timeout, more when DNS hangs) on every load_dataset, from
    every rank, even offline."""
    from datasets import config

    saved = config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def load_hub(name: str, split: str):
    """A hub dataset's split, through the shared HF cache (offline only when it is cached there)."""
    import datasets

    try:  # the shared HF cache: downloads are reused across runs and datasets locks it itself
        with quiet_datasets():
            return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split...
        raise ConfigError(f"data.source: cannot load hub dataset {name!r} (split {split!r}): {one_line(e)}") from None
