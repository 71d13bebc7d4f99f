"""Adaptive replication: more seeds only where the interval still needs them.

A study file may give `seeds: {min: 3, max: 8, until_ci: 0.02}` instead of a list. The grid first
runs seeds 0..min−1 in every cell; then, round after round, each cell whose 95% interval of the key
measure (`measure`, by default robust accuracy at ε_train; half-width of the t-interval over seeds)
is still wider than `until_ci` gets one more seed, until its interval is narrow enough or it has
`max` seeds. Each new seed is the next integer after the cell's highest, so a re-run never repeats
a seed, and a re-run of the study picks up the seeds earlier runs added.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

from . import results
from .errors import UserError
from .spec import StudySpec, cell_key, config_hash


@dataclass(frozen=True)
class CellDecision:
    """What adaptive replication decided for one cell after the last round."""

    cell: str  # spec.cell_key
    seeds: int  # seeds with a result
    mean: float
    half_width: float  # of the 95% t-interval over seeds; NaN with fewer than two
    next_seed: int | None  # the seed to run next, None when the cell is done
    reason: str


def _cells(spec: StudySpec) -> list[str]:
    names = list(spec.factors)
    return [cell_key(dict(zip(names, values))) for values in itertools.product(*(spec.factors[n] for n in names))]


def seeds_with_results(spec: StudySpec, storage: str) -> dict[str, list[int]]:
    """Cell -> seeds beyond the spec's own that already have a result (added by earlier runs)."""
    import json

    done = results.completed_hashes(storage, spec.name)
    table = results.own_evaluation(results.load(spec.name, storage)) if done else None
    if table is None or table.empty:
        return {}
    seeds = sorted({int(s) for s in table["seed"].unique()} - set(spec.seeds))
    extra: dict[str, list[int]] = {}
    for cell in _cells(spec):
        factors = json.loads(cell)
        for seed in seeds:
            if config_hash({**spec.fixed, **factors, "seed": seed}) in done:
                extra.setdefault(cell, []).append(seed)
    return extra


def measure_by_cell(spec: StudySpec, table) -> dict[str, dict[int, float]]:
    """Cell -> seed -> the replication measure of that trial (summary_metrics of its own rows)."""
    from .metrics import summary_metrics

    cell_of = {t.config_hash: (cell_key(t.factors), t.factors["seed"], t.config) for t in spec.trials()}
    out: dict[str, dict[int, float]] = {}
    for chash, rows in table.groupby("config_hash"):
        if chash not in cell_of:
            continue
        cell, seed, config = cell_of[chash]
        records = rows.astype(object).where(rows.notna(), None).to_dict("records")
        value = summary_metrics(config, records)[spec.replication.measure]
        if value == value:  # NaN: the measure is undefined for this trial
            out.setdefault(cell, {})[seed] = float(value)
    return out


def decide(spec: StudySpec, table) -> list[CellDecision]:
    """One round's decision for every cell of the grid (the table: the study's own rows)."""
    from .report.statistics import mean_ci

    rep = spec.replication
    values = measure_by_cell(spec, table)
    decisions = []
    for cell in _cells(spec):
        by_seed = values.get(cell, {})
        mean, half, n = mean_ci(by_seed.values())
        planned = set(spec.seeds) | set(spec.extra_seeds.get(cell, []))
        next_seed = max(planned | set(by_seed)) + 1
        if n < min(rep.min, len(planned)):
            decision = (None, f"{len(planned) - n} of its trials have no {rep.measure} (failed or undefined)")
        elif n >= rep.max:
            decision = (None, f"max seeds ({rep.max}) reached")
        elif n >= 2 and half <= rep.until_ci:
            decision = (None, f"interval ±{half:.3f} ≤ until_ci {rep.until_ci:g}")
        else:
            width = "undefined (one seed)" if math.isnan(half) else f"±{half:.3f}"
            decision = (next_seed, f"interval {width} > until_ci {rep.until_ci:g}")
        decisions.append(CellDecision(cell, n, mean, half, *decision))
    return decisions


def describe(decisions: list[CellDecision], rep) -> list[str]:
    """One line per cell: its seeds, interval and why it stopped."""
    lines = [f"seeds per cell (adaptive replication of {rep.measure}: min {rep.min}, max {rep.max}, "
             f"until_ci {rep.until_ci:g}):"]
    for d in decisions:
        interval = "–" if math.isnan(d.half_width) else f"{d.mean:.3f} ± {d.half_width:.3f}"
        lines.append(f"  {d.cell}: {d.seeds} seed(s), {interval}; {d.reason}")
    return lines


def run_replicated(spec: StudySpec, options, out=sys.stdout):
    """Run the grid with adaptive replication (`spec.replication`); returns the last round's
    StudyOutcome. Rounds stop when no cell needs another seed, or when a round had failures."""
    from .report.build import build_report
    from .runner import run_study
    from .summary import record_grid

    spec.extra_seeds = seeds_with_results(spec, options.storage)
    round_number = 1
    while True:
        outcome = run_study(spec, options, out=out)
        if options.dry_run:
            return outcome
        table = results.own_evaluation(results.load(spec.name, options.storage))
        decisions = decide(spec, table)
        more = [d for d in decisions if d.next_seed is not None]
        if not more or outcome.failed:
            break
        round_number += 1
        print(f"\nadaptive replication, round {round_number}: one more seed for {len(more)} of "
              f"{len(decisions)} cell(s) whose interval is wider than {spec.replication.until_ci:g}", file=out)
        for d in more:
            spec.extra_seeds.setdefault(d.cell, []).append(d.next_seed)
    lines = describe(decisions, spec.replication)
    print("\n" + "\n".join(lines), file=out)
    # the report says how many seeds each cell got and why (rebuilt from the grid record)
    record_grid(spec, spec.trials(), options.storage, replication=lines)
    try:
        build_report(spec.name, options.storage)
    except UserError as err:
        print(f"report not updated with the seeds per cell: {err}", file=out)
    return outcome
