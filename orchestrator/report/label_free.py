"""Label-free robustness of the representation (Petrov and Kwiatkowska 2022): attack distances,
breakaway and overlap risk, and the smoothing measures, one table per configuration."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .labels import pm
from .section import Inputs, Section
from .statistics import CURVE_FACTORS, sort_key

LABEL_FREE_MEASURES = ("repr_distance_untargeted", "repr_distance_targeted", "breakaway_risk", "overlap_risk",
                       "smoothing_abstain_rate")
# center smoothing (trainables.center_smoothing): one row per l2 input radius ε, in `radius`
CENTER_SMOOTHING_MEASURES = ("center_smoothing_bound", "center_smoothing_bound_normalized",
                             "center_smoothing_abstain_rate")


def _lf_column(measure: str, radius: Any) -> str:
    """`certified_acc@<r>`, `center_smoothing_bound@<ε>`, ...: a column per radius; else the measure."""
    return str(measure) if _missing_number(radius) else f"{measure}@{float(radius):g}"


def _missing_number(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def label_free_table(agg_lf: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """Per configuration (λ × variant × ...): mean and 95% t-interval over seeds of every label-free
    measure, certified accuracy one column per radius (`certified_acc@<r>`)."""
    if agg_lf.empty:
        return pd.DataFrame(columns=list(train_keys) + ["n_seeds"])
    agg = agg_lf.copy()
    agg["column"] = [_lf_column(m, r) for m, r in zip(agg["measure"], agg["radius"])]
    known = [m for m in LABEL_FREE_MEASURES if m in set(agg["column"])]
    radii = sorted({float(r) for m, r in zip(agg["measure"], agg["radius"]) if m == "certified_acc"})
    columns = known + [_lf_column("certified_acc", r) for r in radii]
    cs_eps = sorted({float(r) for m, r in zip(agg["measure"], agg["radius"]) if m in CENTER_SMOOTHING_MEASURES})
    columns += [c for m in CENTER_SMOOTHING_MEASURES for c in (_lf_column(m, e) for e in cs_eps)
                if c in set(agg["column"])]
    columns += sorted(set(agg["column"]) - set(columns))
    rows = []
    for key, g in agg.groupby(list(train_keys), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = list(key)
        for c in columns:
            r = g[g["column"] == c]
            row += [float(r["mean"].iloc[0]), float(r["ci95"].iloc[0])] if len(r) else [math.nan, math.nan]
        row.append(int(g["n_seeds"].max()))
        rows.append(row)
    cols = list(train_keys) + [f"{c}_{x}" for c in columns for x in ("mean", "ci95")] + ["n_seeds"]
    table = pd.DataFrame(rows, columns=cols)
    order = sorted(range(len(table)), key=lambda i: (
        sort_key(tuple(table.iloc[i][k] for k in train_keys if k not in CURVE_FACTORS)),
        float(table["ssl_weight"].iloc[i]), str(table["ssl_task"].iloc[i])))
    return table.iloc[order].reset_index(drop=True)


def label_free_display(table: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """The label-free table with 'mean ± CI' cells (Markdown and HTML; the CSV keeps the numbers)."""
    shown = table[list(train_keys)].copy()
    measures = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    for m in measures:
        shown[m] = [pm(a, b) for a, b in zip(table[f"{m}_mean"], table[f"{m}_ci95"])]
    shown["n_seeds"] = table["n_seeds"].to_numpy()
    return shown



def table_section(inputs: Inputs) -> Section:
    table = label_free_table(inputs.agg_lf, inputs.train_keys)
    return Section(
        "label_free", "Label-free robustness of the representation",
        "Per configuration (λ × attack variant × ...), mean ± 95% t-interval over seeds (Petrov and "
        "Kwiatkowska): repr_distance_* = ‖f(x̂) − f(x)‖ (untargeted) or ‖f(x̂) − f(x_t)‖ (targeted) over the "
        "median distance of clean pairs; breakaway_risk = fraction of other clean representations closer to "
        "the attacked one than its own; overlap_risk = fraction of pairs, each image attacked toward the "
        "other, where the partner's attack lands closer to an image's clean representation than the image's "
        "own attack (the margin ratio is negative); certified_acc@r = randomized-smoothing certified "
        "accuracy at l2 radius r; smoothing_abstain_rate = fraction of abstentions; "
        "center_smoothing_bound@ε = center smoothing's certified bound on the movement of the smoothed "
        "representation for l2 input radius ε (mean over the images certified at ε; _normalized: over the "
        "median clean-pair distance), center_smoothing_abstain_rate@ε = fraction abstained on.",
        table=table, shown=label_free_display(table, inputs.train_keys) if len(table) else None)
