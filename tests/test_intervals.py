"""orchestrator/intervals.py on constructed data whose variance components are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.intervals import crossed_bootstrap, paired_difference


def crossed_data(rng, seeds, examples, sd_seed, sd_example, sd_residual, mean=0.5):
    """m[s, e] = mean + a_s + b_e + r_se with Gaussian components of the given standard deviations."""
    a = rng.normal(0, sd_seed, (seeds, 1))
    b = rng.normal(0, sd_example, (1, examples))
    return mean + a + b + rng.normal(0, sd_residual, (seeds, examples))


def analytic_se(seeds, examples, sd_seed, sd_example, sd_residual):
    return math.sqrt(sd_seed**2 / seeds + sd_example**2 / examples + sd_residual**2 / (seeds * examples))


@pytest.mark.parametrize("sd_seed, sd_example", [(0.05, 0.0), (0.0, 0.3), (0.03, 0.3)])
def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time(sd_seed, sd_example):
    rng = np.random.default_rng(1)
    seeds, examples, sd_residual = 5, 200, 0.2
    covered, widths = 0, []
    for i in range(150):
        m = crossed_data(rng, seeds, examples, sd_seed, sd_example, sd_residual)
        interval = crossed_bootstrap(m, replicates=400, seed=i)
        covered += interval.low <= 0.5 <= interval.high
        widths.append(interval.half_width)
    assert 0.85 <= covered / 150 <= 1.0
    # the half-width follows the components: ~1.96 standard errors, a little more (residual twice)
    ratio = np.mean(widths) / (1.96 * analytic_se(seeds, examples, sd_seed, sd_example, sd_residual))
    assert 0.75 <= ratio <= 1.6


def test_seed_only_and_example_only_intervals_miss_a_component():
    """With both components present, an interval over seeds alone (the t-interval the report used
    to give) is much narrower than the truth when the example component dominates."""
    rng = np.random.default_rng(2)
    m = crossed_data(rng, 4, 1000, sd_seed=0.005, sd_example=0.45, sd_residual=0.1)
    crossed = crossed_bootstrap(m, replicates=1000)
    seed_means = m.mean(axis=1)
    seeds_only_half = 3.182 * seed_means.std(ddof=1) / 2  # t(3) 97.5% × sd / sqrt(4)
    assert crossed.half_width > 3 * seeds_only_half
    assert crossed.sources == "seeds × examples"


def test_one_seed_resamples_examples_as_a_binomial_interval():
    rng = np.random.default_rng(3)
    correct = (rng.random((1, 1000)) < 0.55).astype(float)
    interval = crossed_bootstrap(correct, replicates=2000)
    p = correct.mean()
    assert interval.sources == "examples"
    assert interval.half_width == pytest.approx(1.96 * math.sqrt(p * (1 - p) / 1000), rel=0.15)


def test_paired_differences_cancel_what_two_cells_share():
    """Two cells with the same hard examples and seed effects, one 3 points better: the paired
    interval excludes zero, although the two cells' own intervals overlap."""
    rng = np.random.default_rng(4)
    seeds, examples = 3, 1000
    difficulty = rng.normal(0, 1.2, examples)
    seed_effect = rng.normal(0, 0.3, seeds)

    def cell(shift):
        logits = 0.2 + shift + difficulty[None, :] + seed_effect[:, None] + rng.normal(0, 0.3, (seeds, examples))
        return (logits > 0).astype(float)

    a, b = cell(0.1), cell(0.0)
    ia, ib = crossed_bootstrap(a), crossed_bootstrap(b)
    assert ia.low < ib.high  # the separate intervals overlap
    diff = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert diff.excludes_zero() and diff.mean == pytest.approx(a.mean() - b.mean())
    assert paired_difference({0: a[0]}, {1: b[1]}) is None
    with pytest.raises(ValueError, match="same test examples"):
        paired_difference({0: a[0]}, {0: b[0][:10]})


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        crossed_bootstrap(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        crossed_bootstrap(np.array([[0.0, np.nan]]))
