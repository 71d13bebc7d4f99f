"""Auto-PGD (APGD; Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020, Section 3, Algorithm 1), l∞ and l2, [0, 1] pixels.

PGD without a step size to tune: the step starts at 2ε and is halved at checkpoints when the loss
stopped rising (fewer than 75% of the steps since the last checkpoint raised it, or neither the step
nor the best loss changed since then), restarting from the best point so far; each step mixes in
the previous one with momentum 0.75. An example counts as fooled at any iterate that fools it
(that iterate is returned); otherwise the iterate with the highest loss is returned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attack_inputs import check_attack_input, check_logits
from .attacks import ascent_step, batchnorm_mode, misclassified, project, start_delta
from .device import full_precision
from .dlr import dlr_loss, dlr_targeted_loss
from .folding import folded_for_eval

LOSSES = ("ce", "dlr", "dlr_targeted")
MOMENTUM = 0.75  # α in Algorithm 1
RISE_FRACTION = 0.75  # ρ: halve the step when at most this fraction of the steps raised the loss


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size may be halved: w_j = ⌈p_j·N⌉ with p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (Section 3.2), computed in whole
    iterations as the authors' code does: [22, 41, 57, 70, 80, 87, 93, 99] for N = 100."""
    period, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], period
    while at <= steps:
        points.append(at)
        period = max(period - shrink, shortest)
        at += period
    return points


def _loss(name: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss(logits, y)
    return dlr_targeted_loss(logits, y, target)


def _loss_grad(model, x_adv, y, name, target):
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv).float()  # a bf16 forward's logits; the loss and its comparisons in fp32
        loss = _loss(name, logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), grad.detach(), logits.detach()


def apgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "ce",
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    target: torch.Tensor | None = None,
    random_start: bool = True,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    fold_bn: bool = True,
) -> torch.Tensor:
    """One APGD run on `loss` ("ce", "dlr", or "dlr_targeted" toward `target` (N,)).

    x: (N, ...) images in [0, 1]; y: (N,) labels; eps in pixel units of `norm` ("linf" or "l2").
    Returns x_adv (N, ...), detached, in the ball and in [0, 1]: the first iterate that fooled the
    model, else the highest-loss iterate. Runs on the eval-mode model (BatchNorm folded unless
    `fold_bn=False`); examples leave the batch once fooled, which changes nothing for the others.
    `init` fixes the starting δ. Raises ValueError for images outside [0, 1], ε < 0, NaN input or
    output. Source: Croce and Hein 2020, Algorithm 1.
    """
    check_attack_input(x, eps, "apgd")
    if loss not in LOSSES:
        raise ValueError(f"apgd: unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if (loss == "dlr_targeted") != (target is not None):
        raise ValueError("apgd: pass target labels exactly when loss is 'dlr_targeted'")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    if fold_bn:
        model = folded_for_eval(model)
    with batchnorm_mode(model, "eval"):
        return _apgd(model, x, y, loss, norm, eps, steps, target, random_start, init, generator)


def _apgd(model, x, y, loss_name, norm, eps, steps, target, random_start, init, generator):
    n, view = len(x), (-1,) + (1,) * (x.dim() - 1)
    out = x.clone()
    active = torch.arange(n, device=x.device)
    x0, y0, t0 = x, y, target
    x_cur = x + start_delta(x, norm, eps, init, random_start, generator)
    loss, grad, logits = _loss_grad(model, x_cur, y, loss_name, target)
    check_logits(logits, "apgd")
    step = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_best, grad_best, best_loss = x_cur.clone(), grad.clone(), loss.clone()
    best_at_checkpoint, halved_at_checkpoint = best_loss.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    rises = torch.zeros(n, device=x.device)
    x_prev, last_loss = x_cur.clone(), loss.clone()
    out[active] = x_cur
    checkpoints, last_checkpoint = set(apgd_checkpoints(steps)), 0

    def drop(fooled):
        nonlocal active, x0, y0, t0, x_cur, x_prev, grad, x_best, grad_best, best_loss, step
        nonlocal best_at_checkpoint, halved_at_checkpoint, rises, last_loss
        keep = ~fooled
        active, x0, y0 = active[keep], x0[keep], y0[keep]
        t0 = None if t0 is None else t0[keep]
        x_cur, x_prev, grad, x_best, grad_best = x_cur[keep], x_prev[keep], grad[keep], x_best[keep], grad_best[keep]
        best_loss, step, best_at_checkpoint = best_loss[keep], step[keep], best_at_checkpoint[keep]
        halved_at_checkpoint, rises, last_loss = halved_at_checkpoint[keep], rises[keep], last_loss[keep]

    fooled = misclassified(model, x_cur, y0, logits.argmax(1) != y0)
    if fooled.any():
        out[active[fooled]] = x_cur[fooled]
        drop(fooled)
    for i in range(steps):
        if len(active) == 0:
            return out
        z = x0 + project(x_cur - x0 + step.view(view) * ascent_step(grad, norm), x0, norm, eps)
        a = MOMENTUM if i > 0 else 1.0
        x_next = x0 + project(x_cur - x0 + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x0, norm, eps)
        x_prev, x_cur = x_cur, x_next
        loss, grad, logits = _loss_grad(model, x_cur, y0, loss_name, t0)
        # the fooling iterate itself is kept, before a checkpoint may move x_cur back to x_best
        fooled = misclassified(model, x_cur, y0, logits.argmax(1) != y0)
        if fooled.any():
            out[active[fooled]] = x_cur[fooled]
        rises += (loss > last_loss).float()
        last_loss = loss
        better = loss > best_loss
        x_best = torch.where(better.view(view), x_cur, x_best)
        grad_best = torch.where(better.view(view), grad, grad_best)
        best_loss = torch.where(better, loss, best_loss)
        if i + 1 in checkpoints:
            window = i + 1 - last_checkpoint
            halve = (rises <= RISE_FRACTION * window) | (~halved_at_checkpoint & (best_at_checkpoint >= best_loss))
            halved_at_checkpoint, best_at_checkpoint = halve, best_loss.clone()
            step = torch.where(halve, step / 2, step)
            x_cur = torch.where(halve.view(view), x_best, x_cur)
            grad = torch.where(halve.view(view), grad_best, grad)
            rises.zero_()
            last_checkpoint = i + 1
        if fooled.any():
            drop(fooled)
    if len(active):
        out[active] = x_best
    return out


def apgd_targeted(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    n_target_classes: int = 9,
    random_start: bool = True,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    fold_bn: bool = True,
) -> torch.Tensor:
    """APGD-T: APGD on the targeted DLR loss toward each of the `n_target_classes` classes the clean
    image gives the highest logits after the top one (AutoAttack's standard version: 9), each run
    only on the examples no earlier target fooled, all from the same start `init`.

    Shapes, units and errors as `apgd`. Source: Croce and Hein 2020, Section 4 (APGD-T).
    """
    check_attack_input(x, eps, "apgd_targeted")
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    folded = folded_for_eval(model) if fold_bn else model
    with torch.no_grad(), batchnorm_mode(folded, "eval"), full_precision(x.device):
        logits = folded(x)
    check_logits(logits, "apgd_targeted")
    order = logits.argsort(dim=1, descending=True)
    out = x.clone()
    robust = logits.argmax(1) == y
    for rank in range(1, min(n_target_classes, logits.shape[1] - 1) + 1):
        idx = robust.nonzero().flatten()
        if len(idx) == 0:
            break
        x_adv = apgd(folded, x[idx], y[idx], "dlr_targeted", norm, eps, steps, target=order[idx, rank],
                     random_start=random_start, init=None if init is None else init[idx],
                     generator=generator, fold_bn=False)
        with torch.no_grad(), batchnorm_mode(folded, "eval"), full_precision(x.device):
            fooled = folded(x_adv).argmax(1) != y[idx]
        out[idx[fooled]] = x_adv[fooled]
        robust[idx[fooled]] = False
    return out
