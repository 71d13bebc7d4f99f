"""Datasets as whole uint8 tensors, plus on-device augmentation and batching.

The datasets here are small enough to hold in memory, so a split is loaded once into a uint8
(N, C, H, W) tensor and batches are sliced from it. This avoids DataLoader worker processes (which
compete with the training threads on small CPU machines) and lets the data live on the GPU.

Files are read by this module's own readers (IDX, CIFAR pickles, SVHN .mat); torchvision is only
used to download. Its loaders verify md5 sums of every file, which rejects user-provided copies
and the small synthetic files the tests write.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import DATASETS, ConfigError, _closest

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(Exception):
    """A dataset cannot be loaded; the message is one line: what, where we looked, how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "crop" or "crop_flip"
    crop_padding: int


_INFOS = {
    info.name: info
    for info in (
        DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), "crop", 2),
        DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), "crop", 2),
        DatasetInfo(
            "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "crop_flip", 4
        ),
        DatasetInfo(
            "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip", 4
        ),
        DatasetInfo(
            "svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "crop_flip", 4
        ),
    )
}
assert set(_INFOS) == set(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _INFOS:
        raise ConfigError(
            f"unknown dataset '{name}'{_closest(str(name), DATASETS)}; choose one of {', '.join(DATASETS)}"
        )
    return _INFOS[name]


@dataclass
class ImageTensors:
    """A split held as tensors. Unsubsetted CPU splits share memory with the in-process cache,
    so treat `images` and `labels` as read-only."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    info: DatasetInfo

    def to(self, device) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device), self.info)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_data_dir() -> Path:
    env = os.environ.get("SSLROBUST_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sslrobust" / "data"


# ---------------------------------------------------------------------------------------------
# File readers. Each returns numpy (uint8 images N,C,H,W; int64 labels N).


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then each dimension as a big-endian uint32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path.name} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(f"{path.name} holds {len(raw) - header} bytes, header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_idx_pair(paths: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"IDX dims {images.shape} / {labels.shape} are not images / labels")
    return images[:, None], labels.astype(np.int64)


def _read_cifar(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            # latin1 decodes the Python 2 pickles of the official archive; keys written by
            # Python 3 stay bytes, so normalise both to str.
            entry = pickle.load(f, encoding="latin1")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    mat = scipy.io.loadmat(str(path))
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
    return images, labels


# ---------------------------------------------------------------------------------------------
# Sources: where each dataset may already be on disk, and how torchvision fetches it.


@dataclass
class _Source:
    locate: Callable[[], object]  # found paths, or None
    read: Callable[[object], tuple[np.ndarray, np.ndarray]]
    fetch: Callable[[], None]
    looked: list[str]
    how: str


def _idx_pair_in(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    pair = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = folder / f"{prefix}-{kind}-ubyte"
        found = next((p for p in (stem, stem.with_name(stem.name + ".gz")) if p.is_file()), None)
        if found is None:
            return None
        pair.append(found)
    return pair[0], pair[1]


def _tv_datasets():
    import torchvision.datasets  # imported only when downloading: it is slow to import

    return torchvision.datasets


def _source(name: str, train: bool, root: Path) -> _Source:
    get_it = (
        f"run once with internet (download=True) to download it into {root}, "
        "or set SSLROBUST_DATA_DIR to a directory that has it"
    )
    if name in ("fashion_mnist", "mnist"):
        tv_name = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
        prefix = "train" if train else "t10k"
        folders = [root / tv_name / "raw"]
        if name == "fashion_mnist":
            folders.insert(0, DEBIAN_FASHION_MNIST)
            get_it = "apt-get install dataset-fashion-mnist, or " + get_it
        return _Source(
            locate=lambda: next(
                (p for p in (_idx_pair_in(f, prefix) for f in folders) if p is not None), None
            ),
            read=_read_idx_pair,
            fetch=lambda: getattr(_tv_datasets(), tv_name)(str(root), train=train, download=True),
            looked=[str(f) for f in folders],
            how=get_it,
        )
    if name in ("cifar10", "cifar100"):
        if name == "cifar10":
            folder = root / "cifar-10-batches-py"
            files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            label_key, tv_name = "labels", "CIFAR10"
        else:
            folder = root / "cifar-100-python"
            files = ["train" if train else "test"]
            label_key, tv_name = "fine_labels", "CIFAR100"
        paths = [folder / f for f in files]
        return _Source(
            locate=lambda: paths if all(p.is_file() for p in paths) else None,
            read=lambda found: _read_cifar(found, label_key),
            fetch=lambda: getattr(_tv_datasets(), tv_name)(str(root), train=train, download=True),
            looked=[str(folder)],
            how=get_it,
        )
    if name == "svhn":
        split = "train" if train else "test"
        path = root / f"{split}_32x32.mat"
        return _Source(
            locate=lambda: path if path.is_file() else None,
            read=_read_svhn,
            fetch=lambda: _tv_datasets().SVHN(str(root), split=split, download=True),
            looked=[str(path)],
            how=get_it,
        )
    raise AssertionError(name)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unavailable(name: str, train: bool, reason: str, source: _Source) -> DatasetUnavailable:
    split = "train" if train else "test"
    return DatasetUnavailable(
        _one_line(
            f"dataset {name} ({split} split) unavailable: {reason}; "
            f"looked in {', '.join(source.looked)}; to get it: {source.how}",
            limit=1000,
        )
    )


def _load_arrays(name: str, train: bool, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    source = _source(name, train, root)
    found = source.locate()
    if found is None:
        if not download:
            raise _unavailable(name, train, "not found and download=False", source)
        try:
            root.mkdir(parents=True, exist_ok=True)
            source.fetch()
        except Exception as e:  # urllib, md5 and disk errors alike: the user needs the same advice
            raise _unavailable(
                name, train, f"download failed ({type(e).__name__}: {_one_line(e)})", source
            ) from None
        found = source.locate()
        if found is None:
            raise _unavailable(name, train, "download finished but the files are missing", source)
    try:
        images, labels = source.read(found)
    except MemoryError:
        raise
    except Exception as e:
        raise _unavailable(
            name, train, f"files are corrupt ({type(e).__name__}: {_one_line(e)}); delete them", source
        ) from None
    info = _INFOS[name]
    expected = (info.channels, info.size, info.size)
    if images.shape[1:] != expected or len(images) != len(labels) or len(labels) == 0:
        reason = f"files are corrupt (images {images.shape}, {len(labels)} labels; expected N x {expected})"
        raise _unavailable(name, train, reason, source)
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise _unavailable(name, train, f"files are corrupt (labels outside 0..{info.num_classes - 1})", source)
    return images, labels


# Several trials in one worker process load the same splits; keep them (as CPU tensors).
_CACHE: dict[tuple[str, bool, str], tuple[torch.Tensor, torch.Tensor]] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _load_cached(name: str, train: bool, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (name, train, str(root.resolve()))
    with _CACHE_LOCK:
        if key not in _CACHE:
            images, labels = _load_arrays(name, train, root, download)
            _CACHE[key] = (torch.from_numpy(images), torch.from_numpy(labels))
        return _CACHE[key]


def load_split(
    name: str,
    train: bool,
    data_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> ImageTensors:
    """Load a split as uint8 tensors on `device`; `subset` picks that many examples at random
    (seeded by `seed`, so every trial with the same seed sees the same examples)."""
    info = dataset_info(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    images, labels = _load_cached(name, bool(train), root, download)
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be a positive number of examples, got {subset}")
        if subset < len(labels):
            generator = torch.Generator().manual_seed(seed)
            # Sorted so a subset keeps the split's order (deterministic regardless of seed).
            index = torch.randperm(len(labels), generator=generator)[:subset].sort().values
            images, labels = images[index], labels[index]
    return ImageTensors(images, labels, info).to(device)


# ---------------------------------------------------------------------------------------------
# Augmentation and batching, on whatever device the data lives on.


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; floating input is taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"expected uint8 or floating images, got {images.dtype}")


def _uniform_ints(high: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    # Draw on the generator's device so the same generator always gives the same stream.
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def augment_batch(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding (an independent offset per image), plus a random horizontal
    flip for "crop_flip" datasets. Returns float32 in [0, 1] on the batch's device."""
    n, c, h, w = images.shape
    p = info.crop_padding
    device = images.device
    top = _uniform_ints(2 * p + 1, n, generator, device)
    left = _uniform_ints(2 * p + 1, n, generator, device)
    rows = top[:, None] + torch.arange(h, device=device)  # (n, h) rows of the padded image
    cols = left[:, None] + torch.arange(w, device=device)  # (n, w)
    if info.augment == "crop_flip":
        flip = _uniform_ints(2, n, generator, device).bool()
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(images, (p, p, p, p))
    # One gather over flattened padded images does crop and flip for the whole batch at once.
    index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(n, 1, h * w)
    out = padded.reshape(n, c, -1).gather(2, index.expand(n, c, h * w)).reshape(n, c, h, w)
    return to_float(out)


def iterate_batches(
    data: ImageTensors,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool = True,
    augment: bool = False,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x float32 in [0, 1], y int64) batches on the data's device. `generator`
    drives shuffling and augmentation (it may be None when neither is on)."""
    n = len(data)
    device = data.images.device
    if shuffle:
        order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    else:
        order = torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        images = data.images[index]
        x = augment_batch(images, data.info, generator) if augment else to_float(images)
        yield x, data.labels[index]
