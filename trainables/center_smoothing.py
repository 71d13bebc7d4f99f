"""Certified robustness of a representation by center smoothing (Kumar and Goldstein, NeurIPS 2021,
"Center Smoothing: Certified Robustness for Networks with Structured Outputs", arXiv 2102.09701;
the authors' code is aounon/center-smoothing, which Petrov and Kwiatkowska use with σ = 0.25).

f maps an input to a vector (here the backbone's representation `model.features`, shape (D,)), and
d is the l2 distance in that space. The smoothed representation f̂(x) is the centre of the smallest
ball that holds at least half of the probability mass of f(x + N), N ~ N(0, σ²I) (§3 of the
paper). Its certificate: for every x' with ‖x' − x‖₂ ≤ ε, d(f̂(x), f̂(x')) ≤ (1 + β)·R, where R is
the radius of the ball around f̂(x) that holds p⁺(ε) = Φ(Φ⁻¹(1/2 + Δ) + ε/σ) of the mass at x
and β the approximation factor of the centre. Why: by the Gaussian shift bound (Cohen et al.'s
lemma) that ball still holds p⁻ = Φ(Φ⁻¹(p⁺) − ε/σ) = 1/2 + Δ of the mass at x', so it meets the
ball of f̂(x') (which holds ≥ 1/2 − Δ there) and that ball's radius is at most β·R; the triangle
inequality gives the bound (the paper's robustness theorem and its proof in the appendix).

Estimation, per image (the paper's two procedures, computing the smoothed output and certifying
it, Algorithms 1 and 2 of the arXiv version as we read it; the section and algorithm numbers were
not re-checked against the NeurIPS PDF, the constants against the authors' code):

1. centre: n0 samples z_i = f(x + N_i); f̂(x) = z, the sample whose ball B(z, r) holding at least
   half of the samples is smallest (r = the ⌈n0/2⌉-th smallest distance from z to the samples,
   itself included: "the smallest median distance"). That ball is a β = 2 approximation of the
   minimum enclosing ball of half the samples.
2. check on n0 fresh samples (held out from step 1): p̂ = the fraction within B(z, r);
   Δ₁ = √(ln(2/α₁)/(2·n0)), Δ₂ = 1/2 − (p̂ − Δ₁), Δ̂ = max(Δ₁, Δ₂). Abstain unless Δ̂ ≤ Δ.
3. certify on n fresh samples, for each ε: q = p⁺(ε) + √(ln(1/α₂)/(2n)) (Hoeffding); abstain at
   this ε when q > 1; else R̂ = the ⌈q·n⌉-th smallest d(z, f(x + N_j)) and the bound is
   (1 + β)·R̂ = 3·R̂.

The certificate holds with probability at least 1 − α, α = α₁ + α₂ (split evenly here), like
randomized smoothing's. The noisy copies x + σ·N are not clipped to [0, 1] (as in Cohen et al.).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from scipy import stats

BETA = 2.0  # approximation factor of the smallest-median-distance centre (paper: β-MEB, β = 2)


def sampling_error(n0: int, alpha1: float) -> float:
    """Δ₁ = √(ln(2/α₁)/(2·n0)): Hoeffding's deviation for a fraction estimated from n0 samples."""
    return math.sqrt(math.log(2.0 / alpha1) / (2.0 * n0))


def delta_hat(inside: int, n0: int, alpha1: float) -> float:
    """Δ̂ = max(Δ₁, 1/2 − (inside/n0 − Δ₁)): `inside` of n0 held-out samples fell in the centre's
    ball B(z, r); the smoothed output is returned only when Δ̂ ≤ Δ (step 2 of the module doc)."""
    if not 0 <= inside <= n0 or n0 < 1:
        raise ValueError(f"need 0 <= inside <= n0 and n0 >= 1, got inside={inside}, n0={n0}")
    d1 = sampling_error(n0, alpha1)
    return max(d1, 0.5 - (inside / n0 - d1))


def quantile_level(eps: float, sigma: float, delta: float, n: int, alpha2: float) -> float:
    """q = Φ(Φ⁻¹(1/2 + Δ) + ε/σ) + √(ln(1/α₂)/(2n)): the fraction of the n certification samples
    whose distance quantile bounds R (step 3); above 1 the certificate at ε abstains."""
    p_plus = float(stats.norm.cdf(stats.norm.ppf(0.5 + delta) + eps / sigma))
    return p_plus + math.sqrt(math.log(1.0 / alpha2) / (2.0 * n))


@dataclass
class CenterCertificate:
    eps: tuple[float, ...]  # (E,) l2 input radii, pixels in [0, 1]
    center: torch.Tensor  # (N, D) float32: the smoothed representation f̂(x) (returned or not)
    ball_radius: torch.Tensor  # (N,) float64: r, the radius of B(z, r) holding half the centre samples
    delta_hat: torch.Tensor  # (N,) float64: Δ̂ of step 2
    smoothed: torch.Tensor  # (N,) bool: Δ̂ ≤ Δ (the smoothed output is returned)
    bound: torch.Tensor  # (N, E) float64: certified l2 bound in representation space, NaN: abstained

    @property
    def abstained(self) -> torch.Tensor:
        """(N, E) bool: no certificate at that image and ε (step 2 or step 3 abstained)."""
        return torch.isnan(self.bound)


def _noisy_batches(x: torch.Tensor, num: int, sigma: float, generator: torch.Generator,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image index, x[index] + σ·noise) in batches of up to batch_size over the G·num noisy copies
    of x (G images, num copies each, image-major): one noise draw and one forward pass per batch."""
    total = len(x) * num
    for start in range(0, total, batch_size):
        index = torch.arange(start, min(start + batch_size, total), device=x.device) // num
        clean = x[index]
        noisy = torch.randn(clean.shape, device=x.device, dtype=clean.dtype, generator=generator)
        yield index, noisy.mul_(sigma).add_(clean)


def noisy_features(features: Callable, x: torch.Tensor, num: int, sigma: float,
                   generator: torch.Generator, batch_size: int) -> torch.Tensor:
    """(G, num, D): f of num noisy copies of each of the G images of x, in batches of batch_size."""
    out = [features(noisy).float().flatten(1) for _, noisy in _noisy_batches(x, num, sigma, generator, batch_size)]
    return torch.cat(out).view(len(x), num, -1)


def _noisy_distances(features: Callable, x: torch.Tensor, centers: torch.Tensor, num: int, sigma: float,
                     generator: torch.Generator, batch_size: int) -> torch.Tensor:
    """(G, num) float64: ‖f(x_g + σN) − centers_g‖ for num noisy copies of each image (features
    are not kept, so num may be large)."""
    out = []
    for index, noisy in _noisy_batches(x, num, sigma, generator, batch_size):
        z = features(noisy).float().flatten(1)
        out.append((z - centers[index]).double().norm(dim=1))
    return torch.cat(out).view(len(x), num)


def median_center(samples: torch.Tensor, row_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For samples (G, m, D): the sample of each group whose ball holding ⌈m/2⌉ of the samples
    (itself included) is smallest, and that ball's radius: ((G, D), (G,) float64)."""
    m = samples.shape[1]
    k = (m + 1) // 2
    centers, radii = [], []
    for z in samples:
        # distances are translation invariant; centring keeps cdist's matrix-product form accurate
        z = z - z.mean(0, keepdim=True)
        medians = torch.cat([torch.cdist(z[i : i + row_chunk], z).kthvalue(k, dim=1).values
                             for i in range(0, m, row_chunk)])
        best = int(medians.argmin())
        centers.append(best)
        radii.append(float(medians[best]))
    index = torch.tensor(centers, device=samples.device)
    center = samples[torch.arange(len(samples), device=samples.device), index]
    return center, torch.tensor(radii, dtype=torch.float64)


@torch.no_grad()
def center_certify(features: Callable, x: torch.Tensor, *, sigma: float, eps, n0: int, n: int,
                   alpha: float = 0.01, delta: float = 0.05, batch_size: int = 1000,
                   seed: int = 0) -> CenterCertificate:
    """Center smoothing of `features` at every image of x (N, ...), pixels in [0, 1], certified at
    each l2 input radius in `eps`; the bound is in the units of the representation (l2 distance).

    features: a function from a batch (B, ...) to (B, D) (or (B, ...), flattened), e.g. the
    backbone of a model in eval mode. sigma: noise σ (pixels). n0: samples for the centre and again
    for its check; n: samples for the certificate. alpha: total failure probability (α₁ = α₂ = α/2).
    delta: the paper's Δ, in (0, 1/2). Images go through `features` in batches of batch_size
    noisy copies (several images per batch when the copies of one are fewer). Deterministic for a
    seed. Raises ValueError for σ ≤ 0, n0 or n < 1, α outside (0, 1), Δ outside (0, 1/2) or a
    negative ε.
    """
    eps = tuple(float(e) for e in eps)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if n0 < 1 or n < 1:
        raise ValueError(f"need n0 >= 1 and n >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < delta < 0.5:
        raise ValueError(f"delta must be in (0, 0.5), got {delta}")
    if any(e < 0 for e in eps):
        raise ValueError(f"input radii must be >= 0, got {eps}")
    alpha1 = alpha2 = alpha / 2
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    levels = [quantile_level(e, sigma, delta, n, alpha2) for e in eps]
    group = max(1, batch_size // max(n0, 1))  # images whose centre samples are held at once
    centers, radii, deltas, bounds = [], [], [], []
    for i in range(0, len(x), group):
        xg = x[i : i + group]
        center, radius = median_center(noisy_features(features, xg, n0, sigma, generator, batch_size))
        held_out = _noisy_distances(features, xg, center, n0, sigma, generator, batch_size)
        inside = (held_out <= radius.to(held_out.device)[:, None]).sum(1).tolist()
        d_hat = torch.tensor([delta_hat(int(k), n0, alpha1) for k in inside], dtype=torch.float64)
        dist = _noisy_distances(features, xg, center, n, sigma, generator, batch_size).sort(dim=1).values.cpu()
        bound = torch.full((len(xg), len(eps)), math.nan, dtype=torch.float64)
        for j, q in enumerate(levels):
            if q <= 1:
                k = min(n, max(1, math.ceil(q * n)))
                bound[:, j] = (1 + BETA) * dist[:, k - 1]
        bound[d_hat > delta] = math.nan
        centers.append(center.cpu())
        radii.append(radius)
        deltas.append(d_hat)
        bounds.append(bound)
    d_hat = torch.cat(deltas)
    return CenterCertificate(eps, torch.cat(centers), torch.cat(radii), d_hat, d_hat <= delta, torch.cat(bounds))


def summarise(certificate: CenterCertificate, scale: float) -> dict[float, dict[str, float]]:
    """Per ε: the mean certified bound over the images certified at ε (l2, and divided by `scale`,
    e.g. the median distance between clean representations of distinct images), and the fraction
    of images abstained on. The bound keys are missing where every image abstained."""
    if not scale > 0:
        raise ValueError(f"the normalising distance must be > 0, got {scale}")
    out = {}
    for j, e in enumerate(certificate.eps):
        column = certificate.bound[:, j]
        kept = column[~torch.isnan(column)]
        row = {"abstain_rate": float(torch.isnan(column).double().mean())}
        if len(kept):
            row["bound"] = float(kept.mean())
            row["bound_normalized"] = float(kept.mean()) / scale
        out[e] = row
    return out
