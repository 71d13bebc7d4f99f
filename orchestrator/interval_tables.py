"""Robust accuracy per cell and its paired difference to λ = 0, each with the 95% interval of
orchestrator.intervals (over seeds and test examples where the rows carry per-example
correctness, else over seeds): the long tables the end-of-run text and the report both show."""
from __future__ import annotations

import json

import pandas as pd

from .result_schema import row_kinds
from .intervals import BOOTSTRAP_SOURCES, Interval, accuracy_interval, difference_interval, interval_legend, mixed, table_cell


def training_norm_robustness(table):
    """The robustness rows (trainables.records, undefended) of each trial's training norm, a copy."""
    from trainables.records import ROBUSTNESS

    return table[(row_kinds(table) == ROBUSTNESS) & (table["norm"] == table["norm_train"])].copy()


def with_factors(rows, names: list[str]):
    """`rows` with a column `factor.NAME` per name: its value in the row's config, as JSON text."""
    configs = rows["config_json"].map(json.loads)
    for name in names:
        rows[f"factor.{name}"] = configs.map(lambda c, n=name: json.dumps(c.get(n)))
    return rows


def factor_groups(rows, names: list[str]):
    """(factor values, rows) per combination of the named factors (one group of all when none)."""
    if not names:
        yield (), rows
        return
    for key, group in rows.groupby([f"factor.{n}" for n in names], sort=True):
        yield tuple(json.loads(k) for k in (key if isinstance(key, tuple) else (key,))), group


def robustness_intervals(table, factor_names: list[str]) -> pd.DataFrame:
    """Robust accuracy of every cell of the factors × ε_test (robustness rows in each trial's
    training norm), a row each: the factors, `seeds`, `eps_test` and its `interval`
    (orchestrator.intervals.accuracy_interval: over seeds and test examples where the rows carry
    per-example correctness, else the t-interval over seeds)."""
    columns = [*factor_names, "seeds", "eps_test", "interval"]
    adv = training_norm_robustness(table) if not table.empty else table
    if adv.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for values, group in factor_groups(with_factors(adv, factor_names), factor_names):
        seeds = group["seed"].nunique()
        for eps, at in group.groupby("eps_test", sort=True):
            out.append((*values, seeds, float(eps), accuracy_interval(at)))
    return pd.DataFrame(out, columns=columns)


def difference_intervals(table, others: list[str]) -> pd.DataFrame:
    """Per λ (ssl_weight) > 0 and ε_test, robust accuracy minus that of λ = 0 in the same `others`
    factors (orchestrator.intervals.difference_interval: paired on seeds and test examples), a row
    each: the others, `λ`, `eps_test`, `interval`. Empty without a λ = 0 cell."""
    columns = [*others, "λ", "eps_test", "interval"]
    adv = training_norm_robustness(table) if not table.empty else table
    out = []
    for values, group in (factor_groups(with_factors(adv, others), others) if not adv.empty else ()):
        base = group[group["ssl_weight"] == 0.0]
        if base.empty:
            continue
        for lam in sorted(set(group["ssl_weight"]) - {0.0}):
            cell = group[group["ssl_weight"] == lam]
            for eps in sorted(set(cell["eps_test"]) | set(base["eps_test"])):
                interval = difference_interval(cell[cell["eps_test"] == eps], base[base["eps_test"] == eps])
                out.append((*values, float(lam), float(eps), interval))
    return pd.DataFrame(out, columns=columns)


def wide_table(long: pd.DataFrame, keys: list[str], signed: bool = False) -> tuple[list[list], list]:
    """A line per `keys` combination, a column per ε_test (`ε=…`) of the formatted interval;
    returns (header + lines, the intervals shown)."""
    intervals = list(long["interval"])
    mark = mixed(intervals)
    eps_values = sorted(set(long["eps_test"]))
    lines: list[list] = [[*keys, *(f"ε={e:g}" for e in eps_values)]]
    cells: dict[str, tuple[list, dict]] = {}  # keyed by JSON text: factor values may be lists or dicts
    for row in long.to_dict("records"):
        values = [row[k] for k in keys]
        cells.setdefault(json.dumps(values, sort_keys=True, default=str), (values, {}))[1][row["eps_test"]] = \
            row["interval"]
    for _, (values, by_eps) in sorted(cells.items()):
        lines.append(values + [table_cell(by_eps[e], mark, signed) if e in by_eps else "–" for e in eps_values])
    return lines, intervals


def interval_report_tables(table, factor_names: list[str]) -> list[tuple]:
    """The report's two interval tables, as (name, title, caption, long table for CSV, display):
    robust accuracy per cell × ε_test and the paired differences to λ = 0, over seeds and test
    examples (the same numbers as the end-of-run table)."""
    def csv(long: pd.DataFrame) -> pd.DataFrame:
        out = long.drop(columns="interval")
        for field in ("mean", "low", "high", "n_examples", "sources"):
            out[field] = [getattr(i, field) if i is not None else None for i in long["interval"]]
        return out

    def display(keys: list[str], signed: bool):
        def show(out: pd.DataFrame) -> pd.DataFrame:
            intervals = [None if m != m else Interval(m, lo, hi, 0, n, src) for m, lo, hi, n, src in
                         zip(out["mean"], out["low"], out["high"], out["n_examples"], out["sources"])]
            lines, _ = wide_table(out.assign(interval=intervals), keys, signed)
            return pd.DataFrame(lines[1:], columns=lines[0])
        return show

    tables = []
    absolute = robustness_intervals(table, factor_names)
    if not absolute.empty:
        tables.append((
            "accuracy_intervals", "Robust accuracy with intervals over seeds and test examples",
            "Robust accuracy per cell against ε_test (each trial's training norm; ε_test = 0: clean accuracy). "
            + interval_legend(list(absolute["interval"])) + ". Every trial is evaluated on the same test images, "
            "so an interval over seeds alone holds the test set fixed"
            + ("; the bootstrap also resamples the test images." if any(
                i is not None and i.sources in BOOTSTRAP_SOURCES for i in absolute["interval"]) else "."),
            csv(absolute), display([*factor_names, "seeds"], False)))
    others = [f for f in factor_names if f != "ssl_weight"]
    if "ssl_weight" in factor_names:
        diff = difference_intervals(table, others)
        if not diff.empty:
            tables.append((
                "difference_intervals", "Paired difference to λ = 0 over seeds and test examples",
                "Robust accuracy minus that of λ = 0 in the same other factors, per ε_test: "
                + interval_legend(list(diff["interval"]), paired=True) + ". A difference whose interval "
                "excludes zero separates that λ from λ = 0 at 95%.",
                csv(diff), display([*others, "λ"], True)))
    return tables
