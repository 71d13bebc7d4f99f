"""Smoothing certificates against an l2 radius: randomized smoothing's certified accuracy (Cohen et
al. 2019) and center smoothing's bound on the representation (Kumar and Goldstein 2021)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .label_free import CENTER_SMOOTHING_MEASURES
from .labels import describe, lam_label, seed_label
from .plotting import Colors, empty_panel, new_figure, suptitle
from .section import Inputs, Section
from .statistics import select_rows, sort_key, varying


def _radius_figure_layout(sel_all: pd.DataFrame, train_keys: list[str]):
    """What the figures against an l2 radius (certified accuracy, center smoothing) share: the
    factors that make rows of panels, those rows, and `draw(ax, rows_of_one_panel)`, which draws one
    line per (task, λ, variant) of mean against `radius` with its 95% band."""
    curve_f = ["ssl_task", "ssl_weight", "attack_variant"]
    row_f = [k for k in varying(sel_all, train_keys) if k not in curve_f]
    rows = sorted({tuple(r) for r in sel_all[row_f].itertuples(index=False)}, key=sort_key) if row_f else [()]
    colors = Colors(sel_all["ssl_weight"])
    variants = sorted(set(sel_all["attack_variant"]))
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]

    def draw(ax, part: pd.DataFrame) -> None:
        curves = sorted(part.groupby(curve_f, dropna=False), key=lambda kv: (str(kv[0][2]), float(kv[0][1])))
        for (task, lam, variant), c in curves:
            c = c.sort_values("radius")
            x, y, ci = (c[k].to_numpy(float) for k in ("radius", "mean", "ci95"))
            v = variants.index(variant) % len(styles)
            color = colors(task, lam)
            ax.plot(x, y, marker=markers[v], ms=3.5, lw=1.5, color=color, ls=styles[v],
                    label=f"{lam_label(task, lam)}, {variant}, {seed_label(c['n_seeds'])}")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.12, lw=0)

    return row_f, rows, draw


def plot_certified_accuracy(agg_lf: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Certified accuracy (randomized smoothing) against the l2 radius, one curve per λ × attack
    variant, a panel per any other swept factor; shaded: 95% t-interval over seeds."""
    sel_all = agg_lf[agg_lf["measure"] == "certified_acc"] if not agg_lf.empty else agg_lf
    if sel_all.empty:
        return None
    row_f, rows, draw = _radius_figure_layout(sel_all, train_keys)
    fig, axes = new_figure(len(rows), 1, w=7.0, h=4.0, sharey=True)
    for i, rv in enumerate(rows):
        ax = axes[i, 0]
        where = dict(zip(row_f, rv))
        sel = select_rows(sel_all, where)
        ax.set_title(describe(where) if where else "certified accuracy (randomized smoothing)", fontsize=8)
        draw(ax, sel)
        ax.set_xlabel("l2 radius r", fontsize=8)
        ax.set_ylabel("certified accuracy at r", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
    suptitle(fig, "Randomized smoothing: certified accuracy against radius\n(mean over seeds, shaded: 95% t-interval)",
              fontsize=10)
    return fig


def plot_center_smoothing(agg_lf: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Center smoothing: the certified bound on how far the smoothed representation moves (l2, and
    over the median clean-pair distance) and the abstention rate against the l2 input radius ε; one
    curve per λ × attack variant, a row of panels per any other swept factor; shaded: 95% t-interval."""
    sel_all = agg_lf[agg_lf["measure"].isin(CENTER_SMOOTHING_MEASURES)] if not agg_lf.empty else agg_lf
    if sel_all.empty:
        return None
    row_f, rows, draw = _radius_figure_layout(sel_all, train_keys)
    panels = [("center_smoothing_bound", "certified bound (l2, representation)"),
              ("center_smoothing_bound_normalized", "bound / median clean-pair distance"),
              ("center_smoothing_abstain_rate", "abstention rate")]
    fig, axes = new_figure(len(rows), len(panels), w=4.3, h=3.4)
    for i, rv in enumerate(rows):
        where = dict(zip(row_f, rv))
        sel = select_rows(sel_all, where)
        for j, (measure, ylabel) in enumerate(panels):
            ax = axes[i, j]
            part = sel[sel["measure"] == measure]
            ax.set_title((describe(where) + "\n" if where else "") + ylabel, fontsize=8)
            if part.empty:
                empty_panel(ax, "every image abstained")
                continue
            draw(ax, part)
            ax.set_xlabel("l2 input radius ε", fontsize=8)
            if measure == "center_smoothing_abstain_rate":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6.5, loc="best")
    suptitle(fig, "Center smoothing: certified bound on the representation's movement against ε\n"
                   "(mean over seeds of the mean over certified images, shaded: 95% t-interval)", fontsize=10)
    return fig



def certified_accuracy_section(inputs: Inputs) -> Section:
    return Section("certified_accuracy", "Label-free robustness: certified accuracy",
                   "Randomized smoothing (Cohen et al. 2019, CERTIFY): the fraction of test images the smoothed "
                   "classifier predicts correctly with a certified l2 radius of at least r; one curve per λ × "
                   "attack variant. Shaded: 95% t-interval over seeds.",
                   figure=plot_certified_accuracy(inputs.agg_lf, inputs.train_keys))


def center_smoothing_section(inputs: Inputs) -> Section:
    return Section("center_smoothing", "Label-free robustness: center smoothing",
                   "Center smoothing of the representation (Kumar and Goldstein 2021): for each l2 input radius "
                   "ε, a bound, certified with probability 1 − α, on how far the smoothed representation can "
                   "move, in l2 (left) and over the median distance between clean representations of distinct "
                   "test images (middle), averaged over the images not abstained on; right: the fraction "
                   "abstained on (the centre failed its check, or ε is too large for the samples). One curve per "
                   "λ × attack variant. Shaded: 95% t-interval over seeds.",
                   figure=plot_center_smoothing(inputs.agg_lf, inputs.train_keys))
