"""Confidence intervals for accuracies measured over training seeds × test examples.

Every trial of a study evaluates the same fixed test images, so an accuracy has two sources of
uncertainty: which seeds were trained (a new seed gives another model) and which test images were
drawn (a new draw of the test set gives another estimate). An interval over seeds alone holds the
test set fixed and reads as more certain than it is; an interval over examples alone ignores the
seed-to-seed spread. Both sources are crossed here (every seed sees every example), and resampled
together by the pigeonhole bootstrap (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat.
1(2): seeds and examples resampled independently, the statistic recomputed on the crossed
sub-matrix). It is mildly conservative: the residual seed × example variance is counted about
twice (Owen 2007, section 3), against the seeds-only or examples-only intervals, which miss a
whole component.

Comparisons between two cells are paired: the same seeds and the same test examples, so the
difference matrix D[s, e] = a[s, e] − b[s, e] cancels what the two cells share (an image hard for
both, a seed good for both), which is where the power of a comparison is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_REPLICATES = 2000


@dataclass(frozen=True)
class Interval:
    """A mean with a (1 − α) percentile interval [low, high]; `sources` says what was resampled
    ("seeds × examples", "examples" with one seed)."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_examples: int
    sources: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def crossed_bootstrap(matrix: np.ndarray, alpha: float = 0.05, replicates: int = DEFAULT_REPLICATES,
                      seed: int = 0) -> Interval:
    """The mean of a (seeds, examples) matrix with its pigeonhole-bootstrap percentile interval.

    `matrix[s, e]`: the measure of seed s on test example e (1/0 for correct/fooled, or a paired
    difference of two such). Rows (seeds) and columns (examples) are resampled independently with
    replacement, `replicates` times (seeded: the same data give the same interval). With one seed
    only examples are resampled. Raises ValueError for an empty matrix or one with NaN."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"expected a non-empty (seeds, examples) matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the (seeds, examples) matrix has NaN or infinite entries")
    n_seeds, n_examples = m.shape
    rng = np.random.default_rng(seed)
    # Example resampling as multinomial counts: one (replicates, examples) matrix product instead
    # of gathering a resampled copy of the matrix per replicate.
    counts = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=replicates)
    per_seed = m @ counts.T / n_examples  # (seeds, replicates): each seed's mean on the resampled examples
    if n_seeds > 1:
        rows = rng.integers(0, n_seeds, size=(replicates, n_seeds))
        stats = per_seed[rows, np.arange(replicates)[:, None]].mean(axis=1)
        sources = "seeds × examples"
    else:
        stats = per_seed[0]
        sources = "examples"
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(m.mean()), float(low), float(high), n_seeds, n_examples, sources)


def paired_difference(a: dict[int, np.ndarray], b: dict[int, np.ndarray], alpha: float = 0.05,
                      replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> Interval | None:
    """Mean of a − b with its interval, paired on the seeds both cells have and on the examples.

    `a`, `b`: seed → per-example vector (the same test examples in the same order). None when the
    cells share no seed. Raises ValueError when the vectors of a shared seed differ in length."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    lengths = {len(a[s]) for s in common} | {len(b[s]) for s in common}
    if len(lengths) != 1:
        raise ValueError(f"paired cells must be evaluated on the same test examples; lengths {sorted(lengths)}")
    diff = np.stack([np.asarray(a[s], dtype=float) - np.asarray(b[s], dtype=float) for s in common])
    return crossed_bootstrap(diff, alpha, replicates, seed)


def format_interval(interval: Interval | None) -> str:
    """'0.554 [0.531, 0.577]', or '–' when there is none."""
    if interval is None or math.isnan(interval.mean):
        return "–"
    return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
