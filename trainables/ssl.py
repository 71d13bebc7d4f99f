"""Self-supervised auxiliary tasks. A task owns its head and its loss on a batch of images.

Interface of a task (rotation, contrastive, inpainting; `MultiTask` combines several with weights
and implements the same methods):
- `name`, `make_head(feature_dim) -> nn.Module` (attached as `model.ssl_heads[name]`);
- `sample(n, generator, device)` draws the task's labels for a batch of n images (fixed for the
  whole attack and update of that batch, so the attack and the update see the same views);
- `views(x, labels)` builds the inputs the head classifies;
- `loss(model, x, labels) -> per-example loss (N,)`, the `ssl_loss(model, x)` of the design;
- `copies()` views per image and `loss_from_features(model, features, labels)` on their features.
Tasks whose target is the image itself (inpainting) set `uses_input = True` and take `x=` in
`loss_from_features`; `task_loss_from_features` passes it only to them.
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


class Contrastive:
    """SimCLR-style contrastive learning: NT-Xent over two augmented views of every image.

    The views are random crops (after zero padding) with random horizontal flips, drawn from the
    passed generator in `sample` as labels (2, N, 3) = (top, left, flip) per view, so an attack
    and the update of one batch see the same views; building them is differentiable in x.
    A projection MLP maps features to the embedding the NT-Xent loss (temperature τ) compares.
    Per-image loss: the mean of the NT-Xent terms of the image's two views (2N−1 candidates each).
    """

    name = "contrastive"
    uses_input = False

    def __init__(self, temperature: float = 0.2, padding: int | None = None, projection_dim: int = 64):
        if temperature <= 0:
            raise ConfigError(f"contrastive temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.padding = padding
        self.projection_dim = projection_dim

    def make_head(self, feature_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                             nn.Linear(feature_dim, self.projection_dim))

    def copies(self) -> int:
        return 2

    def _padding(self, x: torch.Tensor) -> int:
        return self.padding if self.padding is not None else max(2, x.shape[-1] // 8)

    def sample(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        # The crop offsets are drawn in [0, 1) and scaled in `views`, where the image size is known.
        return torch.rand((2, n, 3), device=device, generator=generator)

    def views(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self._padding(x)
        padded = F.pad(x, (p, p, p, p))
        out = []
        for view in labels:  # (n, 3)
            top = (view[:, 0] * (2 * p + 1)).long().clamp(max=2 * p)
            left = (view[:, 1] * (2 * p + 1)).long().clamp(max=2 * p)
            rows = top[:, None] + torch.arange(h, device=x.device)
            cols = left[:, None] + torch.arange(w, device=x.device)
            cols = torch.where((view[:, 2] < 0.5)[:, None], cols, cols.flip(1))
            index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).reshape(n, 1, h * w)
            out.append(padded.reshape(n, c, -1).gather(2, index.expand(n, c, h * w)).reshape(n, c, h, w))
        return torch.cat(out)

    def loss_from_features(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nt_xent(model.ssl_heads[self.name](features).float(), self.temperature)

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_from_features(model, model.features(self.views(x, labels)), labels)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of 2N embeddings (views i and i+N are the positive pair), per image (N,): the mean
    of the two views' cross-entropies of finding their partner among the other 2N − 1."""
    two_n = z.shape[0]
    n = two_n // 2
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(two_n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, two_n), torch.arange(0, n)]).to(z.device)
    per_view = F.cross_entropy(sim, partner, reduction="none")
    return per_view.view(2, n).mean(0)


class Inpainting:
    """Masked-patch inpainting: zero the centre patch (side `fraction`·H) and regress its pixels
    from the features of the masked image (a linear decoder to C·p·p), per-image L2 (mean squared
    error over the patch). Needs the unmasked image for its target: `uses_input`."""

    name = "inpainting"
    uses_input = True

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction
        self.shape: tuple[int, int, int] | None = None  # (C, H, W), set by `configure`

    def configure(self, channels: int, height: int, width: int) -> None:
        self.shape = (channels, height, width)

    def _box(self, h: int, w: int) -> tuple[int, int, int, int]:
        ph, pw = max(1, int(round(h * self.fraction))), max(1, int(round(w * self.fraction)))
        top, left = (h - ph) // 2, (w - pw) // 2
        return top, top + ph, left, left + pw

    def make_head(self, feature_dim: int) -> nn.Module:
        if self.shape is None:
            raise ValueError("Inpainting.configure(channels, height, width) must be called first")
        c, h, w = self.shape
        t, b, l, r = self._box(h, w)
        return nn.Linear(feature_dim, c * (b - t) * (r - l))

    def copies(self) -> int:
        return 1

    def sample(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long, device=device)  # deterministic: nothing to draw

    def views(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t, b, l, r = self._box(*x.shape[-2:])
        mask = torch.ones_like(x)
        mask[..., t:b, l:r] = 0
        return x * mask

    def target(self, x: torch.Tensor) -> torch.Tensor:
        t, b, l, r = self._box(*x.shape[-2:])
        return x[..., t:b, l:r].flatten(1)

    def loss_from_features(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                           x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise ValueError("the inpainting loss needs the unmasked images x")
        prediction = model.ssl_heads[self.name](features).float()
        return (prediction - self.target(x).float()).pow(2).mean(1)

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_from_features(model, model.features(self.views(x, labels)), labels, x=x)


class MultiTask:
    """Several SSL tasks as one: loss = Σ_t w_t·SSL_t, per image. Its labels are the tuple of the
    tasks' labels and its views the concatenation of theirs, so `objectives` treats it like any
    single task (with weight 1: the weights are inside)."""

    name = "multi"
    uses_input = True

    def __init__(self, tasks: list, weights: list[float]):
        if not tasks or len(tasks) != len(weights):
            raise ConfigError("MultiTask needs one weight per task and at least one task")
        self.tasks = list(tasks)
        self.weights = [float(w) for w in weights]

    def make_head(self, feature_dim: int) -> nn.Module:  # pragma: no cover - heads are per task
        raise TypeError("MultiTask has no head of its own; use attach_head(model, multitask)")

    def copies(self) -> int:
        return sum(t.copies() for t in self.tasks)

    def sample(self, n: int, generator: torch.Generator | None, device) -> tuple:
        return tuple(t.sample(n, generator, device) for t in self.tasks)

    def views(self, x: torch.Tensor, labels: tuple) -> torch.Tensor:
        return torch.cat([t.views(x, lab) for t, lab in zip(self.tasks, labels)])

    def per_task_from_features(self, model, features, labels, x=None) -> dict[str, torch.Tensor]:
        n = features.shape[0] // self.copies()
        out, start = {}, 0
        for task, lab in zip(self.tasks, labels):
            part = features[start : start + task.copies() * n]
            start += task.copies() * n
            out[task.name] = task_loss_from_features(task, model, part, lab, x)
        return out

    def loss_from_features(self, model, features, labels, x=None) -> torch.Tensor:
        losses = self.per_task_from_features(model, features, labels, x)
        return sum(w * losses[t.name] for t, w in zip(self.tasks, self.weights))

    def loss(self, model: nn.Module, x: torch.Tensor, labels: tuple) -> torch.Tensor:
        return self.loss_from_features(model, model.features(self.views(x, labels)), labels, x=x)


def task_loss_from_features(task, model, features, labels, x=None) -> torch.Tensor:
    """`task.loss_from_features`, passing the unmasked images to the tasks that need them."""
    if getattr(task, "uses_input", False):
        return task.loss_from_features(model, features, labels, x=x)
    return task.loss_from_features(model, features, labels)


def build_task(name: str, rotations: str = "all", temperature: float = 0.2):
    if name == "none":
        return None
    if name == "rotation":
        return RotationPrediction(rotations)
    if name == "contrastive":
        return Contrastive(temperature)
    if name == "inpainting":
        return Inpainting()
    raise ConfigError(f"unknown ssl_task '{name}'; choose one of none, rotation, contrastive, inpainting")


def build_tasks(weights: dict[str, float], rotations: str = "all", temperature: float = 0.2) -> MultiTask | None:
    """The `ssl_tasks: {task: weight}` mapping as one MultiTask (tasks in a fixed order)."""
    names = [n for n in ("rotation", "contrastive", "inpainting") if n in weights]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"unknown SSL task '{unknown[0]}' in ssl_tasks; choose among rotation, contrastive, inpainting")
    if not names:
        return None
    return MultiTask([build_task(n, rotations, temperature) for n in names], [weights[n] for n in names])


def task_from_config(cfg: dict) -> tuple[object | None, float]:
    """(task, λ) of a resolved config: `ssl_tasks` when non-empty (a MultiTask, λ = 1 with the
    weights inside), else `ssl_task` and `ssl_weight` as before."""
    temperature = cfg.get("contrastive_temperature", 0.2)
    if cfg.get("ssl_tasks"):
        return build_tasks(cfg["ssl_tasks"], cfg["rotations"], temperature), 1.0
    return build_task(cfg["ssl_task"], cfg["rotations"], temperature), cfg["ssl_weight"]


def attach_head(model: nn.Module, task) -> None:
    if isinstance(task, MultiTask):
        for sub in task.tasks:
            attach_head(model, sub)
        return
    if task is not None and task.name not in model.ssl_heads:
        if getattr(task, "shape", "unused") is None and hasattr(model, "info"):  # inpainting
            task.configure(model.info.channels, model.info.size, model.info.size)
        head = task.make_head(model.feature_dim)
        param = next(model.parameters())
        model.ssl_heads[task.name] = head.to(device=param.device, dtype=param.dtype)
