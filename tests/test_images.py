"""Image readers on small fixtures written by the tests: folders of PNG/JPEG, npz and IDX files,
the bundled digits, errors that name the file, atomic writes, exact scaling, and resumable batches."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import images as images_module
from difflab.data.images import DataError, ImageSet, load_images, read_idx, save_npz, to_model, to_uint8, write_idx
from difflab.data.loader import ShuffledBatches, TensorDataset


def save_png(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def rows(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


# --------------------------------------------------------------------------- folders


def test_folder_with_class_subfolders_gives_labels_and_exact_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(0, 256, (10, 12), dtype=np.uint8) for name in ("cat/a", "cat/b", "dog/c")}  # (H, W)
    for name, array in arrays.items():
        save_png(tmp_path / f"{name}.png", array)
    (tmp_path / ".hidden").mkdir()
    save_png(tmp_path / ".hidden" / "x.png", arrays["cat/a"])  # hidden folders are skipped

    data = load_images(str(tmp_path), split="all")
    assert isinstance(data, ImageSet) and data.images.dtype == torch.uint8
    assert data.images.shape == (3, 1, 10, 10)  # grey, center-cropped to the shorter side
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 1]
    for k, name in enumerate(("cat/a", "cat/b", "dog/c")):  # sorted file order
        assert np.array_equal(data.images[k, 0].numpy(), arrays[name][:, 1:11])

    resized = load_images(str(tmp_path), split="all", size=5, channels=3)
    assert resized.images.shape == (3, 3, 5, 5)
    assert torch.equal(resized.images[:, 0], resized.images[:, 1])  # grey replicated to RGB


def test_folder_of_grey_and_rgb_images(tmp_path):
    grey = np.full((6, 6), 77, dtype=np.uint8)
    color = np.zeros((6, 6, 3), dtype=np.uint8)
    color[..., 0], color[..., 1], color[..., 2] = 200, 100, 30
    grey_as_rgb = np.repeat(np.full((6, 6, 1), 150, dtype=np.uint8), 3, axis=-1)
    save_png(tmp_path / "a_grey.png", grey)
    save_png(tmp_path / "b_color.png", color)

    data = load_images(str(tmp_path), split="all")
    assert data.labels is None and data.num_classes is None  # images at the top level: unlabelled
    assert data.images.shape == (2, 3, 6, 6)  # one colour image makes the set RGB
    assert (data.images[0] == 77).all()
    assert data.images[1, :, 0, 0].tolist() == [200, 100, 30]

    as_grey = load_images(str(tmp_path), split="all", channels=1)
    expected = np.asarray(Image.fromarray(color).convert("L"))
    assert as_grey.images.shape == (2, 1, 6, 6) and np.array_equal(as_grey.images[1, 0].numpy(), expected)

    # a folder whose RGB images all have equal channels is grey by default
    other = tmp_path / "greyish"
    save_png(other / "g.png", grey_as_rgb)
    save_png(other / "h.jpg", grey, fmt="JPEG")
    data = load_images(str(other), split="all")
    assert data.images.shape == (2, 1, 6, 6)
    assert (data.images[0] == 150).all()
    assert (data.images[1].int() - 77).abs().max() <= 2  # JPEG is lossy


def test_folder_resize_keeps_a_constant_image_constant_and_crops_the_center(tmp_path):
    save_png(tmp_path / "wide.png", np.full((10, 20), 99, dtype=np.uint8))  # (H, W) = (10, 20)
    data = load_images(str(tmp_path), split="all", size=5)
    assert data.images.shape == (1, 1, 5, 5) and (data.images == 99).all()

    stripes = np.zeros((4, 8), dtype=np.uint8)
    stripes[:, :2] = stripes[:, 6:] = 255  # only the outer columns are white
    save_png(tmp_path / "crop" / "s.png", stripes)
    cropped = load_images(str(tmp_path / "crop"), split="all")
    assert cropped.images.shape == (1, 1, 4, 4) and (cropped.images == 0).all()


def test_folder_split_is_a_disjoint_per_class_holdout(tmp_path):
    for k in range(25):
        save_png(tmp_path / "only" / f"{k:02d}.png", np.full((3, 3), k, dtype=np.uint8))
    for k in range(12):
        save_png(tmp_path / "other" / f"{k:02d}.png", np.full((3, 3), 100 + k, dtype=np.uint8))
    train, test, every = (load_images(str(tmp_path), split=s) for s in ("train", "test", "all"))
    assert sorted(test.images[:, 0, 0, 0].tolist()) == [9, 19, 109]  # every 10th of each class
    assert rows(train.images).isdisjoint(rows(test.images))
    assert rows(train.images) | rows(test.images) == rows(every.images)
    assert len(train) + len(test) == len(every) == 37
    assert test.labels.tolist() == [0, 0, 1] and test.split == "test"


def test_images_of_different_sizes_need_a_size(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    save_png(tmp_path / "b.png", np.zeros((6, 6), dtype=np.uint8))
    with pytest.raises(DataError, match=r"b\.png.*6x6.*a\.png is 4x4.*size"):
        load_images(str(tmp_path), split="all")
    assert load_images(str(tmp_path), split="all", size=4).images.shape == (2, 1, 4, 4)


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_and_layouts(tmp_path):
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (40, 3, 6, 6), dtype=np.uint8))
    labels = torch.arange(40) % 4
    save_npz(tmp_path / "set.npz", images, labels)
    data = load_images(str(tmp_path / "set.npz"), split="all")
    assert torch.equal(data.images, images) and torch.equal(data.labels, labels)
    assert data.num_classes == 4 and data.name == "set"

    np.savez(tmp_path / "nhwc.npz", images=images.permute(0, 2, 3, 1).numpy())  # (N, H, W, C)
    assert torch.equal(load_images(str(tmp_path / "nhwc.npz"), split="all").images, images)
    np.savez(tmp_path / "nhw.npz", images=images[:, 0].numpy())  # (N, H, W)
    assert torch.equal(load_images(str(tmp_path / "nhw.npz"), split="all").images, images[:, :1])

    train, test = (load_images(str(tmp_path / "set.npz"), split=s) for s in ("train", "test"))
    assert len(test) == 4 and len(train) == 36  # the 10th image of each class of 10
    assert torch.equal(test.images, images[36:])
    assert rows(train.images).isdisjoint(rows(test.images))
    assert rows(train.images) | rows(test.images) == rows(images)
    assert load_images(str(tmp_path / "set.npz"), split="all", size=3, channels=1).images.shape == (40, 1, 3, 3)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 5), np.uint8)}, r"shape \(N, H, W\).*got \(4, 5\)"),
        ({"images": np.zeros((4, 8, 8), np.float32)}, "must be uint8.*float32"),
        ({"images": np.zeros((4, 2, 8, 8), np.uint8)}, "no channel axis of size 1 or 3"),
        ({"pixels": np.zeros((4, 8, 8), np.uint8)}, r"no 'images' array \(found \['pixels'\]\)"),
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "'labels' must be 4 integers"),
        ({"images": np.zeros((0, 8, 8), np.uint8)}, "empty"),
    ],
)
def test_bad_npz_raises_data_error_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_images(str(path), split="all")
    assert "bad.npz" in str(info.value) and "\n" not in str(info.value)


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        load_images(str(path))


def test_save_npz_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.npz"
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    save_npz(path, images)
    original = path.read_bytes()

    def fail_halfway(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(images_module.np, "savez_compressed", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_npz(path, images + 1)
    assert path.read_bytes() == original  # the old file is untouched
    with pytest.raises(OSError):
        save_npz(tmp_path / "new.npz", images)
    assert sorted(os.listdir(tmp_path)) == ["out.npz"]  # no partial or temporary file left
    with pytest.raises(DataError, match="uint8"):
        save_npz(tmp_path / "float.npz", images.float())


# --------------------------------------------------------------------------- IDX and Fashion-MNIST


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 70000], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        np.array([[1.5, -2.25]], dtype=np.float64),
    ],
)
def test_idx_round_trip(tmp_path, array, suffix):
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    back = read_idx(path)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_idx_errors_name_the_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match=r"bad-idx3-ubyte: not an IDX file \(magic number 12340801\)"):
        read_idx(path)
    write_idx(path, np.zeros((3, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])  # truncated
    with pytest.raises(DataError, match=r"bad-idx3-ubyte: 23 bytes but its header .* needs 24"):
        read_idx(path)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"0123456789")[:-6])
    with pytest.raises(DataError, match=r"bad\.gz: corrupt gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="missing: no such file"):
        read_idx(tmp_path / "missing")


def write_fashion_fixture(folder: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
    arrays = write_fashion_fixture(tmp_path)
    train = load_images("fashion-mnist", split="train", data_dir=str(tmp_path))
    test = load_images("fashion-mnist", split="test", data_dir=str(tmp_path))
    both = load_images("fashion-mnist", split="all", data_dir=str(tmp_path))
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert torch.equal(both.images, torch.cat([train.images, test.images]))
    assert train.num_classes == 10 and train.class_names[9] == "Ankle boot"


def test_fashion_mnist_problems_are_explained(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*--data"):
        load_images("fashion-mnist", data_dir=str(tmp_path))
    write_fashion_fixture(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))  # 4 images, 3 labels
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: expected 4 uint8 labels"):
        load_images("fashion-mnist", split="test", data_dir=str(tmp_path))


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_installed_fashion_mnist_test_split():
    data = load_images("fashion-mnist", split="test")
    assert data.images.shape == (10000, 1, 28, 28)
    assert data.labels.bincount().tolist() == [1000] * 10


# --------------------------------------------------------------------------- digits


def test_digits_split_is_a_stratified_partition():
    train, test, every = (load_images("digits", split=s) for s in ("train", "test", "all"))
    assert every.images.shape == (1797, 1, 8, 8) and every.images.max() == 255 and every.num_classes == 10
    assert train.images.shape == (1442, 1, 8, 8) and test.images.shape == (355, 1, 8, 8)
    assert (test.labels.bincount() == every.labels.bincount() // 5).all()  # every 5th of each class
    assert rows(train.images).isdisjoint(rows(test.images))  # the 1797 digits are all distinct
    assert rows(train.images) | rows(test.images) == rows(every.images)
    # pixel values are round(v * 255 / 16) of sklearn's 0..16
    assert set(every.images.unique().tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert load_images("digits", split="test", size=16, channels=3).images.shape == (355, 3, 16, 16)


# --------------------------------------------------------------------------- errors


def test_corrupt_images_name_the_file(tmp_path):
    save_png(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        load_images(str(tmp_path))
    (tmp_path / "broken.png").unlink()
    save_png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=r"cut\.png: cannot read image"):
        load_images(str(tmp_path), size=4)


def test_empty_folder_missing_source_and_bad_arguments(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty: no images found"):
        load_images(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"unknown image source '.*missing\.npz'.*'digits', 'fashion-mnist'"):
        load_images(str(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match=r"notes\.txt: not a folder of images or an \.npz file"):
        load_images(str(tmp_path / "empty" / "notes.txt"))
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_images("digits", split="valid")
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_images("digits", channels=2)
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- scaling and batches


def test_to_model_and_to_uint8_round_trip_exactly():
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model(levels)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), levels)
    # rounding to the nearest level and clamping outside [-1, 1]
    assert to_uint8(x + 0.49 / 127.5).tolist() == levels.tolist()
    assert to_uint8(torch.tensor([-3.0, 2.0, float("inf")])).tolist() == [0, 255, 255]
    with pytest.raises(TypeError):
        to_model(x)


def numbered_set(n: int) -> ImageSet:
    """Image k is constant k, with label k % 3: a batch shows which images it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()
    return ImageSet(images, torch.arange(n) % 3, 3, "numbered")


def batches(data: ImageSet, batch_size: int, seed: int):
    """The trainer's batches of an image set: uint8 in memory, [-1, 1] floats per batch, labels as a condition."""
    dataset = TensorDataset(data.images, {"class_labels": data.labels})
    order = ShuffledBatches(len(dataset), batch_size, seed=seed)

    class Batches:
        def __next__(self):
            x, cond = dataset.take(next(order))
            return x, cond["class_labels"]

        state_dict, load_state_dict = order.state_dict, order.load_state_dict

    return Batches()


def ids(x: torch.Tensor) -> list[int]:
    return to_uint8(x)[:, 0, 0, 0].tolist()


def test_batches_are_reproducible_shuffled_epochs():
    data = numbered_set(12)
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    first = take(batches(data, 4, seed=0), 6)
    again = take(batches(data, 4, seed=0), 6)
    other = take(batches(data, 4, seed=1), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert [ids(x) for x, _ in first] != [ids(x) for x, _ in other]
    for x, y in first:
        assert x.shape == (4, 1, 2, 2) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        assert torch.equal(y, torch.tensor(ids(x)) % 3)  # labels stay with their images
    epochs = [sum((ids(x) for x, _ in first[k : k + 3]), []) for k in (0, 3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # each epoch is a permutation
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_batches_resume_from_their_state():
    data = numbered_set(10)
    it = batches(data, 3, seed=5)
    for _ in range(4):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # travels through a JSON checkpoint
    expected = [ids(next(it)[0]) for _ in range(7)]
    resumed = batches(data, 3, seed=123)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)[0]) for _ in range(7)] == expected


def test_a_dataset_with_rows_keeps_each_row_once_and_takes_what_a_materialised_one_takes():
    images = torch.arange(3, dtype=torch.uint8)[:, None, None, None].expand(3, 1, 2, 2).contiguous()
    states = torch.tensor([[10.0, 11.0], [20.0, 21.0]])
    rows = {"x": torch.tensor([0, 0, 1, 2, 2]), "c": torch.tensor([1, 0, 1, 1, 0])}
    data = TensorDataset(images, {"c": states}, rows)
    whole = TensorDataset(images[rows["x"]], {"c": states[rows["c"]]})  # every row copied per example
    assert len(data) == len(whole) == 5
    idx = torch.tensor([4, 1, 3])
    (x, cond), (x2, cond2) = data.take(idx), whole.take(idx)
    assert torch.equal(x, x2) and torch.equal(cond["c"], cond2["c"]) and ids(x) == [2, 0, 2]
    moved = data.map(lambda t: t.clone())
    assert torch.equal(moved.take(idx)[1]["c"], cond["c"]) and len(moved.tensors()) == 4
    for bad, message in (
        ({"y": rows["x"]}, "does not hold"),
        ({"x": torch.tensor([0, 3])}, "indices into its 3 rows"),
        ({"x": rows["x"], "c": torch.tensor([0, 1])}, "must be 5 indices"),
        ({"x": rows["x"]}, "condition 'c' has 2 rows for 5 examples"),
    ):
        with pytest.raises(ValueError, match=message):
            TensorDataset(images, {"c": states}, bad)
