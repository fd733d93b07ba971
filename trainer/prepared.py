"""Prepared data directories, the on-disk format `sparseforge prepare-data` writes once and every
rank memory-maps (text: trainer/lm/prepare.py; images: trainer/diffusion/prepare_images.py).

    DIR/manifest.json    written last, atomically: what the data is (kind, source, tokenizer or
                         resolution), its splits, and every data file with its size and sha256
    DIR/<name>.bin ...   raw little-endian arrays, read with np.memmap
    DIR/.partial/        work in progress (what a rerun resumes from); gone once the manifest exists

A directory without manifest.json is never data: a killed prepare-data leaves only .partial/ and
part files, which training refuses in one line and a rerun resumes. `check_prepared` is the
launcher's preflight (sizes always; checksums unless data.verify_checksums is off).
"""
from __future__ import annotations

import hashlib
import json
import os

from models.config import ConfigError
from trainer.atomic import fsync_path as fsync_file, write_atomic

MANIFEST = "manifest.json"
PARTIAL = ".partial"
FORMAT = "sparseforge-prepared"
VERSION = 1
_HASH_CHUNK = 8 << 20


def is_prepared(path: str) -> bool:
    """A directory that prepare-data finished (it has our manifest)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), MANIFEST))


def looks_prepared(path: str) -> bool:
    """A directory that prepare-data wrote or started (finished or not): data.source means it."""
    path = os.path.expanduser(path)
    return os.path.isdir(path) and (is_prepared(path) or os.path.isdir(os.path.join(path, PARTIAL)))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str, manifest: dict) -> str:
    """The manifest, atomically and durably (the data files it lists must be synced before)."""
    body = {"format": FORMAT, "version": VERSION, **manifest}
    path = write_atomic(os.path.join(directory, MANIFEST), lambda f: f.write(json.dumps(body, indent=1)), binary=False)
    os.chmod(path, 0o644)  # readable by every rank's user, like the shards
    fsync_file(path)
    return path


def read_manifest(path: str, key: str = "data.source", kind: str | None = None) -> dict:
    """The manifest of a finished prepared directory; one-line ConfigError naming `key` otherwise."""
    directory = os.path.expanduser(path)
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        if os.path.isdir(os.path.join(directory, PARTIAL)):
            raise ConfigError(f"{key}: {path} is an unfinished prepare-data output (no {MANIFEST}); rerun "
                              f"prepare-data with the same arguments to finish it")
        raise ConfigError(f"{key}: {path} is not a prepared data directory (no {MANIFEST}; write one with "
                          f"`sparseforge prepare-data`)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {manifest_path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{key}: {manifest_path} is not a sparseforge prepared-data manifest")
    if manifest.get("version") != VERSION:
        raise ConfigError(f"{key}: {manifest_path} has format version {manifest.get('version')}; this sparseforge "
                          f"reads version {VERSION} (prepare the data again)")
    if kind is not None and manifest.get("kind") != kind:
        raise ConfigError(f"{key}: {path} holds prepared {manifest.get('kind')}, not {kind}")
    return manifest


def check_files(path: str, manifest: dict, key: str = "data.source", checksums: bool = True) -> None:
    """Every file the manifest lists exists with its size and (when `checksums`) its sha256."""
    directory = os.path.expanduser(path)
    for name, info in sorted(manifest["files"].items()):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ConfigError(f"{key}: {path}: shard {name} is missing")
        size = os.path.getsize(file)
        if size != info["bytes"]:
            raise ConfigError(f"{key}: {path}: shard {name} has {size:,} bytes, the manifest says "
                              f"{info['bytes']:,} (truncated or replaced; prepare the data again)")
    if not checksums:
        return
    for name, info in sorted(manifest["files"].items()):
        if file_sha256(os.path.join(directory, name)) != info["sha256"]:
            raise ConfigError(f"{key}: {path}: shard {name} does not match its checksum in {MANIFEST} "
                              f"(corrupted; prepare the data again)")
