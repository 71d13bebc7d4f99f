"""Square Attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020), a score-based black-box
attack, l∞ and l2, [0, 1] pixels: random search over square-shaped updates of the perturbation,
kept when they lower the margin z_y − max_{i≠y} z_i. It uses no gradients, so it still works
where gradient masking stalls the gradient attacks (AutoAttack's last member, 5000 queries).
"""
from __future__ import annotations

import math

import torch

from .attack_inputs import check_attack_input, check_logits
from .attacks import batchnorm_mode
from .device import full_precision
from .folding import folded_for_eval

P_INIT = 0.8  # fraction of the image the first squares cover (AutoAttack: 0.8)


def square_fraction(p_init: float, query: int, n_queries: int) -> float:
    """The fraction p of pixels a square covers at `query` of `n_queries`: halved at fixed points of
    the schedule rescaled to 10,000 queries (Andriushchenko et al. 2020, Section 3)."""
    it = int(query / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _margin(model, x, y):
    """z_y − max_{i≠y} z_i (N,) in fp32. Under autocast the search's margins come from bf16 passes;
    where one says the example crossed the boundary (≤ 0), the full-precision margin replaces it, so
    an example stops, and counts as fooled, only when the full-precision model misclassifies it."""
    with torch.no_grad():
        logits = model(x).float()
    check_logits(logits, "square")
    margin = _logit_margin(logits, y)
    crossed = margin <= 0
    if torch.is_autocast_enabled(x.device.type) and crossed.any():
        idx = crossed.nonzero().flatten()
        with torch.no_grad(), full_precision(x.device):
            margin[idx] = _logit_margin(model(x[idx]).float(), y[idx])
    return margin


def _logit_margin(logits, y):
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - other


def square(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    n_queries: int = 5000,
    p_init: float = P_INIT,
    generator: torch.Generator | None = None,
    fold_bn: bool = True,
) -> torch.Tensor:
    """Untargeted Square Attack on the margin loss; each example stops at its first success.

    x: (N, C, H, W) in [0, 1]; y: (N,). Returns x_adv (N, C, H, W) in the ball and in [0, 1].
    l∞: stripes of ±ε to start, then squares of side √(p·H·W) set to ±ε per channel. l2: a
    simplified version of the paper's: squares of a random sign carrying the budget not used
    outside them, rescaled to the sphere of radius ε. Raises ValueError for images outside [0, 1],
    ε < 0, NaN input or output. Source: Andriushchenko et al. 2020, Algorithms 1-3.
    """
    check_attack_input(x, eps, "square")
    if norm not in ("linf", "l2"):
        raise ValueError(f"square: unknown norm {norm!r}; use linf or l2")
    x = x.detach()
    if eps == 0 or n_queries == 0:
        return x.clone()
    model = folded_for_eval(model) if fold_bn else model
    with batchnorm_mode(model, "eval"):
        return _square(model, x, y, norm, eps, n_queries, p_init, generator)


def _signs(shape, generator, device, dtype):
    return (torch.randint(0, 2, shape, generator=generator, device=device) * 2 - 1).to(dtype)


def _l2_project(delta, x, eps):
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = delta * (eps / norms).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def _square(model, x, y, norm, eps, n_queries, p_init, generator):
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    if norm == "linf":
        delta = eps * _signs((n, c, 1, w), generator, dev, dt).expand(n, c, h, w)
        x_best = (x + delta).clamp(0.0, 1.0)
    else:
        delta = _signs((n, c, 1, w), generator, dev, dt).expand(n, c, h, w)
        x_best = x + _l2_project(delta * eps / math.sqrt(c * h * w), x, eps)
    margin = _margin(model, x_best, y)
    out = x.clone()
    for q in range(1, n_queries):
        active = (margin > 0).nonzero().flatten()
        if len(active) == 0:
            break
        xa, xb = x[active], x_best[active]
        p = square_fraction(p_init, q, n_queries)
        side = max(min(int(round(math.sqrt(p * h * w))), h - 1), 1)
        r = int(torch.randint(0, h - side + 1, (1,), generator=generator, device=dev))
        col = int(torch.randint(0, w - side + 1, (1,), generator=generator, device=dev))
        if norm == "linf":
            window = xa[:, :, r:r + side, col:col + side] + eps * _signs((len(active), c, 1, 1), generator, dev, dt)
            x_new = xb.clone()
            x_new[:, :, r:r + side, col:col + side] = window.clamp(0.0, 1.0)
        else:
            delta = xb - xa
            outside = delta.clone()
            outside[:, :, r:r + side, col:col + side] = 0
            room = (eps ** 2 - outside.flatten(1).pow(2).sum(1)).clamp_min(0).sqrt().view(-1, 1, 1, 1)
            pattern = _signs((len(active), c, 1, 1), generator, dev, dt).expand(-1, -1, side, side)
            new = outside.clone()
            new[:, :, r:r + side, col:col + side] = pattern * room / math.sqrt(c * side * side)
            x_new = xa + _l2_project(new, xa, eps)
        m_new = _margin(model, x_new, y[active])
        better = m_new < margin[active]
        x_best[active[better]] = x_new[better]
        margin[active[better]] = m_new[better]
    fooled = margin <= 0
    out[fooled] = x_best[fooled]
    return out
