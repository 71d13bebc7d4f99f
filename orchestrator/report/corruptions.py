"""Accuracy under natural corruptions, against their severity."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .labels import describe, lam_label, seed_label
from .plotting import Colors, adv_layout, curve_order, empty_panel, new_figure, panel_layout, suptitle
from .section import Inputs, Section
from .statistics import select_rows, varying


def plot_corruptions(agg_cor: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Accuracy under each corruption (columns) against severity, one curve per λ; a row per
    training configuration."""
    if agg_cor.empty:
        return None
    col_f = ["corruption"]
    _, adv_rows = adv_layout(train_keys)
    row_f = ["attack_variant"] + [k for k in adv_rows if k != "norm"]
    swept = set(varying(agg_cor, row_f))
    cols, rows = panel_layout(agg_cor, col_f, row_f)
    colors = Colors(agg_cor["ssl_weight"])
    fig, axes = new_figure(len(rows), len(cols), w=3.4, h=3.0, sharey=True)
    for i, rv in enumerate(rows):
        for j, cv in enumerate(cols):
            ax = axes[i, j]
            where = {**dict(zip(col_f, cv)), **dict(zip(row_f, rv))}
            sel = select_rows(agg_cor, where)
            below = {k: v for k, v in zip(row_f, rv) if k in swept or k in ("attack_variant", "init", "eps_train")}
            ax.set_title(cv[0] + "\n" + describe(below), fontsize=8)
            if sel.empty:
                empty_panel(ax, "no data")
                continue
            for (task, lam), c in sorted(sel.groupby(["ssl_task", "ssl_weight"]), key=curve_order):
                c = c.sort_values("severity")
                x, y, ci = c["severity"].to_numpy(float), c["mean"].to_numpy(float), c["ci95"].to_numpy(float)
                color = colors(task, lam)
                ax.plot(x, y, marker="o", ms=3, color=color, label=f"{lam_label(task, lam)}, {seed_label(c['n_seeds'])}",
                        ls="--" if task == "none" else "-")
                if np.isfinite(ci).any():
                    ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.18, lw=0)
            ax.set_xticks(sorted(set(int(s) for s in sel["severity"])))
            ax.set_xlabel("severity", fontsize=8)
            ax.set_ylabel("accuracy", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
    suptitle(fig, "Accuracy under natural corruptions (mean over seeds, shaded: 95% t-interval)", fontsize=10)
    return fig



def notes(inputs: Inputs) -> list[str]:
    return ["No corruption results in this study (no corruption figure)."] if inputs.agg_cor.empty else []


def corruptions_section(inputs: Inputs) -> Section:
    return Section("corruptions", "Natural corruptions",
                   "Accuracy under each corruption against severity, one curve per λ.",
                   figure=plot_corruptions(inputs.agg_cor, inputs.train_keys))
