"""trainer.diffusion.prepare_images + image_memmap: a prepared image set trains bitwise as the
in-memory images, stays memory-mapped, resumes; every bad input is one line before anything starts."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from trainer.config import Config, ConfigError, DataConfig
from trainer.diffusion import prepare_images as prep
from trainer.diffusion.image_data import ImageData, build_image_data
from trainer.diffusion.image_memmap import ImageArray
from trainer.diffusion.image_source import preflight_image_data
from trainer.diffusion.prepare_images import prepare_images
from trainer.prepared import MANIFEST, PARTIAL

FILES = ["train_images.bin", "train_labels.bin", "val_images.bin", "val_labels.bin"]


def _cfg(source="digits", image_size=8, in_channels=1, num_classes=10, **data) -> Config:
    return Config(model=ModelConfig(family="dit", image_size=image_size, in_channels=in_channels,
                                    num_classes=num_classes),
                  data=DataConfig(source=str(source), **data))


def _on(cfg: Config, directory, **data) -> Config:
    """cfg training from a prepared directory (model unchanged)."""
    return Config(model=cfg.model, data=dataclasses.replace(cfg.data, source=str(directory), **data))


def _one_line(match, fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """(cfg, directory, manifest) of digits prepared once for the module (read-only: copy to damage it)."""
    cfg = _cfg(hflip=True)
    directory = tmp_path_factory.mktemp("prepared") / "digits"
    return cfg, directory, prepare_images(cfg, str(directory), progress=False)


# --------------------------------------------------------------------------- digits: same batches


def test_digits_manifest(digits_dir):
    _, directory, manifest = digits_dir
    assert manifest["kind"] == "images" and manifest["value_max"] == 16 and manifest["source"] == "digits"
    assert (manifest["image_size"], manifest["in_channels"], manifest["num_classes"]) == (8, 1, 10)
    assert manifest["splits"] == {"train": {"images": 1707}, "val": {"images": 90}}
    assert manifest["val_fraction"] == 0.05 and (manifest["dtype"], manifest["label_dtype"]) == ("uint8", "int64")
    assert sorted(manifest["files"]) == FILES
    assert manifest["files"]["train_images.bin"]["bytes"] == 1707 * 64
    assert sorted(os.listdir(directory)) == sorted(FILES + [MANIFEST])  # .partial/ is gone
    assert json.loads((directory / MANIFEST).read_text()) == manifest


def test_digits_prepared_batches_are_bitwise_the_in_memory_ones(digits_dir):
    cfg, directory, _ = digits_dir
    for dp_rank in (0, 1):  # flips and order are keyed by stream position: both ranks of dp=2
        plain = build_image_data(cfg.data, cfg.model, 8, dp_rank=dp_rank, dp_size=2, seed=3)
        mapped = build_image_data(_on(cfg, directory).data, cfg.model, 8, dp_rank=dp_rank, dp_size=2, seed=3)
        flipped = False
        for (x, y), (mx, my) in zip(_take(plain.train_batches(), 5), _take(mapped.train_batches(), 5)):
            assert mx.dtype == torch.float32 and torch.equal(x, mx) and torch.equal(y, my)
            flipped |= bool(plain.flips(plain.sampler.last_positions).any())
        assert flipped  # hflip was exercised
        for (x, y), (mx, my) in zip(plain.val_batches(3), mapped.val_batches(3)):
            assert torch.equal(x, mx) and torch.equal(y, my)
    for split in ("train", "val"):
        a, b = plain.real_images(50, split=split), mapped.real_images(50, split=split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(plain.train_images()[0], mapped.train_images()[0])
    assert torch.equal(plain.val_images()[1], mapped.val_images()[1])
    assert mapped.num_classes == 10 and (mapped.num_train, mapped.num_val) == (1707, 90)
    assert "memory-mapped" in mapped.summary() and "(digits)" in mapped.summary()
    assert len(mapped.fingerprint) == 64 and mapped.fingerprint != plain.fingerprint  # from the manifest


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_prepared_set_stays_on_disk(digits_dir):
    cfg, directory, _ = digits_dir
    data = build_image_data(_on(cfg, directory).data, cfg.model, 16)
    for images, labels in ((data.train_images_NCHW, data.train_labels_N), (data.val_images_NCHW, data.val_labels_N)):
        assert isinstance(images, ImageArray) and isinstance(images.pixels_NCHW, np.memmap)
        assert images.pixels_NCHW.dtype == np.uint8 and images.pixels_NCHW.mode == "r"
        assert isinstance(labels, np.memmap) and labels.mode == "r"
        assert os.path.dirname(images.pixels_NCHW.filename) == str(directory)
    next(data.train_batches())
    assert isinstance(data.train_images_NCHW.pixels_NCHW, np.memmap)  # a batch did not load the split


def test_resume_continues_the_stream(digits_dir):
    cfg, directory, _ = digits_dir
    on = _on(cfg, directory)
    first = build_image_data(on.data, cfg.model, 16, seed=1)
    it = first.train_batches()
    _take(it, 3)
    state = first.state_dict()
    expected = _take(it, 2)
    second = build_image_data(on.data, cfg.model, 16, seed=1)
    second.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, _take(second.train_batches(), 2)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_rerun_with_the_same_settings_is_a_no_op(digits_dir, capsys):
    cfg, directory, manifest = digits_dir
    before = {name: os.stat(directory / name).st_mtime_ns for name in FILES + [MANIFEST]}
    assert prepare_images(cfg, str(directory), progress=False) == manifest
    assert {name: os.stat(directory / name).st_mtime_ns for name in FILES + [MANIFEST]} == before
    out, err = capsys.readouterr()
    assert out == "" and "already holds this data" in err


# --------------------------------------------------------------------------- a folder: resize + quantize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 RGB PNGs of 10x10 in two class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_folder_resized_and_quantized(folder, tmp_path):
    cfg = _cfg(folder, image_size=8, in_channels=3, num_classes=2, val_fraction=0.25)
    manifest = prepare_images(cfg, str(tmp_path / "p"), progress=False)
    assert manifest["value_max"] == 255 and manifest["source"] == str(folder)
    assert manifest["splits"] == {"train": {"images": 9}, "val": {"images": 3}}
    assert manifest["files"]["train_images.bin"]["bytes"] == 9 * 3 * 8 * 8
    plain = build_image_data(cfg.data, cfg.model, 4)
    mapped = build_image_data(_on(cfg, tmp_path / "p").data, cfg.model, 4)
    assert mapped.train_images_NCHW.shape == (9, 3, 8, 8)
    x, mx = plain.train_images()[0], mapped.train_images()[0]
    assert not torch.equal(x, mx)  # resized floats are quantized...
    assert torch.allclose(x, mx, atol=1 / 255 + 1e-6)  # ...to within half a step of 2/255
    assert torch.equal(plain.val_images()[1], mapped.val_images()[1])


def test_folder_at_its_own_size_is_exact(folder, tmp_path):
    cfg = _cfg(folder, image_size=10, in_channels=3, num_classes=2, val_fraction=0.25)
    manifest = prepare_images(cfg, str(tmp_path / "p"), progress=False)
    assert manifest["value_max"] == 255
    plain = build_image_data(cfg.data, cfg.model, 4)
    mapped = build_image_data(_on(cfg, tmp_path / "p").data, cfg.model, 4)
    assert torch.equal(plain.train_images()[0], mapped.train_images()[0])
    assert torch.equal(plain.val_images()[0], mapped.val_images()[0])


# --------------------------------------------------------------------------- interrupted, then resumed


def test_interrupted_run_is_refused_then_resumed(digits_dir, tmp_path, monkeypatch):
    cfg, _, manifest = digits_dir
    out = tmp_path / "p"
    decode, calls = prep.decode_chunk, []

    def counted(*args, **kwargs):
        calls.append(1)
        if kill_at and len(calls) == kill_at:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(prep, "decode_chunk", counted)
    kill_at = 3  # killed in the third of four chunks of 512
    with pytest.raises(KeyboardInterrupt):
        prepare_images(cfg, str(out), progress=False)
    assert os.listdir(out) == [PARTIAL]
    assert json.loads((out / PARTIAL / "progress.json").read_text())["rows_done"] == 1024
    on = _on(cfg, out)
    _one_line(f"data.source: {out} is an unfinished prepare-data output", preflight_image_data, on.data, cfg.model)
    _one_line("unfinished prepare-data output", build_image_data, on.data, cfg.model, 16)
    # Other settings are refused; the same settings go on from row 1024 (two chunks left).
    msg = _one_line("model.image_size", prepare_images, _cfg(image_size=16), str(out), progress=False)
    assert str(out) in msg and "unfinished preparation" in msg
    calls.clear()
    kill_at = 0
    again = prepare_images(cfg, str(out), progress=False)
    assert len(calls) == 2 and again["files"] == manifest["files"]  # bytes and sha256 as a whole run's
    assert not (out / PARTIAL).exists()


def test_killed_before_the_manifest(digits_dir, tmp_path, monkeypatch):
    cfg, _, manifest = digits_dir
    out = tmp_path / "p"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_images(cfg, str(out), progress=False)
    assert sorted(os.listdir(out)) == sorted(FILES + [PARTIAL])  # arrays moved, no manifest: not data
    _one_line("unfinished prepare-data output", preflight_image_data, _on(cfg, out).data, cfg.model)
    monkeypatch.undo()
    assert prepare_images(cfg, str(out), progress=False)["files"] == manifest["files"]
    assert sorted(os.listdir(out)) == sorted(FILES + [MANIFEST])


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def damaged(digits_dir, tmp_path):
    """A private copy of the prepared digits, to damage."""
    cfg, directory, _ = digits_dir
    return cfg, _copy(directory, tmp_path / "copy")


def test_missing_shard(damaged):
    cfg, directory = damaged
    os.remove(directory / "val_labels.bin")
    on = _on(cfg, directory)
    msg = _one_line("shard val_labels.bin is missing", preflight_image_data, on.data, cfg.model)
    assert msg.startswith(f"data.source: {directory}")
    _one_line("shard val_labels.bin is missing", build_image_data, on.data, cfg.model, 16)


def test_truncated_shard(damaged):
    cfg, directory = damaged
    with open(directory / "train_images.bin", "r+b") as f:
        f.truncate(1000)
    on = _on(cfg, directory)
    _one_line("shard train_images.bin has 1,000 bytes, the manifest says 109,248", preflight_image_data,
              on.data, cfg.model)
    _one_line("train_images.bin has 1,000 bytes", build_image_data, on.data, cfg.model, 16)


def test_checksum_mismatch(damaged):
    cfg, directory = damaged
    with open(directory / "train_images.bin", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    _one_line("shard train_images.bin does not match its checksum", preflight_image_data,
              _on(cfg, directory).data, cfg.model)
    preflight_image_data(_on(cfg, directory, verify_checksums=False).data, cfg.model)  # sizes only: passes


@pytest.mark.parametrize("model", [dict(image_size=16), dict(in_channels=3), dict(num_classes=12)])
def test_recipe_mismatch(digits_dir, model):
    cfg, directory, _ = digits_dir
    (key, want), = model.items()
    other = _cfg(**{**dict(image_size=8, in_channels=1, num_classes=10), **model})
    on = _on(other, directory)
    have = {"image_size": 8, "in_channels": 1, "num_classes": 10}[key]
    msg = _one_line(f"was prepared with {key}={have}, the recipe has model.{key}={want}",
                    preflight_image_data, on.data, other.model)
    assert msg.startswith(f"data.source: {directory}")
    _one_line(f"model.{key}={want}", build_image_data, on.data, other.model, 16)


def test_rerun_with_other_settings_is_refused(digits_dir):
    cfg, directory, _ = digits_dir
    for other, key in ((_cfg(image_size=16), "model.image_size=8"), (_cfg(val_fraction=0.1), "data.val_fraction"),
                       (_cfg(split="test"), "data.split")):
        msg = _one_line(key, prepare_images, other, str(directory), progress=False)
        assert msg.startswith(f"--out: {directory} was prepared")


def test_other_directories_are_refused(digits_dir, tmp_path):
    cfg, directory, _ = digits_dir
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    _one_line("is not empty and is not a prepare-data output", prepare_images, cfg, str(tmp_path / "notes"),
              progress=False)
    assert os.listdir(tmp_path / "notes") == ["a.txt"]
    (tmp_path / "file").write_text("x")
    _one_line("is a file", prepare_images, cfg, str(tmp_path / "file"), progress=False)
    _one_line("is a prepared data directory already", prepare_images, _on(cfg, directory), str(tmp_path / "new"),
              progress=False)
    text = _copy(directory, tmp_path / "text")
    manifest = json.loads((text / MANIFEST).read_text())
    (text / MANIFEST).write_text(json.dumps({**manifest, "kind": "text"}))
    _one_line("holds prepared text, not images", preflight_image_data, _on(cfg, text).data, cfg.model)
    _one_line("holds prepared text, not images", prepare_images, cfg, str(text), progress=False)


def test_inconsistent_manifest(damaged):
    cfg, directory = damaged
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["splits"]["train"]["images"] += 1
    (directory / MANIFEST).write_text(json.dumps(manifest))
    _one_line("lists train_images.bin with 109248 bytes for 1708 train images", build_image_data,
              _on(cfg, directory).data, cfg.model, 16)


def test_image_arrays_without_a_manifest():
    pixels = np.zeros((4, 1, 8, 8), np.uint8)
    x, labels = ImageArray(pixels, 255), np.arange(4, dtype=np.int64)
    with pytest.raises(ValueError, match="int64"):
        ImageData(x, labels.astype(np.int32), x, labels, 2)
    before = ImageData(x, labels, x, labels, 2).fingerprint  # hashed from the bytes, a chunk at a time
    pixels[3, 0, 7, 7] = 1
    assert ImageData(x, labels, x, labels, 2).fingerprint != before
    assert ImageData(ImageArray(pixels, 16), labels, x, labels, 2).fingerprint != before
