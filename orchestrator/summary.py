"""The end of a study invocation: the report, its MLflow artifacts, and what the user reads last."""
from __future__ import annotations

import sys

from trainables.records import OOD

from . import results
from .result_schema import row_kinds
from .errors import UserError
from .interval_tables import difference_intervals, factor_groups, robustness_intervals, wide_table, with_factors
from .intervals import interval_legend
from .tracking_problem import Scope, TrackingProblem


def mean_ci_cell(mean: float, half: float, n: int) -> str:
    """'mean±half' (95% CI), just the mean for one seed, '–' for no value."""
    return "–" if n == 0 else f"{mean:.3f}" if half != half else f"{mean:.3f}±{half:.3f}"


def render_columns(lines: list[list]) -> str:
    """Right-aligned text columns, a rule under the header line."""
    lines = [[str(cell) for cell in line] for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rendered = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


def robustness_table(spec, table) -> str:
    """Robust accuracy against ε_test, a row per cell of the factors, each with its 95% interval
    (over seeds and test examples where the results carry them), then a line saying which interval."""
    if table.empty:
        return "(no results yet)"
    factor_names = [f for f in spec.factors if f != "seed"] or ["ssl_weight"]
    long = robustness_intervals(table, factor_names)
    if long.empty:
        return "(no adversarial results)"
    lines, intervals = wide_table(long, [*factor_names, "seeds"])
    return render_columns(lines) + "\n" + interval_legend(intervals)


def paired_difference_text(spec, table) -> str | None:
    """Per λ (ssl_weight) and ε_test, robust accuracy minus that of λ = 0 in the same other factors,
    paired on seeds and test examples (`difference_intervals`), then in words which differences
    exclude zero. None when the study does not vary λ or has no λ = 0 cell."""
    if "ssl_weight" not in spec.varying() or table.empty:
        return None
    others = [f for f in spec.factors if f not in ("seed", "ssl_weight") and len(spec.factors[f]) > 1]
    long = difference_intervals(table, others)
    if long.empty:
        return None
    long["λ"] = long["λ"].map(lambda lam: f"{lam:g} − 0")
    lines, intervals = wide_table(long, [*others, "λ"], signed=True)
    separated = []
    for row in long.itertuples(index=False):
        interval = row.interval
        if interval is None or interval.direction() not in ("higher", "lower"):
            continue
        values = dict(zip(others, row[: len(others)]))
        where = ", ".join(f"{o}={v}" for o, v in values.items())
        separated.append(f"λ={row.λ.split(' ')[0]} vs 0 at ε={row.eps_test:g}{' (' + where + ')' if where else ''}: "
                         f"{interval.direction()}, {interval.mean:+.3f} "
                         f"[{interval.low:+.3f}, {interval.high:+.3f}]")
    legend = interval_legend(intervals, paired=True)
    words = ("differences that exclude zero (95%): " + "; ".join(separated)) if separated else \
        "no difference to λ = 0 excludes zero at 95%: the data do not separate these λ"
    return render_columns(lines) + "\n" + legend + "\n" + words


def defence_text(table) -> str | None:
    """Accuracy against ε_test behind a test-time defence, per trained model × defence × attack
    (plain / adaptive); None when the study has no defended rows."""
    from .report.statistics import defence_table

    agg = defence_table(table)
    if agg.empty:
        return None
    eps_values = sorted(agg["eps_test"].unique())
    lines = [["model", "defence", "attack", "norm", *(f"ε={e:g}" for e in eps_values)]]
    for key, group in agg.groupby(["model", "defence", "attack", "norm"], sort=True):
        row = list(key)
        for eps in eps_values:
            sel = group[group["eps_test"] == eps]
            if sel.empty:
                row.append("–")
                continue
            mean, half = float(sel["mean"].iloc[0]), float(sel["ci95"].iloc[0])
            row.append(mean_ci_cell(mean, half, 1))
        lines.append(row)
    return render_columns(lines)


def ood_auroc_table(spec, table) -> str | None:
    """OOD-detection AUROC (mean ± 95% CI over seeds) per cell of the factors, a column per OOD
    set × score; None when the study has no OOD rows."""
    from .report.statistics import mean_ci

    if table.empty:
        return None
    rows = table[(row_kinds(table) == OOD) & (table["measure"] == "auroc")].copy()
    if rows.empty:
        return None
    factor_names = [f for f in spec.factors if f != "seed"] or ["ssl_weight"]
    columns = sorted({(s, sc) for s, sc in zip(rows["ood_set"], rows["score"])})
    header = [*factor_names, "seeds", *(f"{s}/{sc}" for s, sc in columns)]
    lines = [header]
    for values, group in factor_groups(with_factors(rows, factor_names), factor_names):
        line = [*values, str(group["seed"].nunique())]
        for ood_set, score in columns:
            values = group[(group["ood_set"] == ood_set) & (group["score"] == score)]["value"]
            mean, half, n = mean_ci(values)
            line.append(mean_ci_cell(mean, half, n))
        lines.append(line)
    return render_columns(lines)


def record_grid(spec, trials, storage, replication: list[str] | None = None) -> None:
    """The invocation's grid beside the results (`results.write_grid`): `python -m orchestrator.report`
    rebuilds the report this invocation ends with, missing cells (and adaptive replication's seeds
    per cell) included."""
    results.write_grid(storage, spec.name, spec.scale, spec.text,
                       {t.config_hash: t.config for t in trials} if spec.search is None else None,
                       grid_aliases(trials), replication)


def grid_aliases(trials) -> dict[str, list[dict]]:
    """Config hash -> the configs of the grid's other names for that experiment (spec.Trial.aliases)."""
    return {t.config_hash: t.aliases for t in trials if t.aliases}


def tracking_problem_lines(problems: list[TrackingProblem], study: str, storage: str, tracking_uri: str) -> list[str]:
    """What the end of a study says about MLflow tracking failures: how many trials (and whether
    the parent run) lost tracking, the --backfill-tracking command, then each failure."""
    if not problems:
        return []
    # a failed background job is counted with the trials: the writer runs the trials' writes
    trials_lost = sum(p.scope is not Scope.PARENT for p in problems)
    parent_lost = " and the study's parent run" if trials_lost < len(problems) else ""
    return [f"MLflow tracking failed for {trials_lost} trial(s){parent_lost}; their results are in "
            f"Parquet. Log them to MLflow once the server is back with:",
            f"  python -m orchestrator.study {study} --backfill-tracking --storage {storage} "
            f"--tracking-uri {tracking_uri}",
            *(f"  {p}" for p in problems)]


def finish_study(spec, storage, tracking_uri, trials, outcome, out=sys.stdout, log_report=None) -> str | None:
    """Write the report, log it with ``log_report(paths, artifact_path)`` (returns an error line or
    None; None: not logged), print the robustness tables and where everything is."""
    from .report.build import build_report

    record_grid(spec, trials, storage)
    table = results.load(spec.name, storage)
    report_path = None
    try:
        files = build_report(spec.name, storage, spec_text=spec.text,
                             expected_hashes={t.config_hash: t.config for t in trials} or None, table=table,
                             aliases=grid_aliases(trials))
        report_path = str(files.html)
    except UserError as err:
        print(f"report not written: {err}", file=out)
    if report_path and log_report is not None:
        error = log_report([str(p) for p in (files.html, *files.figures, *files.tables)], "report")
        if error:
            print(f"the report is on disk but could not be logged to MLflow: {error}", file=out)
    print("", file=out)
    print(f"robust accuracy against ε_test ({spec.name}):", file=out)
    shown = results.with_aliases(results.own_evaluation(table), grid_aliases(trials))
    print(robustness_table(spec, shown), file=out)
    differences = paired_difference_text(spec, shown)
    if differences:
        print(f"\npaired difference to λ = 0 ({spec.name}; robust accuracy):", file=out)
        print(differences, file=out)
    print("", file=out)
    defended = defence_text(results.own_evaluation(table))
    if defended is not None:
        print(f"accuracy behind the test-time defence ({spec.name}; plain PGD vs adaptive PGD; mean ± 95% CI):",
              file=out)
        print(defended, file=out)
        print("", file=out)
    ood_text = ood_auroc_table(spec, results.own_evaluation(table))
    if ood_text:
        print(f"OOD detection AUROC ({spec.name}; set/score; in-distribution test images vs the set; "
              f"mean ± 95% CI over seeds):", file=out)
        print(ood_text, file=out)
        print("", file=out)
    print(f"trials run now: {outcome.ran}, skipped (results existed): {outcome.skipped}, "
          f"failed: {len(outcome.failed)}", file=out)
    for failure in outcome.failed:
        print(f"  failed: {failure}", file=out)
    for line in getattr(outcome, "nan_objectives", []):
        print(f"  {line}", file=out)
    present = set(table["config_hash"]) if len(table) else set()
    missing = [t for t in trials if t.config_hash not in present]
    outcome.missing = [t.config_hash for t in missing]
    if missing:
        varying = spec.varying()
        print(f"cells of the grid without a result: {len(missing)} of {len(trials)} (run the study again, "
              f"without --resume, to run them):", file=out)
        for t in missing:
            values = ", ".join(f"{k}={t.factors[k]}" for k in varying) or "(single cell)"
            print(f"  {t.config_hash}  {values}", file=out)
    for line in tracking_problem_lines(outcome.tracking_errors, spec.name, storage, tracking_uri):
        print(line, file=out)
    print(f"results:  {results.study_dir(storage, spec.name)}  (orchestrator.results.load('{spec.name}', "
          f"'{storage}'))", file=out)
    if report_path:
        print(f"report:   {report_path}", file=out)
    from .tracking_uri import trials_view_url

    experiment = getattr(outcome, "experiment_id", None)
    if tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow:   {trials_view_url(tracking_uri, experiment) if experiment else tracking_uri}", file=out)
    else:
        print(f"MLflow:   mlflow ui --backend-store-uri {tracking_uri}  (then open "
              f"{trials_view_url('http://127.0.0.1:5000', experiment) if experiment else 'http://127.0.0.1:5000'})",
              file=out)
    return report_path
