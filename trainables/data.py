"""Datasets as whole uint8 tensors, plus on-device augmentation and batching.

The datasets here are small enough to hold in memory, so a split is loaded once into a uint8
(N, C, H, W) tensor and batches are sliced from it. This avoids DataLoader worker processes (which
compete with the training threads on small CPU machines) and lets the data live on the GPU.

Files are read by `trainables.datafiles`' own readers (IDX, CIFAR pickles, SVHN .mat); torchvision is only
used to download. Its loaders verify md5 sums of every file, which rejects user-provided copies
and the small synthetic files the tests write.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from trainables.datafiles import (  # noqa: F401 - re-exported: the dataset API lives here
    DEBIAN_FASHION_MNIST,
    DatasetInfo,
    DatasetUnavailable,
    data_root,
    dataset_info,
    default_data_dir,
    load_arrays,
)


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


# Several trials in one worker process load the same splits; keep them (as CPU tensors).
_CACHE: dict[tuple[str, bool, str], tuple[torch.Tensor, torch.Tensor]] = {}
_CACHE_LOCK = threading.Lock()


def _load_cached(name: str, train: bool, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (name, train, str(root.resolve()))
    with _CACHE_LOCK:
        if key not in _CACHE:
            images, labels = load_arrays(name, train, root, download)
            _CACHE[key] = (torch.from_numpy(images), torch.from_numpy(labels))
        return _CACHE[key]


def _random_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """`size` of the indices 0..n-1 drawn at random (seeded), sorted so a subset keeps the
    split's order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


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
    images, labels = _load_cached(name, bool(train), data_root(data_dir), download)
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be a positive number of examples, got {subset}")
        if subset < len(labels):
            index = _random_subset(len(labels), subset, seed)
            images, labels = images[index], labels[index]
    return ImageTensors(images, labels, info).to(device)


def load_train_val(
    name: str,
    val_size: int,
    val_seed: int,
    data_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> tuple[ImageTensors, ImageTensors]:
    """The training split cut into a held-out validation set and what training may use.

    The `val_size` validation examples are drawn first, by `val_seed` alone, so they are the same
    whatever `subset` and `seed` select for training; training's `subset` is then drawn from the
    rest (as `load_split` draws it), so no validation example is ever trained on.
    Raises ValueError if `val_size` leaves no training example."""
    info = dataset_info(name)
    images, labels = _load_cached(name, True, data_root(data_dir), download)
    n = len(labels)
    if not 1 <= val_size < n:
        raise ValueError(f"val_subset must be between 1 and {n - 1} for {name} ({n} training images), got {val_size}")
    held_out = torch.zeros(n, dtype=torch.bool)
    held_out[_random_subset(n, val_size, val_seed)] = True
    rest = (~held_out).nonzero().flatten()
    if subset is not None and subset < len(rest):
        rest = rest[_random_subset(len(rest), subset, seed)]
    val = ImageTensors(images[held_out], labels[held_out], info).to(device)
    return ImageTensors(images[rest], labels[rest], info).to(device), val


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
