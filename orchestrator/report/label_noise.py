"""Label corruption (Hendrycks et al. 2019): clean test accuracy when a fraction p of the training
labels is wrong, and its change from p = 0, for studies that sweep label_noise."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .labels import describe, lam_label, pm, seed_label
from .plotting import Colors, new_figure, suptitle
from .section import Inputs, Section
from .statistics import StudyData, diff_ci, mean_ci, select_rows, sort_key, varying


def _noise_value(v: Any) -> float:
    if isinstance(v, str):
        v = json.loads(v)
    return 0.0 if v is None else float(v)  # a trial from before label_noise existed had none


def label_noise_table(data: StudyData) -> pd.DataFrame:
    """Clean test accuracy (test labels are never corrupted) per configuration and label-noise
    fraction p: mean and 95% t-interval over seeds, and the change from p = 0 of the same
    configuration, paired by seed. Empty unless the study sweeps label_noise."""
    keys = [k for k in data.train_keys if k != "label_noise"]
    cols = keys + ["label_noise", "mean", "ci95", "n_seeds", "seeds", "delta_vs_p0", "delta_ci95"]
    if "label_noise" not in data.extras or data.clean.empty:
        return pd.DataFrame(columns=cols)
    clean = data.clean.copy()
    clean["label_noise"] = clean["label_noise"].map(_noise_value)
    rows = []
    for key, g in clean.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        base = g[g["label_noise"] == 0.0]
        base_acc = dict(zip(base["seed"].astype(int), base["clean_acc"].astype(float)))
        for p, h in g.groupby("label_noise", sort=True):
            m, ci, n = mean_ci(h["clean_acc"].to_numpy(float))
            acc = dict(zip(h["seed"].astype(int), h["clean_acc"].astype(float)))
            dm, dci = (math.nan, math.nan)
            if base_acc and p > 0:
                dm, dci, _, _ = diff_ci(acc, base_acc)
            rows.append((*key, float(p), m, ci, n, ",".join(str(s) for s in sorted(acc)), dm, dci))
    return pd.DataFrame(rows, columns=cols)


# ============================================================================================
# Label-free robustness (Petrov and Kwiatkowska; only for studies that have it)


def label_noise_display(table: pd.DataFrame) -> pd.DataFrame:
    """The label-noise table with 'mean ± CI' cells (Markdown and HTML; the CSV keeps the numbers)."""
    shown = table.drop(columns=["mean", "ci95", "seeds", "delta_vs_p0", "delta_ci95", "n_seeds"]).copy()
    shown["label_noise"] = [f"{p:g}" for p in table["label_noise"]]
    shown["clean test accuracy"] = [pm(m, c) for m, c in zip(table["mean"], table["ci95"])]
    shown["change vs p=0"] = [
        "—" if not np.isfinite(m) else ("+" if m >= 0 else "") + pm(m, c)
        for m, c in zip(table["delta_vs_p0"], table["delta_ci95"])
    ]
    shown["n_seeds"] = table["n_seeds"].to_numpy()
    return shown


def plot_label_noise(table: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Clean test accuracy against the label-noise fraction p, one curve per λ × init (solid:
    scratch, dashed: SSL pre-trained), a panel per any other swept factor; shaded 95% t-interval."""
    if table.empty:
        return None
    curve_f = ["ssl_task", "ssl_weight", "init"]
    row_f = [k for k in varying(table, train_keys) if k not in curve_f and k != "label_noise"]
    rows = sorted({tuple(r) for r in table[row_f].itertuples(index=False)}, key=sort_key) if row_f else [()]
    colors = Colors(table["ssl_weight"])
    fig, axes = new_figure(len(rows), 1, w=7.0, h=4.0, sharey=True)
    for i, rv in enumerate(rows):
        ax = axes[i, 0]
        where = dict(zip(row_f, rv))
        sel = select_rows(table, where)
        ax.set_title(describe(where) if where else "clean test accuracy under label corruption", fontsize=8)
        curves = sorted(sel.groupby(curve_f, dropna=False), key=lambda kv: (float(kv[0][1]), kv[0][0] != "none", str(kv[0][2])))
        for (task, lam, init), c in curves:
            c = c.sort_values("label_noise")
            x, y, ci = (c[k].to_numpy(float) for k in ("label_noise", "mean", "ci95"))
            color = colors(task, lam)
            pre = init == "ssl_pretrained"
            ax.plot(x, y, marker="s" if pre else "o", ms=3.5, lw=1.5, color=color, ls="--" if pre else "-",
                    label=f"{lam_label(task, lam)}, {init}, {seed_label(c['n_seeds'])}")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.15, lw=0)
        ax.set_xticks(sorted(set(float(p) for p in sel["label_noise"])))
        ax.set_xlabel("fraction of training labels corrupted (p)", fontsize=8)
        ax.set_ylabel("clean test accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    suptitle(fig, "Label corruption: clean test accuracy against p\n(mean over seeds, shaded: 95% t-interval)",
              fontsize=10)
    return fig



def _table(inputs: Inputs) -> pd.DataFrame:
    return inputs.memo("label_noise", lambda: label_noise_table(inputs.data))


def figure_section(inputs: Inputs) -> Section:
    return Section("label_noise", "Label corruption",
                   "Clean test accuracy (test labels are never corrupted) against the fraction p of training "
                   "labels replaced by a random other class; one curve per λ × init (dashed: SSL pre-trained). "
                   "Shaded: 95% t-interval over seeds.",
                   figure=plot_label_noise(_table(inputs), inputs.train_keys))


def table_section(inputs: Inputs) -> Section:
    table = _table(inputs)
    return Section("label_noise", "Label corruption: clean test accuracy",
                   "Per configuration and label-noise fraction p: clean test accuracy, mean ± 95% t-interval over "
                   "seeds, and its change from p = 0 of the same configuration (paired by seed).",
                   table=table, shown=label_noise_display(table) if len(table) else None)
