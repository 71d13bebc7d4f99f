"""Uniform label corruption (Hendrycks et al. 2019, "robustness to label corruption").

A fraction p of the training labels is replaced by a class drawn uniformly from the *other*
classes: exactly round(p·N) labels change (half-up rounding), and no changed label keeps its true
class. The test labels are never corrupted, so test accuracy measures the clean task.

The draw is fixed by the generator: `Trainer` seeds a generator of its own from the trial seed
(not the training generator, so every other random choice of a run is the same with or without
label noise). All N positions and offsets are drawn whatever p is, and the first round(p·N) of the
random order are flipped: with one seed, the labels flipped at p = 0.2 are a subset of those
flipped at p = 0.4, and flipped alike, which keeps comparisons across p paired.
"""
from __future__ import annotations

import math

import torch

# Offset of the label-noise generator's seed from the trial seed (a stream of its own).
LABEL_NOISE_SEED_OFFSET = 1_000_003


def flip_count(p: float, n: int) -> int:
    """round(p·n), halves rounded up."""
    return int(math.floor(p * n + 0.5))


def corrupt_labels(
    labels: torch.Tensor, p: float, num_classes: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace round(p·N) labels by a uniformly random other class.

    Returns (noisy labels, flipped mask) on the labels' device; `labels` is left unchanged.
    `generator` is a CPU generator (None: the global RNG).
    """
    if not 0 <= p < 1:
        raise ValueError(f"label noise p must be in [0, 1), got {p!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-d tensor, got shape {tuple(labels.shape)}")
    n = int(labels.shape[0])
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    order = torch.randperm(n, generator=generator)
    # An offset in 1..C-1 added modulo C gives every other class with probability 1/(C-1).
    offsets = torch.randint(1, num_classes, (n,), generator=generator)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[order[: flip_count(p, n)]] = True
    cpu = labels.detach().to("cpu", torch.int64)
    noisy = torch.where(flipped, (cpu + offsets) % num_classes, cpu)
    return noisy.to(device=labels.device, dtype=labels.dtype), flipped.to(labels.device)


def label_noise_generator(seed: int) -> torch.Generator:
    """The generator a trial's label noise comes from (fixed by the trial seed)."""
    return torch.Generator().manual_seed(LABEL_NOISE_SEED_OFFSET + int(seed))
