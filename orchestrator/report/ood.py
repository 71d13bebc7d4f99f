"""Out-of-distribution detection (Hendrycks et al. 2019): AUROC, AUPR and FPR95 of each score per λ
and OOD set, as a table and a figure of AUROC."""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .labels import describe, lam_label, pm, seed_label
from .plotting import Colors, empty_panel, new_figure, suptitle
from .section import Inputs, Section
from .statistics import CURVE_FACTORS, select_rows, sort_key, varying

OOD_MEASURES = ("auroc", "aupr", "fpr95")
_OOD_SET_ORDER = ("gaussian", "rademacher", "blobs", "mnist")
_SCORE_ORDER = ("msp", "rotation")


def _ordered(values: Iterable[Any], preferred: tuple[str, ...]) -> list[Any]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def ood_table(agg_ood: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """Per configuration (λ, ...) × OOD set × score: mean and 95% t-interval over seeds of AUROC,
    AUPR (in-distribution positive) and FPR at 95% TPR."""
    cols = (list(train_keys) + ["ood_set", "score"]
            + [f"{m}_{x}" for m in OOD_MEASURES for x in ("mean", "ci95")] + ["n_seeds"])
    if agg_ood.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in agg_ood.groupby(list(train_keys) + ["ood_set", "score"], dropna=False, sort=True):
        row = list(key)
        for m in OOD_MEASURES:
            r = g[g["measure"] == m]
            row += [float(r["mean"].iloc[0]), float(r["ci95"].iloc[0])] if len(r) else [math.nan, math.nan]
        row.append(int(g["n_seeds"].max()))
        rows.append(row)
    table = pd.DataFrame(rows, columns=cols)
    set_rank = {v: i for i, v in enumerate(_ordered(table["ood_set"], _OOD_SET_ORDER))}
    score_rank = {v: i for i, v in enumerate(_ordered(table["score"], _SCORE_ORDER))}
    order = sorted(range(len(table)), key=lambda i: (
        sort_key(tuple(table.iloc[i][k] for k in train_keys if k not in CURVE_FACTORS)),
        set_rank[table["ood_set"].iloc[i]], score_rank[table["score"].iloc[i]],
        float(table["ssl_weight"].iloc[i]), str(table["ssl_task"].iloc[i])))
    return table.iloc[order].reset_index(drop=True)


def ood_display(table: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """The OOD table with 'mean ± CI' cells (for Markdown and HTML; the CSV keeps the numbers)."""
    shown = table[list(train_keys) + ["ood_set", "score"]].copy()
    for m, title in (("auroc", "AUROC"), ("aupr", "AUPR-In"), ("fpr95", "FPR95")):
        shown[title] = [pm(a, b) for a, b in zip(table[f"{m}_mean"], table[f"{m}_ci95"])]
    shown["n_seeds"] = table["n_seeds"].to_numpy()
    return shown


def plot_ood_auroc(agg_ood: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """AUROC per OOD set (groups of bars), a bar per λ, one panel per score (columns) × any other
    swept factor (rows); error bars: 95% t-interval over seeds; dotted line: chance (0.5)."""
    sel_all = agg_ood[agg_ood["measure"] == "auroc"] if not agg_ood.empty else agg_ood
    if sel_all.empty:
        return None
    scores = _ordered(sel_all["score"], _SCORE_ORDER)
    sets = _ordered(sel_all["ood_set"], _OOD_SET_ORDER)
    row_f = [k for k in varying(sel_all, train_keys) if k not in CURVE_FACTORS]
    rows = sorted({tuple(r) for r in sel_all[row_f].itertuples(index=False)}, key=sort_key) if row_f else [()]
    bars = sorted({(t, float(w)) for t, w in zip(sel_all["ssl_task"], sel_all["ssl_weight"])},
                  key=lambda b: (b[1], b[0] != "none"))
    colors = Colors(sel_all["ssl_weight"])
    fig, axes = new_figure(len(rows), len(scores), w=max(4.3, 1.2 * len(sets) + 1.5), sharey=True)
    width = 0.8 / max(len(bars), 1)
    x = np.arange(len(sets))
    for i, rv in enumerate(rows):
        for j, score in enumerate(scores):
            ax = axes[i, j]
            where = dict(zip(row_f, rv))
            sel = select_rows(sel_all[sel_all["score"] == score], where)
            ax.set_title(f"score: {score}" + (f"\n{describe(where)}" if where else ""), fontsize=8)
            if sel.empty:
                empty_panel(ax, "no data")
                continue
            for b, (task, lam) in enumerate(bars):
                c = sel[(sel["ssl_task"] == task) & (sel["ssl_weight"] == lam)]
                if c.empty:
                    continue
                by_set = {s: (m, ci) for s, m, ci in zip(c["ood_set"], c["mean"], c["ci95"])}
                means = np.array([by_set.get(s, (math.nan, math.nan))[0] for s in sets], dtype=float)
                cis = np.array([by_set.get(s, (math.nan, math.nan))[1] for s in sets], dtype=float)
                yerr = np.where(np.isfinite(cis), cis, 0.0) if np.isfinite(cis).any() else None
                ax.bar(x - 0.4 + width * (b + 0.5), means, width, yerr=yerr, capsize=2,
                       color=colors(task, lam), label=f"{lam_label(task, lam)}, {seed_label(c['n_seeds'])}")
            ax.axhline(0.5, color="0.4", ls=":", lw=1, label="_chance")
            ax.set_xticks(x)
            ax.set_xticklabels(sets, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("AUROC (in-distribution vs OOD)", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6.5, loc="lower right")
    suptitle(fig, "OOD detection: AUROC per OOD set (mean over seeds, bars: 95% t-interval)", fontsize=10)
    return fig


def auroc_section(inputs: Inputs) -> Section:
    return Section("ood_auroc", "Out-of-distribution detection",
                   "AUROC of telling in-distribution test images from each OOD set (in-distribution positive), a "
                   "bar per λ, a panel per score (msp: maximum softmax probability; rotation: −KL(U‖softmax) + "
                   "mean rotation-prediction loss over the four rotations). Dotted: chance. Bars: 95% t-interval "
                   "over seeds.",
                   figure=plot_ood_auroc(inputs.agg_ood, inputs.train_keys))


def table_section(inputs: Inputs) -> Section:
    table = ood_table(inputs.agg_ood, inputs.train_keys)
    return Section("ood", "Out-of-distribution detection",
                   "Per λ × OOD set × score: AUROC, AUPR (in-distribution as positive, as in Hendrycks' code) and "
                   "FPR at 95% TPR (the fraction of OOD images accepted when 95% of test images are), mean ± 95% "
                   "t-interval over seeds. Higher AUROC/AUPR and lower FPR95 are better.",
                   table=table, shown=ood_display(table, inputs.train_keys) if len(table) else None)
