"""Gradient attacks in pixel space ([0, 1] images): PGD for l∞ and l2, and FGSM with random start.

An objective is any function `objective(model, x_adv, y) -> per-example loss (N,)`; the attack
maximises it. Which objective is passed here and which to the parameter update is exactly what the
attack-loss variants (`ce`, `joint`, `ssl`) differ in, see `trainables.objectives`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .device import full_precision
from .folding import folded_for_eval

Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# Guards the division by a zero gradient (e.g. an input the objective does not depend on).
_TINY = 1e-12


def cross_entropy_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project δ onto the ε-ball of `norm` and so that x + δ stays in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * torch.clamp(eps / (_per_example_norm(delta) + _TINY), max=1.0)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    # Clamping the image can only shrink |δ| coordinate-wise, so the result stays in the ball.
    return (x + delta).clamp(0.0, 1.0) - x


def random_delta(
    shape: torch.Size, norm: str, eps: float, device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random start: uniform in the l∞ cube, or a uniformly random direction and radius in l2."""
    if norm == "linf":
        return (torch.rand(shape, device=device, generator=generator) * 2 - 1) * eps
    direction = torch.randn(shape, device=device, generator=generator)
    direction = direction / (_per_example_norm(direction) + _TINY)
    radius = torch.rand((shape[0],) + (1,) * (len(shape) - 1), device=device, generator=generator)
    return direction * radius * eps


def start_delta(x: torch.Tensor, norm: str, eps: float, init: torch.Tensor | None, random_start: bool,
                 generator: torch.Generator | None) -> torch.Tensor:
    """A restart's starting δ, projected: `init` if given, else random or zero."""
    if init is not None:
        delta = init.to(x)
    elif random_start:
        delta = random_delta(x.shape, norm, eps, x.device, generator)
    else:
        delta = torch.zeros_like(x)
    return project(delta, x, norm, eps)


def ascent_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit norm for `grad` (N, ...): sign(grad) in l∞, grad/‖grad‖₂
    per example in l2 (Madry et al. 2018, Sec. 2; APGD uses the same, Croce & Hein 2020, Alg. 1)."""
    if norm == "linf":
        return grad.sign()
    return grad / (_per_example_norm(grad) + _TINY)


def _step_and_project_(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, norm: str,
                       eps: float, step_size: float) -> torch.Tensor:
    """`project(delta + step_size·ascent(grad), x, norm, eps)` computed in place in `delta` (and
    `grad`, which is consumed): the same values without allocating five image-sized temporaries
    per step (about 1% of a small_cnn attack step on CPU)."""
    if not grad.is_contiguous():  # e.g. an expanded gradient of an objective linear in the input
        grad = grad.contiguous()
    if norm == "linf":
        delta.add_(grad.sign_(), alpha=step_size).clamp_(-eps, eps)
    elif norm == "l2":
        delta.add_(grad.div_(_per_example_norm(grad).add_(_TINY)), alpha=step_size)
        delta.mul_(torch.clamp(eps / (_per_example_norm(delta) + _TINY), max=1.0))
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return delta.add_(x).clamp_(0.0, 1.0).sub_(x)


def misclassified(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Of `candidates` ((N,) bool: examples a pass under autocast found misclassified), those the
    model misclassifies in full precision; x (N, ...), y (N,).

    An attack may search under bf16 autocast, where a point just across the decision boundary can
    lie on the other side of it in full precision. Attacks stop on an example, and report it
    fooled, only when this confirms it, so that robust accuracy is the full-precision model's.
    Outside autocast the candidates were computed in full precision and are returned as they are."""
    if not torch.is_autocast_enabled(x.device.type) or not candidates.any():
        return candidates
    idx = candidates.nonzero().flatten()
    with torch.no_grad(), full_precision(x.device):
        wrong = model(x[idx]).argmax(1) != y[idx]
    confirmed = torch.zeros_like(candidates)
    confirmed[idx[wrong]] = True
    return confirmed


@contextmanager
def batchnorm_mode(model: torch.nn.Module, mode: str | None) -> Iterator[None]:
    """Run with the model in `mode` ("train" or "eval"; None keeps it) and restore it afterwards."""
    was_training = model.training
    if mode is not None:
        model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective = cross_entropy_objective,
    norm: str = "linf",
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    restarts: int = 1,
    bn_mode: str | None = "eval",
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
    fold_bn: bool = True,
    stop_on_success: bool = False,
) -> torch.Tensor:
    """Projected gradient ascent on `objective` inside the `norm` ball of radius `eps`.

    Returns x_adv, detached, with ‖x_adv − x‖ ≤ eps and x_adv in [0, 1]. With several restarts each
    example keeps the restart that reached the highest objective. `init` fixes the first restart's
    starting δ (evaluation uses it to give every example the same start however it is batched).
    `bn_mode` is explicit because training attacks in train mode (as the seed code) and
    evaluation in eval mode. In eval mode the attack runs on a copy of the model with its BatchNorms
    folded into the layers before them (`trainables.folding`; the same function up to float
    rounding, and `objective` gets that copy); `fold_bn=False` attacks the model as it is.
    `stop_on_success` (cross-entropy objective) stops attacking an example at the first iterate the
    model misclassifies and returns that iterate (as AutoAttack keeps any successful iterate; later
    restarts attack only the examples not fooled yet): a stronger and cheaper evaluation than the
    last iterate alone.
    """
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    if fold_bn and bn_mode == "eval":
        model = folded_for_eval(model)
    if stop_on_success:
        if objective is not cross_entropy_objective:
            raise ValueError("stop_on_success needs the cross-entropy objective (it reads the logits)")
        with batchnorm_mode(model, bn_mode):
            return _pgd_until_misclassified(model, x, y, norm, eps, step_size, steps, random_start,
                                            restarts, generator, init)
    best_x, best_loss = None, None
    with batchnorm_mode(model, bn_mode):
        for restart in range(restarts):
            delta = start_delta(x, norm, eps, init if restart == 0 else None, random_start, generator)
            for _ in range(steps):
                delta.requires_grad_(True)
                # enable_grad: an attack must work when called under torch.no_grad() too.
                with torch.enable_grad():
                    loss = objective(model, x + delta, y)
                    (grad,) = torch.autograd.grad(loss.sum(), delta)
                delta = _step_and_project_(delta.detach_(), grad, x, norm, eps, step_size)
            x_adv = (x + delta).clamp(0.0, 1.0).detach()
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                loss = objective(model, x_adv, y).detach()
            if best_x is None:
                best_x, best_loss = x_adv, loss
            else:
                better = loss > best_loss
                best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_x)
                best_loss = torch.maximum(loss, best_loss)
    return best_x


def _pgd_until_misclassified(model, x, y, norm, eps, step_size, steps, random_start, restarts, generator, init):
    """PGD on the cross-entropy in which an example leaves the batch at the first iterate the model
    misclassifies, keeping that iterate: the same trajectories as `pgd` until then (examples do not
    interact in eval mode; up to the rounding a smaller batch may bring), so every example the last
    iterate of `pgd` misclassifies is misclassified here too and robust accuracy can only go down.
    Restarts attack only the examples no earlier restart fooled. The misclassification is read off
    the logits each step computes anyway."""
    x_adv = x.clone()
    active = torch.arange(len(x), device=x.device)
    for restart in range(restarts):
        x_act, y_act = x[active], y[active]
        start = init.to(x)[active] if restart == 0 and init is not None else None
        delta = start_delta(x_act, norm, eps, start, random_start, generator)
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_act + delta)
                loss = F.cross_entropy(logits, y_act, reduction="none")
                (grad,) = torch.autograd.grad(loss.sum(), delta)
            delta = delta.detach_()
            fooled = misclassified(model, x_act + delta, y_act, logits.detach().argmax(1) != y_act)
            if fooled.any():
                x_adv[active[fooled]] = (x_act[fooled] + delta[fooled]).clamp(0.0, 1.0)
                kept = ~fooled
                active, x_act, y_act = active[kept], x_act[kept], y_act[kept]
                delta, grad = delta[kept], grad[kept]
                if len(active) == 0:
                    return x_adv
            delta = _step_and_project_(delta, grad, x_act, norm, eps, step_size)
        x_adv[active] = (x_act + delta).clamp(0.0, 1.0)
        # the last iterate: fooled ones are done, the rest try the next restart
        with torch.no_grad(), full_precision(x.device):
            active = active[model(x_adv[active]).argmax(1) == y[active]]
        if len(active) == 0:
            break
    return x_adv


def fgsm(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective = cross_entropy_objective,
    norm: str = "linf",
    eps: float = 8 / 255,
    step_size: float | None = None,
    random_start: bool = True,
    bn_mode: str | None = "eval",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FGSM with a random start (Wong, Rice and Kolter 2020): one step of 1.25·ε by default."""
    return pgd(
        model, x, y, objective, norm, eps,
        step_size=1.25 * eps if step_size is None else step_size,
        steps=1, random_start=random_start, restarts=1, bn_mode=bn_mode, generator=generator,
    )
