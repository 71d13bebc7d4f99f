"""Certified accuracy by randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), is certified at x by
CERTIFY (their Algorithm 1):

1. draw n0 noisy copies of x and take the class c_A that f predicts most often (selection);
2. draw n further copies and count n_A, how often f predicts c_A (estimation);
3. p_A = the one-sided (1 − α) Clopper-Pearson lower confidence bound on P(f(x + ε) = c_A),
   i.e. the α quantile of Beta(n_A, n − n_A + 1);
4. if p_A > 1/2, predict c_A with certified l2 radius R = σ·Φ⁻¹(p_A); otherwise abstain.

The certified accuracy at radius r is the fraction of examples that are predicted correctly and not
abstained on, with R ≥ r. Here f is the trained classifier (the backbone and its linear head), used
as it is: it is not trained under noise as in Cohen et al., so its certified accuracy is a measure
of how smooth the learned representation already is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats

ABSTAIN = -1


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper-Pearson lower bound on a binomial proportion from n_a of n."""
    if not 0 <= n_a <= n or n <= 0:
        raise ValueError(f"need 0 <= n_a <= n and n > 0, got n_a={n_a}, n={n}")
    if n_a == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, n_a, n - n_a + 1))


def certified_radius(n_a: int, n: int, alpha: float, sigma: float) -> float | None:
    """σ·Φ⁻¹(p_A) with p_A the Clopper-Pearson lower bound; None (abstain) when p_A ≤ 1/2."""
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a <= 0.5:
        return None
    return float(sigma * stats.norm.ppf(p_a))


@torch.no_grad()
def _class_counts(model, x: torch.Tensor, num: int, sigma: float, num_classes: int,
                  generator: torch.Generator, batch_size: int) -> torch.Tensor:
    """(N, classes) counts of the base classifier's predictions on `num` noisy copies of each x."""
    counts = torch.zeros(len(x), num_classes, dtype=torch.long, device=x.device)
    per_batch = max(1, batch_size // max(num, 1))  # images per forward pass (num copies each)
    for i in range(0, len(x), per_batch):
        chunk = x[i : i + per_batch]
        remaining = num
        while remaining > 0:
            k = min(remaining, max(1, batch_size // len(chunk)))
            noisy = chunk.repeat_interleave(k, dim=0)
            noisy = noisy + sigma * torch.randn(noisy.shape, device=x.device, generator=generator)
            pred = model(noisy).argmax(1).view(len(chunk), k)
            counts[i : i + len(chunk)] += torch.nn.functional.one_hot(pred, num_classes).sum(1)
            remaining -= k
    return counts


@dataclass
class Certificate:
    prediction: torch.Tensor  # (N,) the smoothed prediction, ABSTAIN (−1) where it abstains
    radius: torch.Tensor  # (N,) certified l2 radius, NaN where it abstains


@torch.no_grad()
def certify(model, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float = 0.001,
            batch_size: int = 1000, seed: int = 0) -> Certificate:
    """CERTIFY for every image of x (in the model's eval mode); deterministic for a seed."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if n0 < 1 or n < 1:
        raise ValueError(f"need n0 >= 1 and n >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
        num_classes = model(x[:1]).shape[1]
        selection = _class_counts(model, x, n0, sigma, num_classes, generator, batch_size)
        c_a = selection.argmax(1)
        estimation = _class_counts(model, x, n, sigma, num_classes, generator, batch_size)
        n_a = estimation.gather(1, c_a[:, None]).squeeze(1).tolist()
    finally:
        model.train(was_training)
    prediction, radius = [], []
    for c, count in zip(c_a.tolist(), n_a):
        r = certified_radius(int(count), n, alpha, sigma)
        prediction.append(ABSTAIN if r is None else c)
        radius.append(float("nan") if r is None else r)
    return Certificate(torch.tensor(prediction), torch.tensor(radius, dtype=torch.float64))


def certified_accuracy(certificate: Certificate, y: torch.Tensor, radii) -> dict[float, float]:
    """Fraction of examples predicted correctly (not abstained) with certified radius ≥ r, per r."""
    y = y.detach().cpu()
    correct = (certificate.prediction == y) & (certificate.prediction != ABSTAIN)
    out = {}
    for r in radii:
        # NaN radii (abstentions) compare False; they are not correct anyway
        out[float(r)] = float((correct & (certificate.radius >= float(r))).double().mean())
    return out
