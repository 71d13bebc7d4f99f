"""The attack-loss variants: which objective the attack maximises and what the update minimises.

| variant | adversarial example maximises | parameters minimise        |
| ce      | CE                            | CE(x_adv) + λ·SSL(x_adv)   |
| joint   | CE + λ·SSL                    | CE(x_adv) + λ·SSL(x_adv)   |
| ssl     | SSL only (label-free)         | CE(x_adv) + λ·SSL(x_adv)   |
| repr    | ‖f(x_adv) − f(x)‖² (label-free) | CE(x_adv) + λ·SSL(x_adv) |

`repr` (Petrov and Kwiatkowska's unsupervised attack used for training): f = model.features, f(x) of
the clean attack input computed once and detached (`clean_representation`).

The classifier and the SSL head share one forward pass over the image and its SSL views, so the
joint objective costs one network evaluation on the stacked batch, not two.

Two ways to perturb the SSL views: `shared` (one δ on the image; the views are rotations of the
perturbed image) and `independent` (the seed code: the image and each rotated copy get their own δ,
so the attack input is the stacked batch [x, views]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attacks import Objective
from .ssl import RotationPrediction, task_loss_from_features


@dataclass
class Losses:
    logits: torch.Tensor  # (N, classes)
    ce: torch.Tensor  # (N,)
    ssl: torch.Tensor | None  # (N,), None without an SSL task


@dataclass
class SSLBatch:
    """The SSL task, its weight λ and the labels drawn for the current batch."""

    task: object
    weight: float
    labels: torch.Tensor
    stacked: bool  # the attack input is [x, views] (independent perturbation)


def stack_inputs(x: torch.Tensor, ssl: SSLBatch) -> torch.Tensor:
    """The attack input of the independent mode: the image followed by its SSL views."""
    return torch.cat([x, ssl.task.views(x, ssl.labels)])


def compute_losses(model, x_in: torch.Tensor, y: torch.Tensor, ssl: SSLBatch | None) -> Losses:
    n = y.shape[0]
    if ssl is None:
        logits = model(x_in[:n])
        return Losses(logits, F.cross_entropy(logits.float(), y, reduction="none"), None)
    if ssl.stacked:
        features = model.features(x_in)
        clean_features, view_features = features[:n], features[n:]
    else:
        views = ssl.task.views(x_in, ssl.labels)
        if ssl.task.copies() == 4 and isinstance(ssl.task, RotationPrediction):
            # The first of the four rotated copies is the unrotated image: reuse its features.
            view_features = model.features(views)
            clean_features = view_features[:n]
        else:
            features = model.features(torch.cat([x_in, views]))
            clean_features, view_features = features[:n], features[n:]
    logits = model.head(clean_features)
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    # Tasks such as inpainting also need the (perturbed) image itself for their target.
    return Losses(logits, ce, task_loss_from_features(ssl.task, model, view_features, ssl.labels, x_in[:n]))


def clean_representation(model, x_in: torch.Tensor) -> torch.Tensor:
    """f(x) of the clean attack input, detached: the anchor of the `repr` objective."""
    with torch.no_grad():
        return model.features(x_in).detach()


def attack_objective(variant: str, ssl: SSLBatch | None, clean_features: torch.Tensor | None = None) -> Objective:
    """The per-example objective the training attack maximises under `variant` (`repr` needs
    `clean_features`, from `clean_representation` on the clean attack input)."""
    if variant == "repr":
        if clean_features is None:
            raise ValueError("attack variant 'repr' needs the clean features (clean_representation)")
        anchor = clean_features.detach()

        def repr_objective(model, x_in, y):
            distance = (model.features(x_in).float() - anchor.float()).flatten(1).pow(2).sum(1)
            # stacked input [x, views] (copy-major): one value per example, summed over its copies
            return distance.view(-1, y.shape[0]).sum(0)

        return repr_objective
    if variant == "ce" or ssl is None:

        def ce_objective(model, x_in, y):
            return F.cross_entropy(model(x_in[: y.shape[0]]).float(), y, reduction="none")

        return ce_objective
    if variant == "joint":
        if ssl.weight == 0:
            return attack_objective("ce", None)

        def joint_objective(model, x_in, y):
            losses = compute_losses(model, x_in, y, ssl)
            return losses.ce + ssl.weight * losses.ssl

        return joint_objective
    if variant == "ssl":

        def ssl_objective(model, x_in, y):
            if ssl.stacked:
                n = y.shape[0]
                return task_loss_from_features(ssl.task, model, model.features(x_in[n:]), ssl.labels, x_in[:n])
            return ssl.task.loss(model, x_in, ssl.labels)

        return ssl_objective
    raise ValueError(f"unknown attack variant {variant!r}")


def update_loss(model, x_in: torch.Tensor, y: torch.Tensor, ssl: SSLBatch | None) -> tuple[torch.Tensor, Losses]:
    """CE(x_adv) + λ·SSL(x_adv), averaged over the batch; λ = 0 skips the SSL forward entirely."""
    losses = compute_losses(model, x_in, y, ssl if ssl is not None and ssl.weight > 0 else None)
    total = losses.ce.mean()
    if losses.ssl is not None:
        total = total + ssl.weight * losses.ssl.mean()
    return total, losses
