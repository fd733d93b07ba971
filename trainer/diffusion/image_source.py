"""Image sources of DiT recipes: which images data.source names, reading them through HF
`datasets`, and decoding any image column to float32 [N, C, H, W] in [-1, 1] at the recipe's size.

    "digits"   scikit-learn's 8x8 digits (bundled with it: nothing is downloaded), built with
               Dataset.from_dict
    a folder   a local image folder (the "imagefolder" builder: one subfolder per class)
    a name     a hub dataset (offline only when cached)
    a prepared directory (`sparseforge prepare-data`): trainer/diffusion/image_memmap.py reads it

`preflight_image_data` is the cheap, os-only subset of the checks.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from trainer.config import ConfigError, DataConfig
from trainer.datasets_io import load_hub, looks_like_local_path, no_download_count, one_line, quiet_datasets
from trainer.prepared import looks_prepared

# Files the imagefolder builder decodes (PIL); used only to tell an empty folder from a real one.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_MAX = 16.0  # load_digits pixels are counts 0..16 of an 8x8 block of a 32x32 bitmap
CHUNK = 512  # rows decoded at a time: bounded memory for large hub datasets


@dataclass(frozen=True)
class ImageSource:
    kind: str  # "digits" | "folder" | "hub"
    where: str = ""  # the folder's path or the hub dataset's name


def _has_images(root: str) -> bool:
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        if any(f.lower().endswith(IMAGE_EXTS) and not f.startswith(".") for f in files):
            return True
    return False


def resolve_image_source(data_cfg: DataConfig) -> ImageSource:
    """Decide digits / folder / hub, with the os-only checks of a local folder."""
    source = data_cfg.source.strip()
    if not source:
        raise ConfigError('data.source: empty (use "digits", a local image folder, or a hub dataset name)')
    if source == "digits":
        return ImageSource("digits")
    if source == "stdlib":  # the text default: a DiT recipe that forgot to name its images
        raise ConfigError('data.source: "stdlib" is a text corpus; a DiT recipe needs "digits", '
                          'a local image folder (one subfolder per class) or a hub image dataset')
    path = os.path.expanduser(source)
    if os.path.exists(path) or looks_like_local_path(source):
        if not os.path.exists(path):
            raise ConfigError(f"data.source: path not found: {source}")
        if not os.path.isdir(path):
            raise ConfigError(f"data.source: {source} is a file; give an image folder with one subfolder per class")
        if not _has_images(path):
            raise ConfigError(f"data.source: no image files ({', '.join(IMAGE_EXTS)}) under directory {source}")
        return ImageSource("folder", path)
    return ImageSource("hub", source)


def preflight_image_data(data_cfg: DataConfig, model_cfg: ModelConfig | None = None) -> None:
    """Cheap checks (no datasets import, no decoding) before any process is spawned. A prepared
    directory: its manifest, every shard's size (and sha256 unless data.verify_checksums is off)
    and, given the model, its image_size / in_channels / num_classes."""
    if looks_prepared(data_cfg.source):
        from trainer.diffusion.image_memmap import check_prepared_images

        check_prepared_images(data_cfg.source, model_cfg, checksums=data_cfg.verify_checksums)
        return
    resolve_image_source(data_cfg)


# -- loading through `datasets` -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] 0..16, labels int64 [1797]): what sklearn's load_digits returns."""
    # load_digits only parses this file bundled with scikit-learn; reading it directly skips the
    # ~2 s import of sklearn (scipy.stats, pandas) on every rank. load_digits is the fallback.
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    path = next((p for p in (os.path.join(r, "datasets", "data", "digits.csv.gz") for r in roots)
                 if os.path.isfile(p)), None)
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def _digits_dataset(image_field: str, label_field: str):
    """scikit-learn's bundled digits (no download) as a `datasets.Dataset`, raw values 0..16."""
    import datasets

    images, labels = _digits_arrays()
    features = datasets.Features({
        image_field: datasets.Array2D((8, 8), "uint8"),  # 0..16 fits; uint8 keeps it exact and small
        label_field: datasets.ClassLabel(names=[str(i) for i in range(10)]),
    })
    return datasets.Dataset.from_dict({image_field: images, label_field: labels}, features=features)


def _load_folder(path: str, split: str, label: str):
    import datasets

    # A private throw-away cache, as trainer/lm/data.py: ranks on one machine never share or lock
    # one. The arrow rows only point at the image files, which stay where they are.
    with quiet_datasets(), no_download_count(), tempfile.TemporaryDirectory(prefix="sparseforge-images-") as cache:
        try:
            return datasets.load_dataset("imagefolder", data_dir=path, split=split, cache_dir=cache,
                                         keep_in_memory=True)
        except Exception as e:  # noqa: BLE001 - unreadable image, unknown split: say which source, one line
            raise ConfigError(f"data.source: cannot read image folder {label} (split {split!r}): "
                              f"{one_line(e)}") from None


def load_image_dataset(data_cfg: DataConfig):
    """(dataset, value_max): a `datasets.Dataset` with data.image_field and data.label_field, and the
    pixel value that maps to +1 (None: decide from the column, see dataset_to_tensors)."""
    src = resolve_image_source(data_cfg)
    image_field, label_field = data_cfg.image_field, data_cfg.label_field
    if src.kind == "digits":
        return _digits_dataset(image_field, label_field), DIGITS_MAX
    if src.kind == "folder":
        ds = _load_folder(src.where, data_cfg.split, data_cfg.source)
        # The builder always names them image/label (label only when there are class subfolders).
        for fixed, wanted in (("image", image_field), ("label", label_field)):
            if fixed != wanted and fixed in ds.column_names and wanted not in ds.column_names:
                ds = ds.rename_column(fixed, wanted)
    else:
        ds = load_hub(src.where, data_cfg.split)
    for key, field in (("data.image_field", image_field), ("data.label_field", label_field)):
        if field not in ds.column_names:
            hint = " (an image folder needs one subfolder per class)" if src.kind == "folder" else ""
            raise ConfigError(f"{key}: no column {field!r} in {data_cfg.source} "
                              f"(columns: {', '.join(ds.column_names)}){hint}")
    ds = ds.select_columns([image_field, label_field])
    if len(ds) == 0:
        raise ConfigError(f"data.source: {data_cfg.source} has no images")
    return ds, None


# -- decoding: any image column -> float32 [N, C, H, W] in [-1, 1] --------------------------------


def _layout(shape: tuple[int, ...], field: str) -> str:
    """HW, HWC or CHW of one image's array shape (decoded PIL images are HW or HWC)."""
    if len(shape) == 2:
        return "HW"
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return "HWC"
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return "CHW"
    raise ConfigError(f"data.image_field: column {field!r} holds arrays of shape {shape}, not images "
                      f"(HW, HWC or CHW with 1, 3 or 4 channels)")


def _to_NCHW(arr: np.ndarray, field: str) -> torch.Tensor:
    """Same-shaped images [N, ...] -> float32 [N, C, H, W] (C as stored)."""
    x = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: decoded arrays may be read-only
    layout = _layout(tuple(arr.shape[1:]), field)
    if layout == "HW":
        return x[:, None]
    return x.permute(0, 3, 1, 2) if layout == "HWC" else x


def _convert_channels(x_NCHW: torch.Tensor, channels: int) -> torch.Tensor:
    """1/3/4 stored channels -> model.in_channels (alpha dropped, grey = PIL's "L" weights)."""
    C = x_NCHW.shape[1]
    if C == 4:
        x_NCHW, C = x_NCHW[:, :3], 3
    if C == channels:
        return x_NCHW
    if channels == 3:  # C == 1
        return x_NCHW.expand(-1, 3, -1, -1)
    w = x_NCHW.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x_NCHW * w).sum(1, keepdim=True)


def _square_resize(x_NCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Center crop to a square (no aspect distortion), then bilinear + antialias to size x size."""
    H, W = x_NCHW.shape[-2:]
    if H != W:
        s = min(H, W)
        top, left = (H - s) // 2, (W - s) // 2
        x_NCHW = x_NCHW[..., top:top + s, left:left + s]
    if x_NCHW.shape[-1] != size:
        # Antialias matters when shrinking (plain bilinear aliases); bilinear weights are a convex
        # combination, so the result stays in [-1, 1].
        x_NCHW = F.interpolate(x_NCHW, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x_NCHW


def _value_max(feature, first: np.ndarray) -> float:
    """The stored value of full intensity when the loader did not say: 8-bit unless floats in [0, 1]."""
    import datasets

    if isinstance(feature, datasets.Image) or np.issubdtype(first.dtype, np.integer):
        return 255.0
    return 1.0 if float(np.max(first)) <= 1.0 else 255.0


def _image_feature(ds, field: str, channels: int):
    """Decoded image columns are converted by `datasets` itself (PIL convert: palettes, alpha...)."""
    import datasets

    feature = ds.features[field]
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(field, datasets.Image(mode="L" if channels == 1 else "RGB"))
    return ds, ds.features[field]


def decode_labels(ds, field: str, num_classes: int, source: str) -> torch.Tensor:
    """The label column as int64 [N] class ids (names -> sorted ids), checked against num_classes."""
    import datasets

    feature = ds.features[field]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        ds = ds.class_encode_column(field)  # sorted names -> 0..K-1, the same on every rank
    elif not (isinstance(feature, datasets.ClassLabel)
              or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))):
        raise ConfigError(f"data.label_field: column {field!r} of {source} holds {feature}, not integer class ids")
    column = ds.with_format("arrow")[field]  # with any row selection applied, unlike ds.data
    if column.null_count:
        raise ConfigError(f"data.label_field: column {field!r} of {source} has {column.null_count} missing labels")
    labels = torch.from_numpy(column.to_numpy(zero_copy_only=False).astype(np.int64))
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ConfigError(f"data.label_field: label {lo} in {source} is negative (unlabelled images?)")
    if hi >= num_classes:
        raise ConfigError(f"model.num_classes: label {hi} in {source} (column {field!r}) needs "
                          f"model.num_classes >= {hi + 1}, got {num_classes}")
    return labels


def image_column(ds, field: str, channels: int):
    """(ds reduced to the image column in numpy format, its feature): what decode_chunk reads."""
    if channels not in (1, 3):
        raise ConfigError(f"model.in_channels: images are grey (1) or RGB (3), got {channels}")
    ds, feature = _image_feature(ds, field, channels)
    return ds.select_columns([field]).with_format("numpy"), feature


def decode_chunk(column, feature, field: str, image_size: int, channels: int,
                 value_max: float | None) -> tuple[torch.Tensor, float]:
    """Rows of an image column (`ds[a:b][field]` of image_column's ds) -> (float32 [b - a, channels,
    image_size, image_size] in [-1, 1], the value_max used: decided from these rows when None)."""
    # Same-shaped rows come back stacked: converted in one go; mixed sizes one by one.
    groups = [column] if isinstance(column, np.ndarray) and column.dtype != object else \
        [np.asarray(a)[None] for a in column]
    out = []
    for arr in groups:
        if value_max is None:
            value_max = _value_max(feature, arr)
        x = _convert_channels(_to_NCHW(arr, field), channels)
        # value_max/2 -> 0: 8-bit x/127.5 - 1, digits x/8 - 1.
        out.append(_square_resize(x / (value_max / 2) - 1.0, image_size))
    return (out[0] if len(out) == 1 else torch.cat(out)), value_max


def dataset_to_tensors(ds, image_field: str, label_field: str, image_size: int, channels: int,
                       num_classes: int, value_max: float | None = None,
                       source: str = "data.source") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, channels, image_size, image_size] in [-1, 1], labels int64 [N])."""
    images, feature = image_column(ds, image_field, channels)
    labels_N = decode_labels(ds, label_field, num_classes, source)
    out = torch.empty(len(images), channels, image_size, image_size, dtype=torch.float32)
    for start in range(0, len(images), CHUNK):
        x, value_max = decode_chunk(images[start:start + CHUNK][image_field], feature, image_field, image_size,
                                    channels, value_max)
        out[start:start + len(x)] = x
    return out, labels_N
