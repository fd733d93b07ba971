"""`sparseforge prepare-data` for DiT recipes: the recipe's image source (digits, an image folder, a
hub dataset) decoded once, chunk by chunk, into the uint8 arrays every rank memory-maps
(trainer/diffusion/image_memmap.py), in the prepared-directory format of trainer/prepared.py.

What is stored (manifest value_max: the stored value of +1; a pixel x reads as x / value_max * 2 - 1):
    - the source's own values when nothing resamples them: digits at the recipe's 8x8 (0..16,
      value_max 16) and 8-bit images already at the recipe's size (0..255, value_max 255). Training
      then sees bitwise the images that data.source=<the source> decodes in memory.
    - otherwise (a resize, float pixels, grey mixed from RGB arrays) the decoded [-1, 1] floats
      quantized to 0..255 (value_max 255): within half a step (1/255) of the in-memory images.

The split is build_image_data's (split_examples: fixed, whatever train.seed); labels are checked
against model.num_classes once, here.

An interrupted run leaves DIR/.partial/: the arrays so far and progress.json (the settings and
the rows done, saved after each synced chunk), where a rerun with the same settings resumes. The
complete arrays move into DIR, then the manifest is written. A finished DIR with the same settings
is "already prepared"; other settings, or a non-empty directory that is not ours, are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

from trainer.atomic import write_atomic
from trainer.config import Config, ConfigError
from trainer.datasets_io import quiet_datasets
from trainer.diffusion.image_data import split_examples
from trainer.diffusion.image_memmap import KIND, SPLITS, image_file, label_file
from trainer.diffusion.image_source import (CHUNK, DIGITS_MAX, decode_chunk, decode_labels, image_column,
                                            load_image_dataset, resolve_image_source)
from trainer.prepared import (PARTIAL, check_files, file_sha256, fsync_file, is_prepared, looks_prepared,
                              read_manifest, write_manifest)

KEY = "--out"  # what the refusals name: the output directory is `sparseforge prepare-data --out`
PROGRESS = "progress.json"
DIGITS_SIZE = 8  # scikit-learn's digits are 8x8: no resampling at that size
FILES = tuple(name(split) for split in SPLITS for name in (image_file, label_file))
# The settings the bytes depend on, and the recipe key each comes from (what a refusal names).
SETTING_KEYS = {"source": "data.source", "split": "data.split", "image_field": "data.image_field",
                "label_field": "data.label_field", "val_fraction": "data.val_fraction",
                "image_size": "model.image_size", "in_channels": "model.in_channels",
                "num_classes": "model.num_classes"}


def prepare_images(cfg: Config, out_dir: str, progress: bool = True) -> dict:
    """Write cfg's image source (cfg.data: source, split, fields, val_fraction; cfg.model:
    image_size, in_channels, num_classes) to `out_dir` as a prepared image set.

    Args:
        progress: a tqdm bar on stderr (the only output besides a rerun's "nothing to do" there).
    Returns:
        The manifest, as written (or as found, when out_dir is already this preparation).
    """
    settings = _settings(cfg)
    directory = os.path.abspath(os.path.expanduser(out_dir))
    manifest = _finished(directory, out_dir, settings)
    if manifest is not None:
        # On stderr (stdout is the caller's), as the text side: a rerun is told it did nothing.
        print(f"prepare-data: {out_dir} already holds this data ({describe(manifest)}); nothing to do",
              file=sys.stderr, flush=True)
        return manifest
    partial = os.path.join(directory, PARTIAL)
    os.makedirs(partial, exist_ok=True)
    state = _load_state(partial, settings, out_dir)
    if not state["complete"]:
        _convert(cfg, partial, state, progress)
    return _publish(directory, out_dir, partial, state)


def describe(manifest: dict) -> str:
    """One line: counts, geometry and value_max of a prepared image set."""
    n = {split: info["images"] for split, info in manifest["splits"].items()}
    size = f"{manifest['in_channels']}x{manifest['image_size']}x{manifest['image_size']}"
    return (f"{n['train']:,} training / {n['val']:,} validation images {size} uint8, "
            f"value_max {manifest['value_max']}")


# -- what is asked, and what the directory holds ---------------------------------------------------


def _settings(cfg: Config) -> dict:
    """What the bytes depend on (a folder by its absolute path: reruns from elsewhere match)."""
    d, m = cfg.data, cfg.model
    if looks_prepared(d.source):
        raise ConfigError(f"data.source: {d.source} is a prepared data directory already; prepare-data reads "
                          f"an image source (digits, an image folder, a hub dataset)")
    src = resolve_image_source(d)
    source = os.path.abspath(src.where) if src.kind == "folder" else d.source.strip()
    return {"source": source, "split": d.split, "image_field": d.image_field, "label_field": d.label_field,
            "val_fraction": d.val_fraction, "image_size": m.image_size, "in_channels": m.in_channels,
            "num_classes": m.num_classes}


def _refuse_other(have: dict, want: dict, out_dir: str, what: str) -> None:
    for name, key in SETTING_KEYS.items():
        if have.get(name) != want[name]:
            raise ConfigError(f"{KEY}: {out_dir} {what} with {key}={have.get(name)!r}, this recipe has "
                              f"{want[name]!r} (use another directory, or delete this one to prepare it again)")


def _finished(directory: str, out_dir: str, settings: dict) -> dict | None:
    """The manifest when out_dir already is this preparation, None when there is work to do;
    a one-line refusal when it is something else."""
    if not os.path.exists(directory):
        return None
    if not os.path.isdir(directory):
        raise ConfigError(f"{KEY}: {out_dir} is a file, not a directory")
    if is_prepared(directory):
        manifest = read_manifest(out_dir, KEY, kind=KIND)
        _refuse_other(manifest, settings, out_dir, "was prepared")
        check_files(out_dir, manifest, KEY, checksums=False)  # a damaged set is not "done"
        shutil.rmtree(os.path.join(directory, PARTIAL), ignore_errors=True)  # killed just after the manifest
        return manifest
    if not os.path.isdir(os.path.join(directory, PARTIAL)) and os.listdir(directory):
        raise ConfigError(f"{KEY}: {out_dir} exists, is not empty and is not a prepare-data output; nothing "
                          f"written (give a new or empty directory)")
    return None


def _save_state(partial: str, state: dict) -> None:
    write_atomic(os.path.join(partial, PROGRESS), lambda f: f.write(json.dumps(state)), binary=False)


def _load_state(partial: str, settings: dict, out_dir: str) -> dict:
    """progress.json of an earlier run with these settings, or a fresh start (saved at once, so
    that a rerun with other settings is refused even before the first chunk is done)."""
    try:
        with open(os.path.join(partial, PROGRESS)) as f:
            state = json.load(f)
    except (OSError, ValueError):  # killed before its first save: nothing worth keeping
        state = None
    if isinstance(state, dict) and isinstance(state.get("settings"), dict):
        _refuse_other(state["settings"], settings, out_dir, "holds an unfinished preparation")
        return state
    state = {"settings": settings, "num_images": None, "rows_done": 0, "source_value_max": None, "complete": False}
    _save_state(partial, state)
    return state


# -- decoding ----------------------------------------------------------------------------------


def _quantize(x_NCHW: torch.Tensor, value_max: int) -> np.ndarray:
    """[-1, 1] floats -> uint8 0..value_max, exact for floats decoded from values on that grid
    (x = v / (value_max / 2) - 1 comes back as v: the error is far below half a step)."""
    q = torch.round((x_NCHW + 1.0) * (value_max / 2)).clamp_(0, value_max)
    return q.to(torch.uint8).numpy()


def _append_files(partial: str, state: dict, splits: dict[str, np.ndarray], row_bytes: int) -> dict:
    """Each split's pixel file in .partial/ opened for appending after the rows done (a tail
    written after the last saved progress is cut; a file shorter than the progress: start over)."""
    rows_done = state["rows_done"]
    paths = {split: os.path.join(partial, image_file(split)) for split in SPLITS}
    want = {split: int(np.searchsorted(idx, rows_done)) * row_bytes for split, idx in splits.items()}
    have = {split: os.path.getsize(path) if os.path.exists(path) else 0 for split, path in paths.items()}
    if any(have[split] < want[split] for split in SPLITS):
        state.update(rows_done=0, source_value_max=None)
        want = dict.fromkeys(SPLITS, 0)
    files = {}
    for split, path in paths.items():
        files[split] = open(path, "ab")
        files[split].truncate(want[split])
    return files


def _convert(cfg: Config, partial: str, state: dict, progress: bool) -> None:
    """Decode the rows not done yet, chunk by chunk, into .partial/ (pixels appended per split,
    synced, then progress saved); then the labels. Leaves state complete, with its splits and value_max."""
    d, m = cfg.data, cfg.model
    with quiet_datasets():
        ds, value_max = load_image_dataset(d)
        images, feature = image_column(ds, d.image_field, m.in_channels)
        labels_N = decode_labels(ds, d.label_field, m.num_classes, d.source)
    num_images = len(images)
    if state["num_images"] != num_images:  # the source changed under an unfinished run: start over
        state.update(num_images=num_images, rows_done=0, source_value_max=None)
    splits = dict(zip(SPLITS, split_examples(num_images, d.val_fraction)))
    # Digits at 8x8 keep their 0..16; everything else is stored on the 8-bit grid.
    exact_digits = resolve_image_source(d).kind == "digits" and m.image_size == DIGITS_SIZE
    store_max = int(DIGITS_MAX) if exact_digits else 255
    files = _append_files(partial, state, splits, m.in_channels * m.image_size ** 2)
    value_max = value_max if value_max is not None else state["source_value_max"]
    bar = tqdm(total=num_images, initial=state["rows_done"], unit="img", desc="prepare images",
               disable=not progress, dynamic_ncols=True)
    try:
        for start in range(state["rows_done"], num_images, CHUNK):
            x_NCHW, value_max = decode_chunk(images[start:start + CHUNK][d.image_field], feature, d.image_field,
                                             m.image_size, m.in_channels, value_max)
            q_NCHW = _quantize(x_NCHW, store_max)
            for split, idx in splits.items():  # sorted indices: this chunk's rows of a split are contiguous
                lo, hi = np.searchsorted(idx, [start, start + len(q_NCHW)])
                files[split].write(np.ascontiguousarray(q_NCHW[idx[lo:hi] - start]))
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
            state.update(rows_done=start + len(q_NCHW), source_value_max=value_max)
            _save_state(partial, state)
            bar.update(len(q_NCHW))
    finally:
        bar.close()
        for f in files.values():
            f.close()
    for split, idx in splits.items():
        path = os.path.join(partial, label_file(split))
        labels_N[idx].numpy().astype("<i8").tofile(path)
        fsync_file(path)
    state.update(complete=True, value_max=store_max,
                 splits={split: {"images": len(idx)} for split, idx in splits.items()})
    _save_state(partial, state)


# -- publishing --------------------------------------------------------------------------------


def _publish(directory: str, out_dir: str, partial: str, state: dict) -> dict:
    """The complete arrays into DIR, then the manifest (written last: it makes DIR data), then
    .partial/ goes. A run killed in between moved some files already: they are taken as found."""
    files = {}
    for name in FILES:
        if os.path.exists(os.path.join(partial, name)):
            os.replace(os.path.join(partial, name), os.path.join(directory, name))
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ConfigError(f"{KEY}: {out_dir}: {name} vanished from an unfinished preparation; delete the "
                              f"directory and prepare it again")
        files[name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    fsync_file(directory)  # the renames are durable before the manifest names the files
    write_manifest(directory, {"kind": KIND, **state["settings"], "dtype": "uint8", "label_dtype": "int64",
                               "value_max": state["value_max"], "splits": state["splits"], "files": files})
    shutil.rmtree(partial, ignore_errors=True)
    return read_manifest(out_dir, KEY, kind=KIND)
