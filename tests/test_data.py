import gzip
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch

from trainables import data, datafiles
from trainables.config import DATASETS, ConfigError


# --- writers for the on-disk formats ---------------------------------------------------------


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_dir(folder, n_train: int, n_test: int, compress: bool, seed: int = 0):
    """An MNIST-layout raw dir; returns {split: (images N,28,28, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def write_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def key(name: str, as_bytes: bool):
    return name.encode() if as_bytes else name


def write_cifar10(root, per_batch: int, n_test: int, bytes_keys: bool = True):
    """cifar-10-batches-py as in the official archive: rows of 3072 = R, G, B planes, row-major."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    splits = {"train": ([], []), "test": ([], [])}
    files = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)] + [("test_batch", "test", n_test)]
    for fname, split, n in files:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        write_pickle(
            folder / fname,
            {
                key("batch_label", bytes_keys): b"batch",
                key("labels", bytes_keys): labels,
                key("data", bytes_keys): images.reshape(n, 3072),
                key("filenames", bytes_keys): [b"x.png"] * n,
            },
        )
        splits[split][0].append(images)
        splits[split][1].extend(labels)
    write_pickle(folder / "batches.meta", {key("label_names", bytes_keys): [b"c"] * 10})
    return {s: (np.concatenate(x), np.array(y)) for s, (x, y) in splits.items()}


def write_cifar100(root, n_train: int, n_test: int):
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        write_pickle(
            folder / split,
            {
                b"filenames": [b"x.png"] * n,
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": images.reshape(n, 3072),
            },
        )
        splits[split] = (images, np.array(fine))
    write_pickle(folder / "meta", {b"fine_label_names": [b"c"] * 100, b"coarse_label_names": [b"c"] * 20})
    return splits


def write_svhn(root, n_train: int, n_test: int):
    import scipy.io

    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # H, W, C, N as in the .mat files
        y = rng.integers(1, 11, (n, 1), dtype=np.uint8)  # 1..10, where 10 is the digit 0
        y[0, 0] = 10
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        splits[split] = (x, y)
    return splits


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    """An empty data dir: Fashion-MNIST must come from the Debian files."""
    if not (data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return tmp_path_factory.mktemp("fmnist")


@pytest.fixture(scope="module")
def fmnist_train(fmnist_root):
    return data.load_split("fashion_mnist", True, data_dir=fmnist_root, download=False)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(datafiles, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


def random_split(name: str, n: int, seed: int = 0) -> data.ImageTensors:
    info = data.dataset_info(name)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g).to(torch.uint8)
    return data.ImageTensors(images, torch.arange(n), info)


# --- info and paths ---------------------------------------------------------------------------


def test_dataset_info_covers_every_dataset():
    for name in DATASETS:
        info = data.dataset_info(name)
        assert len(info.mean) == len(info.std) == info.channels
        assert info.crop_padding == (2 if info.size == 28 else 4)
        assert info.augment == ("crop" if name in ("mnist", "fashion_mnist") else "crop_flip")
    assert data.dataset_info("cifar100").num_classes == 100
    with pytest.raises(ConfigError, match="cifar10"):
        data.dataset_info("cifar")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SSLROBUST_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("SSLROBUST_DATA_DIR")
    assert data.default_data_dir().parts[-3:] == (".cache", "sslrobust", "data")


# --- Fashion-MNIST and MNIST ------------------------------------------------------------------


def test_fashion_mnist_from_debian_files(fmnist_train, fmnist_root):
    assert fmnist_train.images.shape == (60000, 1, 28, 28)
    assert fmnist_train.images.dtype == torch.uint8
    assert fmnist_train.labels.dtype == torch.int64
    assert set(fmnist_train.labels.unique().tolist()) == set(range(10))
    test = data.load_split("fashion_mnist", False, data_dir=fmnist_root, download=False)
    assert test.images.shape == (10000, 1, 28, 28) and len(test) == 10000
    # Read in place: nothing downloaded, copied or written.
    assert list(fmnist_root.iterdir()) == []
    # The published statistics: a check that pixels were decoded correctly.
    pixels = data.to_float(fmnist_train.images)
    assert pixels.mean().item() == pytest.approx(0.2860, abs=1e-3)
    assert pixels.std().item() == pytest.approx(0.3530, abs=1e-3)


def test_loads_are_cached_in_process(fmnist_train, fmnist_root):
    again = data.load_split("fashion_mnist", True, data_dir=fmnist_root, download=False)
    assert again.images.data_ptr() == fmnist_train.images.data_ptr()


def test_subset_is_seeded(fmnist_train, fmnist_root):
    root = fmnist_root
    a = data.load_split("fashion_mnist", True, data_dir=root, subset=500, seed=3, download=False)
    b = data.load_split("fashion_mnist", True, data_dir=root, subset=500, seed=3, download=False)
    c = data.load_split("fashion_mnist", True, data_dir=root, subset=500, seed=4, download=False)
    assert len(a) == 500
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # Each subset example is a real example of the split.
    flat = fmnist_train.images.flatten(1)
    rows = {bytes(r.numpy()) for r in flat}
    assert all(bytes(r.numpy()) in rows for r in a.images.flatten(1)[:50])
    everything = data.load_split("fashion_mnist", True, data_dir=root, subset=10**9, download=False)
    assert len(everything) == 60000


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_data_dir(tmp_path, no_debian, compress):
    arrays = write_mnist_dir(tmp_path / "FashionMNIST" / "raw", 30, 12, compress)
    train = data.load_split("fashion_mnist", True, data_dir=tmp_path, download=False)
    test = data.load_split("fashion_mnist", False, data_dir=tmp_path, download=False)
    for split, loaded in (("train", train), ("t10k", test)):
        images, labels = arrays[split]
        assert torch.equal(loaded.images, torch.from_numpy(images)[:, None])
        assert loaded.labels.tolist() == labels.tolist()


def test_mnist_from_generated_idx(tmp_path):
    arrays = write_mnist_dir(tmp_path / "MNIST" / "raw", 25, 7, compress=True)
    train = data.load_split("mnist", True, data_dir=tmp_path, download=False)
    assert train.images.shape == (25, 1, 28, 28) and train.info.name == "mnist"
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0]))
    assert train.labels.tolist() == arrays["train"][1].tolist()


def test_missing_dataset_without_download(tmp_path, no_debian):
    for name in DATASETS:
        with pytest.raises(data.DatasetUnavailable) as err:
            data.load_split(name, True, data_dir=tmp_path, download=False)
        message = str(err.value)
        assert "\n" not in message
        assert name in message and str(tmp_path) in message
        assert "download" in message and "SSLROBUST_DATA_DIR" in message
        if name == "fashion_mnist":
            assert "apt-get install dataset-fashion-mnist" in message


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load_split("cifar10", False, data_dir=tmp_path / "new", download=True)
    message = str(err.value)
    assert "\n" not in message and "download failed" in message and "URLError" in message
    assert err.value.__suppress_context__  # no urllib traceback chained onto ours


def test_corrupt_files(tmp_path, no_debian):
    folder = tmp_path / "FashionMNIST" / "raw"
    write_mnist_dir(folder, 5, 5, compress=True)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DatasetUnavailable, match="corrupt") as err:
        data.load_split("fashion_mnist", False, data_dir=tmp_path, download=False)
    assert "\n" not in str(err.value)
    # Images and labels that disagree in count are caught too.
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), compress=False)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetUnavailable, match="corrupt"):
        data.load_split("fashion_mnist", True, data_dir=tmp_path, download=False)


# --- CIFAR and SVHN from generated files ---------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_from_generated_batches(tmp_path, bytes_keys):
    arrays = write_cifar10(tmp_path, per_batch=4, n_test=6, bytes_keys=bytes_keys)
    train = data.load_split("cifar10", True, data_dir=tmp_path, download=False)
    test = data.load_split("cifar10", False, data_dir=tmp_path, download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    for split, loaded in (("train", train), ("test", test)):
        images, labels = arrays[split]
        assert torch.equal(loaded.images, torch.from_numpy(images))
        assert loaded.labels.tolist() == labels.tolist()
    # Layout check on a single pixel: entry 1024 of a row is green at row 0, column 0.
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb"))
    assert test.images[0, 1, 0, 0].item() == raw[key("data", bytes_keys)][0, 1024]


def test_cifar100_from_generated_files(tmp_path):
    arrays = write_cifar100(tmp_path, n_train=9, n_test=5)
    train = data.load_split("cifar100", True, data_dir=tmp_path, download=False)
    test = data.load_split("cifar100", False, data_dir=tmp_path, download=False)
    assert train.info.num_classes == 100
    assert torch.equal(train.images, torch.from_numpy(arrays["train"][0]))
    assert train.labels.tolist() == arrays["train"][1].tolist()  # fine labels
    assert torch.equal(test.images, torch.from_numpy(arrays["test"][0]))


def test_svhn_from_generated_mat(tmp_path):
    arrays = write_svhn(tmp_path, n_train=8, n_test=3)
    train = data.load_split("svhn", True, data_dir=tmp_path, download=False)
    test = data.load_split("svhn", False, data_dir=tmp_path, download=False)
    x, y = arrays["train"]
    assert train.images.shape == (8, 3, 32, 32) and train.images.dtype == torch.uint8
    n, c, h, w = 5, 2, 7, 11
    assert train.images[n, c, h, w].item() == x[h, w, c, n]
    expected = np.where(y[:, 0] == 10, 0, y[:, 0])
    assert train.labels.tolist() == expected.tolist() and train.labels[0].item() == 0
    assert len(test) == 3


# --- augmentation and batching ------------------------------------------------------------


def crops_of(image: torch.Tensor, p: int, flip: bool):
    """Every padded crop (and its mirror when flip) of one image, as float."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image.float() / 255, (p, p, p, p))
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            if flip:
                yield (dy, dx, True), crop.flip(-1)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_augment_is_a_padded_crop_and_flip(name):
    split = random_split(name, 48)
    info = split.info
    out = data.augment_batch(split.images, info, torch.Generator().manual_seed(0))
    assert out.shape == split.images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    flip_allowed = info.augment == "crop_flip"
    seen = []
    for image, result in zip(split.images, out):
        matches = [t for t, crop in crops_of(image, info.crop_padding, flip_allowed) if torch.equal(crop, result)]
        assert matches, "output is not a padded crop of its input"
        seen.append(matches[0])
    shifts = {(dy, dx) for dy, dx, _ in seen}
    assert len(shifts) > 5  # offsets differ per image
    assert any((dy, dx) != (info.crop_padding,) * 2 for dy, dx, _ in seen)  # content moves
    flips = {f for _, _, f in seen}
    assert flips == ({False, True} if flip_allowed else {False})


def test_augment_is_reproducible_and_accepts_floats():
    split = random_split("cifar10", 16)
    a = data.augment_batch(split.images, split.info, torch.Generator().manual_seed(5))
    b = data.augment_batch(split.images, split.info, torch.Generator().manual_seed(5))
    c = data.augment_batch(data.to_float(split.images), split.info, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, c)
    d = data.augment_batch(split.images, split.info, torch.Generator().manual_seed(6))
    assert not torch.equal(a, d)


def test_to_float():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.allclose(data.to_float(x), torch.tensor([0.0, 128 / 255, 1.0]))
    assert data.to_float(x).dtype == torch.float32


def test_iterate_batches_covers_each_example_once():
    split = random_split("fashion_mnist", 103)  # labels are the example indices
    g = torch.Generator().manual_seed(0)
    batches = list(data.iterate_batches(split, 10, g, shuffle=True, drop_last=False))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert seen.tolist() != list(range(103))  # shuffled
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, data.to_float(split.images[y]))
    dropped = list(data.iterate_batches(split, 10, g, drop_last=True))
    assert [len(y) for _, y in dropped] == [10] * 10
    ordered = torch.cat([y for _, y in data.iterate_batches(split, 10, None, shuffle=False, drop_last=False)])
    assert ordered.tolist() == list(range(103))


def test_iterate_batches_with_augmentation():
    split = random_split("cifar10", 40)
    batches = list(data.iterate_batches(split, 16, torch.Generator().manual_seed(1), augment=True))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_image_tensors_to_device():
    split = random_split("mnist", 4)
    moved = split.to("cpu")
    assert len(moved) == 4 and moved.info is split.info
    assert torch.equal(moved.images, split.images)
