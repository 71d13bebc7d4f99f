"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce and Hein, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020, Section 3; targeted version as in
AutoAttack, Croce and Hein 2020b, Section 4), l∞ and l2, [0, 1] pixels.

FAB looks for the smallest perturbation that changes the decision: each step linearises the decision
boundary between the true class y and a target class t at the current point, projects both the
current point and the original image onto that hyperplane (inside the [0, 1] box), takes a convex
combination biased toward the original image, and after a success steps back toward the original.
The attack does not use ε while searching; an example counts as fooled at ε when the smallest
adversarial perturbation found has norm ≤ ε. So over an ascending-ε curve each (example, target)
search is needed once: `FabSearches` keeps what the searches at smaller ε found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attack_inputs import check_attack_input, check_logits
from .attacks import batchnorm_mode
from .device import full_precision
from .folding import folded_for_eval

ALPHA_MAX = 0.1  # largest weight of the original image's projection in a step
ETA = 1.05  # overshoot of the projection, to land on the target side
BETA = 0.9  # after a success, shrink the perturbation to this fraction
_BISECTIONS = 30
_TINY = 1e-12


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def project_on_hyperplane_in_box(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest (in `norm`) d with w·d = c and 0 ≤ p + d ≤ 1, per row; p, w: (M, D), c: (M,).

    The minimiser has the form d_i = clip(λ·w_i) (l2) or clip(t·sign(c·w_i)) (l∞) for a scalar
    λ or t, and w·d is monotone in it, so a bisection (on a log scale, between the box-free solution
    and the box's largest step) finds it; when even the largest step in the box cannot reach the
    hyperplane, that largest step is returned. Returns d (M, D).
    """
    lo, hi = -p, 1 - p
    s = torch.where(c >= 0, 1.0, -1.0).to(p)[:, None]
    target = c.abs()
    if norm == "linf":
        direction = s * w.sign()

        def step(r):
            return (r[:, None] * direction).clamp(lo, hi)
        low = target / (w.abs().sum(1) + _TINY)
        high = torch.ones_like(low)
    else:
        direction = s * w

        def step(r):
            return (r[:, None] * direction).clamp(lo, hi)
        low = target / (w.pow(2).sum(1) + _TINY)
        reach = torch.maximum(lo.abs(), hi.abs()) / (w.abs() + _TINY)
        high = torch.maximum(reach.amax(1), low)
    reached = lambda r: (s.squeeze(1) * (w * step(r)).sum(1)) >= target  # noqa: E731
    low = torch.minimum(low, high).clamp_min(_TINY)
    done = reached(low)
    high = torch.where(done, low, high)
    for _ in range(_BISECTIONS):
        mid = (low * high).sqrt()
        ok = reached(mid)
        high = torch.where(ok, mid, high)
        low = torch.where(ok, low, mid)
    return step(high)


def _margin_and_grad(model, x, y, t):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        idx = torch.arange(len(x), device=x.device)
        margin = logits[idx, y] - logits[idx, t]
        (grad,) = torch.autograd.grad(margin.sum(), x)
    return margin.detach(), grad.detach(), logits.detach()


def _fab_run(model, x, y, t, norm, steps):
    """Smallest adversarial perturbation found toward target t: (x_adv (N, ...), its norm (N,), inf
    where none was found)."""
    n = len(x)
    flat0 = x.flatten(1)
    best = x.clone()
    best_norm = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    cur = flat0.clone()
    for _ in range(steps):
        margin, grad, logits = _margin_and_grad(model, cur.view_as(x), y, t)
        check_logits(logits, "fab_targeted")
        g = grad.flatten(1)
        # hyperplane of the linearised boundary z_y − z_t = 0 around cur: margin + g·(q − cur) = 0
        d_cur = project_on_hyperplane_in_box(cur, g, -margin, norm)
        d_orig = project_on_hyperplane_in_box(flat0, g, -margin - (g * (flat0 - cur)).sum(1), norm)
        a_cur, a_orig = _norm(d_cur, norm), _norm(d_orig, norm)
        alpha = (a_cur / (a_cur + a_orig + _TINY)).clamp(0.0, ALPHA_MAX)[:, None]
        cur = ((cur + ETA * d_cur) * (1 - alpha) + (flat0 + ETA * d_orig) * alpha).clamp(0.0, 1.0)
        with torch.no_grad():
            fooled = model(cur.view_as(x)).argmax(1) != y
        if fooled.any():
            dist = _norm(cur - flat0, norm)
            better = fooled & (dist < best_norm)
            best[better] = cur[better].view_as(x[better])
            best_norm = torch.where(better, dist, best_norm)
            cur = torch.where(fooled[:, None], flat0 + BETA * (cur - flat0), cur)
    return best, best_norm


@dataclass(frozen=True)
class FabSearches:
    """What FAB-T's searches found on a fixed set of examples, kept across calls at different ε
    (same model, norm, steps and targets): per example, how many of its targets have been searched
    (in rank order), the smallest adversarial perturbation's norm found (inf: none) and that
    adversarial example. `index` maps the rows of the images passed to `fab_targeted` to rows of
    the store: `for_images(x)` covers all of x, `select(rows)` a subset, sharing the store.
    """

    searched: torch.Tensor  # (N,) int64
    best_norm: torch.Tensor  # (N,)
    best: torch.Tensor  # (N, ...)
    index: torch.Tensor  # (M,) int64 rows of the store

    @classmethod
    def for_images(cls, x: torch.Tensor) -> "FabSearches":
        n = len(x)
        return cls(torch.zeros(n, dtype=torch.long, device=x.device),
                   torch.full((n,), float("inf"), device=x.device, dtype=x.dtype),
                   x.detach().clone(), torch.arange(n, device=x.device))

    def select(self, rows: torch.Tensor) -> "FabSearches":
        return FabSearches(self.searched, self.best_norm, self.best, self.index[rows])


def fab_targeted(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    n_target_classes: int = 9,
    fold_bn: bool = True,
    searches: FabSearches | None = None,
) -> torch.Tensor:
    """FAB-T against the `n_target_classes` classes with the highest clean logits after the top one,
    each only on the examples no earlier target fooled within ε; no random start (AutoAttack's
    standard version: 9 targets, 100 steps, one run).

    x: (N, ...) in [0, 1]; y: (N,). Returns x_adv (N, ...): an adversarial example found whose
    perturbation's norm is ≤ eps, else x unchanged. `searches` (one row per row of x): reuse and
    extend the searches of earlier calls on the same images; since the search does not depend on
    ε, the same examples are fooled as without it, and a target already searched is not searched
    again. Raises ValueError for images outside [0, 1], ε < 0, NaN input or output. Source: Croce
    and Hein 2020 (FAB), Algorithm 1 with the targeted linearisation of AutoAttack.
    """
    check_attack_input(x, eps, "fab_targeted")
    x = x.detach()
    out = x.clone()
    if eps == 0 or steps == 0:
        return out
    model = folded_for_eval(model) if fold_bn else model
    # FAB's answers lie on the decision boundary, where bf16 rounding decides their side: it searches
    # in full precision even inside an autocast region
    with batchnorm_mode(model, "eval"), full_precision(x.device):
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, "fab_targeted")
        order = logits.argsort(dim=1, descending=True)
        robust = logits.argmax(1) == y
        within = eps * (1 + 1e-6)
        again = torch.zeros_like(robust)
        if searches is not None:
            rows = searches.index
            found = robust & (searches.best_norm[rows] <= within)
            if found.any():
                out[found] = searches.best[rows[found]]
                with torch.no_grad():
                    kept = model(out[found]).argmax(1) != y[found]
                # FAB's best point lies on the decision boundary and can fall back to y in another
                # batch (a last-bit difference): search those examples again, as without `searches`
                again[found.nonzero().flatten()[~kept]] = True
                out[again] = x[again]
                robust &= ~found | again
        for rank in range(1, min(n_target_classes, logits.shape[1] - 1) + 1):
            if not robust.any():
                break
            # a target searched before found nothing within the smaller ε it ran at, nor within this one
            todo = robust if searches is None else robust & ((searches.searched[rows] < rank) | again)
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                continue
            x_adv, dist = _fab_run(model, x[idx], y[idx], order[idx, rank], norm, steps)
            if searches is not None:
                store = rows[idx]
                searches.searched[store] = searches.searched[store].clamp_min(rank)
                better = dist < searches.best_norm[store]
                searches.best[store[better]] = x_adv[better]
                searches.best_norm[store[better]] = dist[better]
            fooled = dist <= within
            out[idx[fooled]] = x_adv[fooled]
            robust[idx[fooled]] = False
    return out
