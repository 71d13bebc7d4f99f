"""Dataset files on disk: where each dataset is, how to fetch it, and readers for its formats.

NumPy only (no torch): the study driver checks that every dataset a study needs is readable before
any trial starts, without paying for importing torch. `trainables.data` turns the arrays into
tensors.

Staging: a missing dataset is fetched once per data folder (so once per node) under an exclusive
file lock, from the mirror named by SSLROBUST_DATA_MIRROR (an s3:// URI or a folder laid out like
the data folder) when set, else by torchvision from the dataset's home page. Everything is written
under a temporary name and renamed into place, so no reader ever sees a partial file; the other
processes wait on the lock and then find the files.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import math
import os
import pickle
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from trainables.config import DATASETS, ConfigError, closest

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MIRROR_ENV = "SSLROBUST_DATA_MIRROR"


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
            f"unknown dataset '{name}'{closest(str(name), DATASETS)}; choose one of {', '.join(DATASETS)}"
        )
    return _INFOS[name]


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The folder datasets are looked for in and downloaded to: `data_dir`, else the default."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


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
    fetch: Callable[[Path], None]  # torchvision's download into the given folder
    looked: list[str]
    how: str
    # The split's files relative to the data folder, each as its accepted names (first: the mirror's).
    files: list[tuple[str, ...]]


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
            fetch=lambda into: getattr(_tv_datasets(), tv_name)(str(into), train=train, download=True),
            looked=[str(f) for f in folders],
            how=get_it,
            files=[(f"{tv_name}/raw/{prefix}-{kind}-ubyte.gz", f"{tv_name}/raw/{prefix}-{kind}-ubyte")
                   for kind in ("images-idx3", "labels-idx1")],
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
            fetch=lambda into: getattr(_tv_datasets(), tv_name)(str(into), train=train, download=True),
            looked=[str(folder)],
            how=get_it,
            files=[(f"{folder.name}/{f}",) for f in files],
        )
    if name == "svhn":
        split = "train" if train else "test"
        path = root / f"{split}_32x32.mat"
        return _Source(
            locate=lambda: path if path.is_file() else None,
            read=_read_svhn,
            fetch=lambda into: _tv_datasets().SVHN(str(into), split=split, download=True),
            looked=[str(path)],
            how=get_it,
            files=[(path.name,)],
        )
    raise AssertionError(name)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unavailable(name: str, train: bool, reason: str, source: _Source, how: str | None = None) -> DatasetUnavailable:
    split = "train" if train else "test"
    return DatasetUnavailable(
        _one_line(
            f"dataset {name} ({split} split) unavailable: {reason}; "
            f"looked in {', '.join(source.looked)}; to get it: {how or source.how}",
            limit=1000,
        )
    )


# ---------------------------------------------------------------------------------------------
# Staging: one fetch per data folder, whatever the number of processes asking at once.


@contextlib.contextmanager
def _folder_lock(root: Path, name: str):
    """An exclusive lock on <root>/.locks/<name>.lock (fcntl: released by the kernel if the holder
    dies, so a killed trial never leaves the dataset locked)."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _move_into(staging: Path, root: Path, rel: str) -> None:
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / rel, target)


def _fetch_from_mirror(mirror: str, name: str, staging: Path, root: Path) -> None:
    """Copy both splits' files of `name` from the mirror (same layout as the data folder)."""
    import pyarrow.fs as pafs  # imported only when staging: the driver's check never needs it

    if "://" in mirror:
        fs, base = pafs.FileSystem.from_uri(mirror)
    else:
        fs, base = pafs.LocalFileSystem(), str(Path(mirror).expanduser().resolve())
    base = base.rstrip("/")
    for train in (True, False):
        for names in _source(name, train, root).files:
            infos = fs.get_file_info([f"{base}/{n}" for n in names])
            rel = next((n for n, i in zip(names, infos) if i.type == pafs.FileType.File), None)
            if rel is None:
                raise FileNotFoundError(f"the mirror {mirror} has no {' or '.join(names)}")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{base}/{rel}") as src, open(staging / rel, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            _move_into(staging, root, rel)


def _fetch_with_torchvision(name: str, staging: Path, root: Path) -> None:
    """torchvision downloads (and unpacks) into `staging`; each split's files are then renamed into
    `root` (the archive is left in `staging` and deleted with it)."""
    for train in (True, False):
        source = _source(name, train, root)
        if source.locate() is not None:
            continue
        source.fetch(staging)
        for names in source.files:
            rel = next((n for n in names if (staging / n).is_file()), None)
            if rel is None:
                raise FileNotFoundError(f"torchvision's download has no {' or '.join(names)}")
            _move_into(staging, root, rel)


def stage(name: str, train: bool, root: Path):
    """Fetch dataset `name` into `root` unless it is there; returns the split's found files.
    Concurrent callers (trials starting together on one node) wait for a single fetch. Raises
    DatasetUnavailable (one line) if the fetch fails."""
    source = _source(name, train, root)
    mirror = os.environ.get(MIRROR_ENV) or None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _folder_lock(root, name):
            found = source.locate()
            if found is not None:  # another process fetched it while this one waited
                return found
            for stale in root.glob(f".staging-{name}-*"):  # left by a process killed mid-fetch
                shutil.rmtree(stale, ignore_errors=True)
            staging = root / f".staging-{name}-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                if mirror:
                    _fetch_from_mirror(mirror, name, staging, root)
                else:
                    _fetch_with_torchvision(name, staging, root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Exception as e:  # urllib, md5, S3 and disk errors alike: the user needs the same advice
        if mirror:
            raise _unavailable(name, train, f"copy from the mirror {mirror} failed ({type(e).__name__}: {_one_line(e)})",
                               source, how=f"put the dataset's files into {mirror} as they are laid out in a data "
                                           f"folder (docs/cluster.md), or unset {MIRROR_ENV} to download it") from None
        raise _unavailable(name, train, f"download failed ({type(e).__name__}: {_one_line(e)})", source) from None
    found = source.locate()
    if found is None:
        raise _unavailable(name, train, "download finished but the files are missing", source)
    return found


def load_arrays(name: str, train: bool, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    source = _source(name, train, root)
    found = source.locate()
    if found is None:
        # A mirror is the user's own copy, not a download from the internet: used even when
        # download=False (OOD sets, which are never downloaded, are staged from it too).
        if not download and not os.environ.get(MIRROR_ENV):
            raise _unavailable(name, train, "not found and download=False", source)
        found = stage(name, train, root)
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
