"""Cheap gradient-masking checks run with every evaluation (Athalye, Carlini and Wagner, ICML 2018;
Carlini et al. 2019, "On evaluating adversarial robustness", Section 6; the checks AutoAttack runs
before attacking, Croce and Hein 2020). Each returns whether it fired; a fired check means the
robust accuracy of that evaluation may be overstated, not that it is.

The checks, on at most `MAX_EXAMPLES` test images:
- `zero_gradient`: more than 1% of the examples have an input gradient of the cross-entropy that
  is exactly zero (vanishing or shattered gradients; e.g. logits scaled up until softmax saturates);
- `randomised_output`: two forward passes on the same input differ (a randomised model needs
  expectation over transformation, AutoAttack's `rand` version);
- `probability_output`: the outputs are already probabilities (rows in [0, 1] summing to 1), so
  the cross-entropy is applied twice and its gradient is flattened;
- `large_eps_not_zero`: APGD-CE accuracy at l∞ ε = 0.5 is above 0.05 (every image can then be
  moved to the uniform grey image, so robust accuracy must fall to about 0);
- `more_steps_raise_accuracy`: last-iterate PGD with 4× the steps gives an accuracy more than 0.02
  higher than with the base number of steps (a noisy or masked loss surface);
- `square_beats_gradient`: the gradient-free Square attack fools more than 5% of the examples the
  gradient attacks left robust at the checked ε.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .apgd import apgd
from .attacks import cross_entropy_objective, pgd
from .square import square

CHECKS = ("zero_gradient", "randomised_output", "probability_output", "large_eps_not_zero",
          "more_steps_raise_accuracy", "square_beats_gradient")
MAX_EXAMPLES = 100
LARGE_EPS = 0.5


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def masking_checks(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    still_robust: torch.Tensor | None = None,
    pgd_steps: int = 10,
    square_queries: int = 300,
    seed: int = 0,
) -> dict[str, float | bool]:
    """Run the checks of the module docstring on `model` (eval mode) with x (N, ...) in [0, 1].

    `eps`: the budget of the steps and Square checks (e.g. ε_train); `still_robust` (N,) bool: the
    examples the evaluation's gradient attacks left robust at `eps` (the Square check is skipped
    without it). Returns {check: fired (bool)} for every name in CHECKS that ran, plus the measured
    numbers under `<check>_value`. Costs about 150 forward-backward passes of ≤ 100 images.
    """
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(seed)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:MAX_EXAMPLES].to(x.device)
    xs, ys = x[pick].detach(), y[pick]
    out: dict[str, float | bool] = {}

    xg = xs.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, ys, reduction="sum"), xg)
    zero = (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    out.update(zero_gradient=zero > 0.01, zero_gradient_value=zero)

    with torch.no_grad():
        first, second = model(xs), model(xs)
    spread = (first - second).abs().max().item()
    out.update(randomised_output=spread > 1e-5 * (1 + first.abs().max().item()), randomised_output_value=spread)
    sums = first.sum(1)
    is_prob = bool((first >= 0).all() and (first <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4))
    out.update(probability_output=is_prob, probability_output_value=float(is_prob))

    large = _accuracy(model, apgd(model, xs, ys, "ce", "linf", LARGE_EPS, steps=20, generator=g), ys)
    out.update(large_eps_not_zero=large > 0.05, large_eps_not_zero_value=large)

    if eps > 0:
        def last_iterate(steps):
            adv = pgd(model, xs, ys, cross_entropy_objective, norm, eps, 2.5 * eps / steps, steps,
                      random_start=True, generator=torch.Generator(device=x.device).manual_seed(seed))
            return _accuracy(model, adv, ys)

        rise = last_iterate(4 * pgd_steps) - last_iterate(pgd_steps)
        out.update(more_steps_raise_accuracy=rise > 0.02, more_steps_raise_accuracy_value=rise)

    if eps > 0 and still_robust is not None:
        idx = still_robust.nonzero().flatten()[:MAX_EXAMPLES]
        if len(idx):
            adv = square(model, x[idx], y[idx], norm, eps, n_queries=square_queries, generator=g)
            found = 1.0 - _accuracy(model, adv, y[idx])
            out.update(square_beats_gradient=found > 0.05, square_beats_gradient_value=found)
        else:
            out.update(square_beats_gradient=False, square_beats_gradient_value=0.0)
    return out


def fired(result: dict) -> list[str]:
    """The names of the checks in `result` (from masking_checks) that fired, in CHECKS order."""
    return [name for name in CHECKS if result.get(name) is True]
