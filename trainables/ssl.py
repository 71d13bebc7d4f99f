"""Self-supervised auxiliary tasks. A task owns its head and its loss on a batch of images.

Interface of a task (rotation is the only one so far; further tasks implement the same methods):
- `name`, `make_head(feature_dim) -> nn.Module` (attached as `model.ssl_heads[name]`);
- `sample(n, generator, device)` draws the task's labels for a batch of n images (fixed for the
  whole attack and update of that batch, so the attack and the update see the same views);
- `views(x, labels)` builds the inputs the head classifies;
- `loss(model, x, labels) -> per-example loss (N,)`, the `ssl_loss(model, x)` of the design.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError


def rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate a batch (N, C, H, W) by k·90° counter-clockwise."""
    return torch.rot90(x, k % 4, dims=(2, 3))


class RotationPrediction:
    """Predict which of 0°, 90°, 180°, 270° an image was rotated by (Gidaris et al. 2018).

    `rotations="all"` uses the four rotated copies of every image (the seed paper's recipe);
    `rotations="one"` one uniformly drawn rotation per image: an unbiased estimate of the same
    loss at a quarter of the SSL cost.
    """

    name = "rotation"
    num_outputs = 4

    def __init__(self, rotations: str = "all"):
        if rotations not in ("all", "one"):
            raise ConfigError(f"rotations must be 'all' or 'one', got {rotations!r}")
        self.rotations = rotations

    def make_head(self, feature_dim: int) -> nn.Module:
        return nn.Linear(feature_dim, self.num_outputs)

    def copies(self) -> int:
        return 4 if self.rotations == "all" else 1

    def sample(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        if self.rotations == "all":
            return torch.arange(4, device=device).repeat_interleave(n)
        return torch.randint(0, 4, (n,), device=device, generator=generator)

    def views(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.rotations == "all":
            return torch.cat([rotate(x, k) for k in range(4)])
        out = x.clone()
        for k in (1, 2, 3):
            chosen = labels == k
            if chosen.any():
                out[chosen] = rotate(x[chosen], k)
        return out

    def loss_from_features(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-image loss: the rotation CE averaged over each image's rotated copies."""
        logits = model.ssl_heads[self.name](features)
        per_view = F.cross_entropy(logits.float(), labels, reduction="none")
        return per_view.view(self.copies(), -1).mean(0)

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_from_features(model, model.features(self.views(x, labels)), labels)


def build_task(name: str, rotations: str = "all") -> RotationPrediction | None:
    if name == "none":
        return None
    if name == "rotation":
        return RotationPrediction(rotations)
    raise ConfigError(f"unknown ssl_task '{name}'; choose one of none, rotation")


def attach_head(model: nn.Module, task) -> None:
    if task is not None and task.name not in model.ssl_heads:
        head = task.make_head(model.feature_dim)
        param = next(model.parameters())
        model.ssl_heads[task.name] = head.to(device=param.device, dtype=param.dtype)
