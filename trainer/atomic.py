"""Atomic file writes: a file is written whole under a temporary name of our own in its directory,
then renamed. A reader never sees half a file, and concurrent writers (ranks, nodes on a shared
file system, runs sharing a cache) never rename each other's temporary file."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = True) -> str:
    """Call write(file) on a temporary file beside `path`, then rename it to `path`; returns it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
