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

Results without per-example correctness (files written before the `correct` column, or rows that
have none) fall back to Student's t-interval over seeds, and say so (`Interval.sources` "seeds").

Comparisons between two cells are paired: the same seeds and the same test examples, so the
difference matrix D[s, e] = a[s, e] − b[s, e] cancels what the two cells share (an image hard for
both, a seed good for both), which is where the power of a comparison is.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit  # Student t quantiles; scipy.stats costs >1 s to import

from trainables.correct_bits import unpack_correct

DEFAULT_REPLICATES = 2000
BOOTSTRAP_SOURCES = ("seeds × examples", "examples")
T_SOURCES = "seeds"


@dataclass(frozen=True)
class Interval:
    """A mean with a (1 − α) interval [low, high]; `sources` says what it covers: "seeds × examples"
    or "examples" (one seed) for the bootstrap, "seeds" for the t-interval (NaN bounds: one seed)."""

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

    def direction(self) -> str:
        """The verdict on a difference: 'higher' / 'lower' when the interval excludes 0, 'n.s.'
        when it does not, '1 seed' when it has no bounds, '' when there is no difference."""
        if not math.isfinite(self.mean):
            return ""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "1 seed"
        return ("higher" if self.low > 0 else "lower") if self.excludes_zero() else "n.s."


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
    # Each seed's mean on every resampled example set at once: one matrix product with the
    # replicates' example weights, drawn once per (examples, replicates, seed) and shared by every
    # cell of a study (common random numbers), so a study of many cells pays for the draws once.
    per_seed = m.astype(np.float32) @ _example_weights(n_examples, replicates, seed)  # (seeds, replicates)
    if n_seeds > 1:
        stats = (per_seed * _example_weights(n_seeds, replicates, seed + 1)).sum(axis=0)  # seeds resampled too
        sources = "seeds × examples"
    else:
        stats = per_seed[0]
        sources = "examples"
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(m.mean()), float(low), float(high), n_seeds, n_examples, sources)


@functools.lru_cache(maxsize=8)
def _example_weights(n_examples: int, replicates: int, seed: int) -> np.ndarray:
    """(n_examples, replicates) float32, read-only: column r holds how often each example is drawn
    (with replacement, n_examples draws) in replicate r, divided by n_examples. (Seeds are
    resampled the same way, with their own draw.)"""
    rng = np.random.default_rng([seed, n_examples])
    weights = np.empty((n_examples, replicates), dtype=np.float32)
    block = max(1, 2**22 // n_examples)  # replicates per block: the draws stay a few MB
    for start in range(0, replicates, block):
        r = min(block, replicates - start)
        draws = rng.integers(0, n_examples, size=(r, n_examples)) + np.arange(r)[:, None] * n_examples
        counts = np.bincount(draws.ravel(), minlength=r * n_examples).reshape(r, n_examples)
        weights[:, start : start + r] = counts.T / n_examples
    weights.flags.writeable = False
    return weights


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


def t_interval(values, alpha: float = 0.05) -> Interval | None:
    """Mean of per-seed values with Student's t-interval (t_{1−α/2, n−1} · sd / √n); NaN bounds for
    one value, None for none. Non-finite values are left out."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return None
    mean = float(x.mean())
    half = float(stdtrit(len(x) - 1, 1 - alpha / 2) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return Interval(mean, mean - half, mean + half, len(x), 0, T_SOURCES)


def seed_vectors(rows) -> dict[int, np.ndarray] | None:
    """seed -> (N,) per-example correctness (1.0/0.0; the mean over a seed's rows if it has several)
    from the `correct` column of a DataFrame of result rows; None unless every row has it and all
    rows count the same N examples."""
    if rows.empty or "correct" not in rows.columns or rows["correct"].isna().any() \
            or rows["n_examples"].nunique() != 1:
        return None
    n = int(rows["n_examples"].iloc[0])
    vectors: dict[int, list] = {}
    for seed, bits in zip(rows["seed"], rows["correct"]):
        vectors.setdefault(int(seed), []).append(unpack_correct(bits, n))
    return {s: np.mean(v, axis=0) for s, v in vectors.items()}


def accuracy_interval(rows, value: str = "robust_acc", alpha: float = 0.05) -> Interval | None:
    """The accuracy of one cell (a DataFrame of its rows, a row or more per seed): the crossed
    bootstrap over seeds × examples when every row carries `correct`, else the t-interval over the
    seeds' means of `value`."""
    vectors = seed_vectors(rows)
    if vectors:
        return crossed_bootstrap(np.stack([vectors[s] for s in sorted(vectors)]), alpha)
    if rows.empty:
        return None
    return t_interval(rows.groupby("seed")[value].mean(), alpha)


def difference_interval(a_rows, b_rows, value: str = "robust_acc", alpha: float = 0.05) -> Interval | None:
    """a − b of two cells, paired on the seeds both have and, when both carry `correct` for the same
    examples, on the examples too (`paired_difference`); else the t-interval over the seeds'
    differences. None when they share no seed."""
    va, vb = seed_vectors(a_rows), seed_vectors(b_rows)
    if va and vb and len(next(iter(va.values()))) == len(next(iter(vb.values()))):
        return paired_difference(va, vb, alpha)
    if a_rows.empty or b_rows.empty:
        return None
    a, b = a_rows.groupby("seed")[value].mean(), b_rows.groupby("seed")[value].mean()
    common = sorted(set(a.index) & set(b.index))
    return t_interval([a[s] - b[s] for s in common], alpha) if common else None


def format_interval(interval: Interval | None, signed: bool = False) -> str:
    """'0.554 [0.531, 0.577]' ('+0.012 [-0.004, +0.027]' when `signed`), just the mean when the
    bounds are NaN (one seed, no per-example results), '–' when there is none."""
    if interval is None or math.isnan(interval.mean):
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(interval.low):
        return f.format(interval.mean)
    return f"{f.format(interval.mean)} [{f.format(interval.low)}, {f.format(interval.high)}]"


FALLBACK_MARK = "†"  # a t-interval cell in a table whose other cells are bootstrap intervals


def mixed(intervals: list[Interval | None]) -> bool:
    """Whether a table holds both kinds of interval (then its t-interval cells get FALLBACK_MARK)."""
    kinds = {i.sources == T_SOURCES for i in intervals if i is not None}
    return len(kinds) == 2


def table_cell(interval: Interval | None, mark: bool, signed: bool = False) -> str:
    """`format_interval`, with FALLBACK_MARK on a t-interval when `mark` (the table is `mixed`)."""
    text = format_interval(interval, signed)
    return text + FALLBACK_MARK if mark and interval is not None and interval.sources == T_SOURCES else text


def interval_legend(intervals: list[Interval | None], paired: bool = False) -> str:
    """In words, which interval the cells of a table give (the kinds among `intervals`)."""
    kinds = {i.sources for i in intervals if i is not None}
    parts = []
    if kinds & set(BOOTSTRAP_SOURCES):
        parts.append("95% interval over seeds and test examples (two-way bootstrap)"
                     + (", paired over seeds and examples" if paired else "")
                     + ("; 1 seed: over test examples only" if "examples" in kinds else ""))
    if T_SOURCES in kinds:
        t = "95% t-interval over seeds" + (", paired on seeds" if paired else "")
        parts.append(f"{FALLBACK_MARK}: {t}, for cells without per-example results (test examples held fixed)"
                     if parts else f"{t} (no per-example results: test examples held fixed)")
    return "mean [" + "; ".join(parts) + "]" if parts else "no values"
