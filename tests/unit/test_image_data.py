"""trainer.diffusion.image_data: digits / image folder through `datasets`, normalisation, dp sharding, flips, resume."""
import os

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from trainer.config import ConfigError, DataConfig
from trainer.diffusion.image_data import ImageData, build_image_data, split_examples
from trainer.diffusion.image_source import _digits_arrays, dataset_to_tensors, preflight_image_data


def _model(image_size=8, in_channels=1, num_classes=10):
    return ModelConfig(family="dit", image_size=image_size, in_channels=in_channels, num_classes=num_classes)


@pytest.fixture(scope="module")
def digits():
    return build_image_data(DataConfig(source="digits"), _model(), micro_batch_size=16)


def _synthetic(n=30, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, hflip=False):
    # Pixel [0, 0, 0] of image i encodes i and the image is not left-right symmetric, so a row
    # names the image it came from and a flip is visible.
    x = torch.linspace(-1, 1, 8).expand(n, 1, 8, 8).clone()
    x[:, 0, 0, 0] = torch.arange(n) / n
    y = torch.arange(n) % 10
    return ImageData(x, y, x[:3].clone(), y[:3].clone(), micro_batch_size, dp_rank, dp_size, seed,
                     hflip=hflip, num_classes=10, source="synthetic")


def _ids(images_BCHW, n=30):
    return [round(float(v) * n) for v in images_BCHW[:, 0, 0, 0]]


def _take(it, k):
    return [next(it) for _ in range(k)]


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range_and_normalisation(digits):
    assert (digits.num_train_examples, digits.num_val_examples) == (1707, 90)
    assert (digits.num_train, digits.num_val) == (1707, 90)
    assert "1,707 training / 90 validation" in digits.summary()
    x, y = next(digits.train_batches())
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    tx, ty = digits.train_images()
    assert float(tx.min()) == -1.0 and float(tx.max()) == 1.0
    # Exactly raw/8 - 1 of sklearn's values, in the split's (sorted) order.
    raw, labels = _digits_arrays()
    train_idx, val_idx = split_examples(len(raw), 0.05)
    assert torch.equal(tx[:, 0], torch.from_numpy(raw[train_idx]).float() / 8 - 1)
    assert torch.equal(ty, torch.from_numpy(labels[train_idx]))
    vx, vy = digits.val_images()
    assert torch.equal(vy, torch.from_numpy(labels[val_idx])) and vx.shape == (90, 1, 8, 8)


def test_digits_resized_to_rgb():
    data = build_image_data(DataConfig(source="digits"), _model(image_size=16, in_channels=3), 4)
    x, _ = data.train_images()
    assert x.shape == (1707, 3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey copied to RGB
    # Area-preserving: the mean intensity of an image survives the bilinear antialiased resize.
    raw, _ = _digits_arrays()
    small = torch.from_numpy(raw[split_examples(len(raw), 0.05)[0]]).float() / 8 - 1
    assert torch.allclose(x[:, 0].mean((1, 2)), small.mean((1, 2)), atol=1e-5)


def test_split_is_fixed_and_disjoint():
    a_train, a_val = split_examples(100, 0.1)
    b_train, b_val = split_examples(100, 0.1)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert len(a_val) == 10 and not set(a_train) & set(a_val) and len(set(a_train) | set(a_val)) == 100
    _one_line_error("data.val_fraction", split_examples, 1, 0.5)


# --------------------------------------------------------------------------- batches


def test_dp_slices_are_disjoint_and_cover_the_global_batch():
    whole = _synthetic(micro_batch_size=6, dp_size=1).train_batches()
    ranks = [_synthetic(micro_batch_size=2, dp_rank=r, dp_size=3).train_batches() for r in range(3)]
    for _ in range(12):  # 12 global batches of 6 over 30 images: several epochs
        gx, gy = next(whole)
        parts = [next(it) for it in ranks]
        ids = [_ids(x) for x, _ in parts]
        assert all(len(i) == 2 for i in ids)
        flat = sum(ids, [])
        assert len(set(flat)) == 6  # disjoint: no image twice in a global batch
        assert flat == _ids(gx)  # covering: the ranks' slices are the global batch, in order
        assert torch.equal(torch.cat([y for _, y in parts]), gy)


def test_epochs_reshuffled_and_each_epoch_visits_distinct_images():
    data = _synthetic(n=30, micro_batch_size=10)  # 3 batches per epoch
    it = data.train_batches()
    epochs = [sum((_ids(next(it)[0]) for _ in range(3)), []) for _ in range(3)]
    for ids in epochs:
        assert sorted(ids) == list(range(30))
    assert epochs[0] != epochs[1] != epochs[2]
    # The order depends on (seed, epoch): another seed, another order.
    other = _synthetic(n=30, micro_batch_size=10, seed=1).train_batches()
    assert sum((_ids(next(other)[0]) for _ in range(3)), []) != epochs[0]


@pytest.mark.parametrize("hflip", [False, True])
def test_exact_resume_mid_epoch_and_across_epochs(hflip):
    for done in (2, 7):  # mid-epoch, and after an epoch boundary (5 batches per epoch)
        first = _synthetic(micro_batch_size=6, hflip=hflip)
        it = first.train_batches()
        _take(it, done)
        state = first.state_dict()
        assert state["global_micro_batches"] == done
        expected = _take(it, 6)
        resumed = _synthetic(micro_batch_size=6, hflip=hflip)
        resumed.load_state_dict(state)
        for (ex, ey), (gx, gy) in zip(expected, _take(resumed.train_batches(), 6)):
            assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_digits_exact_resume():
    data = build_image_data(DataConfig(source="digits", hflip=True), _model(), 16)
    it = data.train_batches()
    _take(it, 5)
    state, expected = data.state_dict(), _take(it, 3)
    again = build_image_data(DataConfig(source="digits", hflip=True), _model(), 16)
    again.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(expected, _take(again.train_batches(), 3)))


def test_resume_with_another_global_batch_goes_on_from_the_same_image():
    first = _synthetic(micro_batch_size=4)
    _take(first.train_batches(), 3)  # 12 images of the stream
    state, expected = first.state_dict(), _take(first.train_batches(), 2)
    half = _synthetic(micro_batch_size=2, dp_size=1)
    half.load_state_dict(state)  # G 4 -> 2: the next 4 batches are the same 8 images
    got = _take(half.train_batches(), 4)
    assert torch.equal(torch.cat([x for x, _ in got]), torch.cat([x for x, _ in expected]))
    # The same G split differently over ranks resumes fine; another seed is refused.
    _synthetic(micro_batch_size=2, dp_rank=1, dp_size=2).load_state_dict(state)
    msg = _one_line_error("train.seed", _synthetic(micro_batch_size=4, seed=1).load_state_dict, state)
    assert msg.startswith("data:")


def test_hflip_off_by_default_and_deterministic_when_on():
    assert DataConfig().hflip is False
    plain = _synthetic(micro_batch_size=6)
    x_all, _ = plain.train_images()
    for n, (x, _) in enumerate(_take(plain.train_batches(), 5)):
        assert torch.equal(x, x_all[torch.from_numpy(plain.sampler.global_batch(n))])  # never flipped
    flipped = 0
    on = _synthetic(micro_batch_size=6, hflip=True)
    again = _synthetic(micro_batch_size=6, hflip=True).train_batches()
    for n, (x, _) in enumerate(_take(on.train_batches(), 5)):
        raw = x_all[torch.from_numpy(on.sampler.global_batch(n))]
        for row, ref, flip in zip(x, raw, on.flips(range(6 * n, 6 * n + 6))):
            assert torch.equal(row, ref.flip(-1) if flip else ref)
            flipped += int(flip)
        assert torch.equal(x, next(again)[0])  # same seed, same flips
    assert 5 <= flipped <= 25  # about half of 30 rows
    assert torch.equal(x_all, plain.train_images()[0]) and torch.equal(on.train_images()[0], x_all)  # split untouched
    # Flips follow the global batch, not the rank layout: 3 ranks x 2 == 1 rank x 6.
    ranks = [_synthetic(micro_batch_size=2, dp_rank=r, dp_size=3, hflip=True).train_batches() for r in range(3)]
    whole = _synthetic(micro_batch_size=6, hflip=True).train_batches()
    for _ in range(4):
        assert torch.equal(torch.cat([next(it)[0] for it in ranks]), next(whole)[0])


def test_val_batches_fixed_and_sliced_per_rank():
    data = _synthetic(micro_batch_size=2, dp_rank=1, dp_size=2, hflip=True)
    a, b = data.val_batches(3), data.val_batches(3)
    assert len(a) == 3 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    vx, vy = data.val_images()
    # Rank 1 of G = 4 over 3 validation images (wrapping): rows 2,3 -> 2,0; then 6,7 -> 0,1; 10,11 -> 1,2.
    assert [y.tolist() for _, y in a] == [vy[[2, 0]].tolist(), vy[[0, 1]].tolist(), vy[[1, 2]].tolist()]
    assert torch.equal(a[0][0], vx[[2, 0]])  # no flips on validation


def test_real_images_fixed_subset(digits):
    a, la = digits.real_images(100)
    b, lb = digits.real_images(100)
    assert a.shape == (100, 1, 8, 8) and torch.equal(a, b) and torch.equal(la, lb)
    assert digits.real_images()[0] is digits.train_images()[0]
    assert digits.real_images(10_000, split="val")[0].shape[0] == 90


# --------------------------------------------------------------------------- image folders


def _write_folder(root, sizes=((12, 10), (8, 8), (16, 16))):
    from PIL import Image

    for c, (name, value) in enumerate((("class_a", 255), ("class_b", 0))):
        os.makedirs(root / name)
        for i, (h, w) in enumerate(sizes):
            mode = "RGB" if i % 2 else "L"  # mixed modes and sizes: converted on the way
            fill = (value, value, value) if mode == "RGB" else value
            Image.new(mode, (w, h), fill).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_goes_through_the_same_path(tmp_path, channels):
    root = _write_folder(tmp_path / "imgs")
    data = build_image_data(DataConfig(source=str(root), val_fraction=0.2), _model(in_channels=channels), 2)
    assert (data.num_train_examples, data.num_val_examples) == (5, 1)
    x = torch.cat([data.train_images()[0], data.val_images()[0]])
    y = torch.cat([data.train_images()[1], data.val_images()[1]])
    assert x.shape == (6, channels, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]  # class subfolders, sorted: class_a=0, class_b=1
    # class_a is white (255 -> +1), class_b black (0 -> -1), whatever the stored size and mode.
    for img, label in zip(x, y):
        assert torch.allclose(img, torch.full_like(img, 1.0 if label == 0 else -1.0), atol=1e-6)
    bx, by = next(data.train_batches())
    assert bx.shape == (2, channels, 8, 8) and by.shape == (2,)


def test_bad_paths_are_one_line_config_errors(tmp_path):
    missing = str(tmp_path / "nope")
    msg = _one_line_error("data.source", build_image_data, DataConfig(source=missing), _model(), 2)
    assert missing in msg
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    msg = _one_line_error("data.source", preflight_image_data, DataConfig(source=str(tmp_path / "empty")))
    assert "empty" in msg and "no image files" in msg
    _one_line_error("data.source", preflight_image_data, DataConfig(source="stdlib"))
    _one_line_error("data.source", preflight_image_data, DataConfig(source=""))


def test_label_out_of_range_is_a_one_line_config_error(tmp_path):
    msg = _one_line_error("model.num_classes", build_image_data, DataConfig(source="digits"), _model(num_classes=5), 2)
    assert "label 9" in msg and "5" in msg
    root = _write_folder(tmp_path / "imgs", sizes=((8, 8),))
    _one_line_error("model.num_classes", build_image_data, DataConfig(source=str(root), val_fraction=0.5),
                    _model(num_classes=1), 1)


def test_too_small_for_a_global_batch(tmp_path):
    root = _write_folder(tmp_path / "imgs", sizes=((8, 8),))
    _one_line_error("train.micro_batch_size", build_image_data, DataConfig(source=str(root), val_fraction=0.5),
                    _model(), micro_batch_size=1, dp_rank=0, dp_size=2)


def test_folder_without_class_subfolders_names_the_label_field(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), 0).save(tmp_path / f"{i}.png")
    msg = _one_line_error("data.label_field", build_image_data, DataConfig(source=str(tmp_path)), _model(), 1)
    assert "subfolder per class" in msg


def test_array_columns_and_string_labels():
    # What a hub dataset may hold: float CHW arrays in [0, 1] and class names as strings.
    import datasets

    x = np.zeros((4, 3, 6, 6), dtype=np.float32)
    x[1] = 1.0
    x[2, 0] = 1.0  # pure red
    ds = datasets.Dataset.from_dict({"img": x, "name": ["cat", "dog", "cat", "bird"]})
    images, labels = dataset_to_tensors(ds, "img", "name", image_size=4, channels=1, num_classes=3)
    assert images.shape == (4, 1, 4, 4) and labels.tolist() == [1, 2, 1, 0]  # names sorted: bird, cat, dog
    assert torch.allclose(images[0], torch.tensor(-1.0)) and torch.allclose(images[1], torch.tensor(1.0))
    assert torch.allclose(images[2], torch.tensor(2 * 0.299 - 1))  # PIL's grey weights
    _one_line_error("model.num_classes", dataset_to_tensors, ds, "img", "name", 4, 1, 2)
    _one_line_error("model.in_channels", dataset_to_tensors, ds, "img", "name", 4, 2, 3)
