"""Image data (DiT recipes): source (through HF `datasets`) -> [-1, 1] tensors -> split -> rank shards.

Flow on every rank (each rank builds the same thing independently; nothing is downloaded):

    load_image_dataset   a `datasets.Dataset` with an image and an integer label column, for every
                         source alike: "digits" (scikit-learn's 8x8 digits, built with
                         Dataset.from_dict), a local image folder (the "imagefolder" builder: one
                         subfolder per class) or a hub dataset (offline only when cached)
    dataset_to_tensors   float32 [N, C, H, W] in [-1, 1] (channels, square crop, resize) + int64 labels
    split_examples       whole images held out for validation (fixed seed: same split for any train.seed)
    ImageData            epoch e visits the training images in a permutation seeded by (seed, e);
                         global micro-batch k of an epoch is images [k*G, (k+1)*G) of that order
                         (G = micro_batch_size * dp_size) and rank r takes rows [r*B, (r+1)*B)

The interface is TextData's (trainer/lm/data.py): train_batches(), val_batches(n), state_dict(),
load_state_dict(), global_batch_size; batches are (images_BCHW float32, labels_B int64).
`preflight_image_data` is the cheap, os-only subset of the checks.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from trainer.config import ConfigError, DataConfig
from trainer.lm.data import _load_hub, _quiet_datasets, looks_like_local_path
from trainer.lm.tokenizer import one_line

__all__ = [
    "IMAGE_EXTS", "ImageSource", "resolve_image_source", "preflight_image_data", "load_image_dataset",
    "dataset_to_tensors", "split_examples", "ImageData", "build_image_data",
]

# Files the imagefolder builder decodes (PIL); used only to tell an empty folder from a real one.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_MAX = 16.0  # load_digits pixels are counts 0..16 of an 8x8 block of a 32x32 bitmap
SPLIT_SEED = 0  # the train/val split never depends on train.seed (as trainer/lm/data.py)
_FLIP_STREAM = 0x666C6970  # "flip": keeps the flip draws apart from the epoch permutations
_CHUNK = 512  # rows decoded at a time: bounded memory for large hub datasets


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


def preflight_image_data(data_cfg: DataConfig) -> None:
    """Cheap checks (no datasets import, no decoding) before any process is spawned."""
    resolve_image_source(data_cfg)


# ---------------------------------------------------------------------------------------------
# Loading through `datasets`


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
    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="sparseforge-images-") as cache:
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
        ds = _load_hub(src.where, data_cfg.split)
    for key, field in (("data.image_field", image_field), ("data.label_field", label_field)):
        if field not in ds.column_names:
            hint = " (an image folder needs one subfolder per class)" if src.kind == "folder" else ""
            raise ConfigError(f"{key}: no column {field!r} in {data_cfg.source} "
                              f"(columns: {', '.join(ds.column_names)}){hint}")
    ds = ds.select_columns([image_field, label_field])
    if len(ds) == 0:
        raise ConfigError(f"data.source: {data_cfg.source} has no images")
    return ds, None


# ---------------------------------------------------------------------------------------------
# Decoding: any image column -> float32 [N, C, H, W] in [-1, 1]


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


def _labels(ds, field: str, num_classes: int, source: str) -> torch.Tensor:
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


def dataset_to_tensors(ds, image_field: str, label_field: str, image_size: int, channels: int,
                       num_classes: int, value_max: float | None = None,
                       source: str = "data.source") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, channels, image_size, image_size] in [-1, 1], labels int64 [N])."""
    if channels not in (1, 3):
        raise ConfigError(f"model.in_channels: images are grey (1) or RGB (3), got {channels}")
    labels_N = _labels(ds, label_field, num_classes, source)
    ds, feature = _image_feature(ds, image_field, channels)
    ds = ds.select_columns([image_field]).with_format("numpy")
    out = torch.empty(len(ds), channels, image_size, image_size, dtype=torch.float32)
    for start in range(0, len(ds), _CHUNK):
        column = ds[start:start + _CHUNK][image_field]
        # Same-shaped rows come back stacked: converted in one go; mixed sizes one by one.
        groups = [column] if isinstance(column, np.ndarray) and column.dtype != object else \
            [np.asarray(a)[None] for a in column]
        row = start
        for arr in groups:
            if value_max is None:
                value_max = _value_max(feature, arr)
            x = _convert_channels(_to_NCHW(arr, image_field), channels)
            # value_max/2 -> 0: 8-bit x/127.5 - 1, digits x/8 - 1.
            x = _square_resize(x / (value_max / 2) - 1.0, image_size)
            out[row:row + len(x)] = x
            row += len(x)
    return out, labels_N


def split_examples(num_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, each sorted: the last val_fraction of a fixed permutation."""
    num_val = max(1, int(round(num_examples * val_fraction)))
    if num_examples - num_val < 1:
        raise ConfigError(f"data.val_fraction: {num_examples} image(s) cannot be split into train and validation "
                          f"(data.val_fraction={val_fraction}); give more images")
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
    return np.sort(perm[: num_examples - num_val]), np.sort(perm[num_examples - num_val:])


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable data-parallel batches


class ImageData:
    """Train/val images of one run, sharded over data-parallel ranks.

    Epoch e visits the training images in a permutation seeded by (seed, e), cut into N // G global
    micro-batches of G = micro_batch_size * dp_size images (the few left over are skipped that
    epoch). Rank r takes rows [r*B, (r+1)*B) of each global micro-batch. With hflip, the flips of
    global micro-batch n are drawn for all G rows from (seed, n) and then sliced like the images:
    like the order, they depend on G and the position only, never on how G is split over ranks,
    and a resumed run draws them again identically.
    """

    def __init__(self, train_images_NCHW: torch.Tensor, train_labels_N: torch.Tensor,
                 val_images_NCHW: torch.Tensor, val_labels_N: torch.Tensor, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, hflip: bool = False,
                 num_classes: int | None = None, source: str = ""):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        for name, x, y in (("training", train_images_NCHW, train_labels_N),
                           ("validation", val_images_NCHW, val_labels_N)):
            if x.ndim != 4 or x.dtype != torch.float32 or y.dtype != torch.int64 or len(x) != len(y):
                raise ValueError(f"{name} split: want float32 [N, C, H, W] images and int64 [N] labels, "
                                 f"got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
            if len(x) == 0:
                raise ConfigError(f"data.source: the {name} split of {source or 'the images'} is empty")
        self.train_images_NCHW, self.train_labels_N = train_images_NCHW, train_labels_N
        self.val_images_NCHW, self.val_labels_N = val_images_NCHW, val_labels_N
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.hflip = hflip
        self.global_batch_size = micro_batch_size * dp_size  # G: images per global micro-batch
        self.in_channels, self.image_size = train_images_NCHW.shape[1], train_images_NCHW.shape[-1]
        self.num_classes = num_classes if num_classes is not None else int(train_labels_N.max()) + 1
        self.source = source
        if len(train_images_NCHW) < self.global_batch_size:
            raise ConfigError(f"data.source: the training split has {len(train_images_NCHW)} images, fewer than "
                              f"one global micro-batch of {self.global_batch_size} (train.micro_batch_size x dp)")
        self.batches_per_epoch = len(train_images_NCHW) // self.global_batch_size
        self._consumed = 0  # global micro-batches handed out so far (by every rank alike)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch
        self._fingerprint: str | None = None

    # -- summary ------------------------------------------------------------------------------

    @property
    def num_train_examples(self) -> int:
        return len(self.train_images_NCHW)

    @property
    def num_val_examples(self) -> int:
        return len(self.val_images_NCHW)

    num_train, num_val = num_train_examples, num_val_examples  # short names (the run summary uses them)

    def summary(self) -> str:
        """One line for the run log."""
        return (f"{self.num_train_examples:,} training / {self.num_val_examples:,} validation images "
                f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes"
                f"{f' ({self.source})' if self.source else ''}{', h-flips' if self.hflip else ''}")

    @property
    def fingerprint(self) -> str:
        """sha256 of the training split (pixels and labels): the data part of cache keys."""
        if self._fingerprint is None:  # computed once, on first use
            h = hashlib.sha256()
            h.update(self.train_images_NCHW.contiguous().numpy().tobytes())
            h.update(self.train_labels_N.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- batches ------------------------------------------------------------------------------

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            # (seed, epoch) as a seed sequence: seed 1 epoch 0 never repeats seed 0 epoch 1.
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_train_examples))
        return self._perm[1]

    def global_batch_indices(self, n: int) -> np.ndarray:
        """Training image indices of global micro-batch n (all ranks together, G of them)."""
        epoch, k = divmod(n, self.batches_per_epoch)
        G = self.global_batch_size
        return self._epoch_perm(epoch)[k * G:(k + 1) * G]

    def global_batch_flips(self, n: int) -> np.ndarray:
        """bool [G]: which rows of global micro-batch n are flipped (all False without hflip)."""
        if not self.hflip:
            return np.zeros(self.global_batch_size, dtype=bool)
        return np.random.default_rng([self.seed, n, _FLIP_STREAM]).random(self.global_batch_size) < 0.5

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, C, H, W] float32 in [-1, 1], labels [B] int64), forever, from the saved position."""
        B, r = self.micro_batch_size, self.dp_rank
        while True:
            n = self._consumed
            rows = slice(r * B, (r + 1) * B)
            idx = torch.from_numpy(self.global_batch_indices(n)[rows])
            images_BCHW, labels_B = self.train_images_NCHW[idx], self.train_labels_N[idx]
            flips_B = torch.from_numpy(self.global_batch_flips(n)[rows])
            if flips_B.any():
                images_BCHW[flips_B] = images_BCHW[flips_B].flip(-1)  # indexing copied: the split is untouched
            # Counted before the yield: after k batches were handed out, state_dict() says k.
            self._consumed += 1
            yield images_BCHW, labels_B

    @property
    def consumed(self) -> int:
        """Global micro-batches handed out so far: the batch last yielded is number consumed - 1."""
        return self._consumed

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the first num_batches*G validation images (in order, wrapping; no flips)."""
        B, G, n = self.micro_batch_size, self.global_batch_size, self.num_val_examples
        out = []
        for b in range(num_batches):
            start = b * G + self.dp_rank * B
            idx = torch.from_numpy(np.arange(start, start + B) % n)
            out.append((self.val_images_NCHW[idx], self.val_labels_N[idx]))
        return out

    # -- whole splits, for evaluation ---------------------------------------------------------

    def train_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training split: (images [N, C, H, W], labels [N]); shared, do not modify."""
        return self.train_images_NCHW, self.train_labels_N

    def val_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole validation split: (images [N, C, H, W], labels [N]); shared, do not modify."""
        return self.val_images_NCHW, self.val_labels_N

    def real_images(self, n: int | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """n images of a split (all when n is None or more than there are) in a fixed seeded order:
        the same reference set for every evaluation of a run and for every train.seed."""
        images, labels = self.train_images() if split == "train" else self.val_images()
        if n is None or n >= len(images):
            return images, labels
        idx = torch.from_numpy(np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(images))[:n]))
        return images[idx], labels[idx]

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "global_micro_batches": self._consumed,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "num_train_examples": self.num_train_examples,
        }

    def load_state_dict(self, state: dict) -> None:
        # Exact resume needs the same order: same images (source, split), seed and G. data.hflip
        # may change on purpose (augmentation on/off); it does not move the position.
        saved = (state["seed"], state["num_train_examples"], state["global_batch_size"])
        here = (self.seed, self.num_train_examples, self.global_batch_size)
        if saved != here:
            raise ConfigError(
                f"data: checkpoint data state (seed, training images, global micro-batch) = {saved} does not "
                f"match this run's {here}; train.seed, data.* or train.micro_batch_size x dp changed")
        self._consumed = int(state["global_micro_batches"])


def build_image_data(data_cfg: DataConfig, model_cfg: ModelConfig, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, seed: int = 0) -> ImageData:
    """The one entry point: source + decoding + split + this rank's batches."""
    ds, value_max = load_image_dataset(data_cfg)
    images_NCHW, labels_N = dataset_to_tensors(
        ds, data_cfg.image_field, data_cfg.label_field, model_cfg.image_size, model_cfg.in_channels,
        model_cfg.num_classes, value_max, source=data_cfg.source)
    train_idx, val_idx = split_examples(len(images_NCHW), data_cfg.val_fraction)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    # Names the images in logs and classifier cache keys (a folder or hub dataset has splits).
    source = "digits" if data_cfg.source.strip() == "digits" else f"{data_cfg.source}:{data_cfg.split}"
    return ImageData(images_NCHW[train_idx], labels_N[train_idx], images_NCHW[val_idx], labels_N[val_idx],
                     micro_batch_size, dp_rank, dp_size, seed, hflip=data_cfg.hflip,
                     num_classes=model_cfg.num_classes, source=source)
