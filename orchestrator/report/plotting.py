"""What the report's figures share: matplotlib figures drawn with Agg (no pyplot state), one colour
per λ, titled panels of the robustness figures and the ε axis."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .labels import describe, fmt_eps
from .statistics import CURVE_FACTORS, sort_key, varying

# Adversarial figures: a column per attack variant, a row per init × norm × ε_train (× any other
# swept factor); every panel title names variant, init, norm and ε_train.
PANEL_COLUMN_FACTORS = ("attack_variant",)
PANEL_ROW_FACTORS = ("init", "norm", "eps_train")
ALWAYS_IN_TITLE = frozenset({"attack_variant", "init", "norm", "eps_train"})
MNIST_FAMILY = ("mnist", "fashion_mnist")  # ε in plain decimals, not as k/255


class Colors:
    """A colour per λ (viridis); grey for trials without an SSL task."""

    def __init__(self, lams: Iterable[float]):
        import matplotlib

        lams = sorted(set(float(x) for x in lams))
        cmap = matplotlib.colormaps["viridis"]
        span = max(len(lams) - 1, 1)
        self.map = {lam: cmap(0.9 * i / span) for i, lam in enumerate(lams)}

    def __call__(self, ssl_task: str, lam: float):
        return "0.35" if ssl_task == "none" else self.map.get(float(lam), "k")


def suptitle(fig: Figure, text: str, **kwargs) -> None:
    """The figure's title, wrapped to the figure's width (a one-panel figure is 5 in wide)."""
    import textwrap

    size = kwargs.get("fontsize", 10)
    width = max(20, int(fig.get_figwidth() * 140 / size))  # ~0.5 em per character
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), **kwargs)


def new_figure(nrows: int, ncols: int, w: float = 4.3, h: float = 3.3, sharey: bool = False) -> tuple[Figure, np.ndarray]:
    """A figure of nrows × ncols panels of w × h inches each (axes always 2-d)."""
    fig = Figure(figsize=(max(w * ncols, 5.0), h * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, without pyplot's global state
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    if sharey:  # same scale everywhere, but numbers on every panel (a neighbour may be empty)
        for ax in axes.flat:
            ax.yaxis.set_tick_params(labelleft=True)
    return fig, axes


def adv_layout(train_keys: list[str]) -> tuple[list[str], list[str]]:
    """The factors of the robustness figures' panel columns and rows."""
    col_f = list(PANEL_COLUMN_FACTORS)
    row_f = list(PANEL_ROW_FACTORS) + [k for k in train_keys
                                      if k not in CURVE_FACTORS and k not in col_f and k not in PANEL_ROW_FACTORS]
    return col_f, row_f


def eps_ticks(ax, eps: list[float], dataset: str | None) -> None:
    """A tick per ε of a short grid, as k/255 except for the MNIST family."""
    eps = sorted(set(eps))
    if 1 < len(eps) <= 8:
        ax.set_xticks(eps)
        if dataset not in MNIST_FAMILY:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_eps(v)))
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)


def empty_panel(ax, text: str) -> None:
    """A panel without data: `text` in its middle, no axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_axis_off()  # not set_yticks([]): the y axis may be shared with the other panels


def panel_layout(agg: pd.DataFrame, col_factors: list[str], row_factors: list[str]):
    """The sorted values of the column factors and of the row factors that `agg` has."""
    cols = sorted({tuple(r) for r in agg[col_factors].itertuples(index=False)}, key=sort_key)
    rows = sorted({tuple(r) for r in agg[row_factors].itertuples(index=False)}, key=sort_key) if row_factors else [()]
    return cols, rows


def panel_title(values: dict[str, Any], swept: set[str]) -> str:
    """Variant, init and norm on the first line; ε_train and the other `swept` factors below."""
    top = {k: v for k, v in values.items() if k in ALWAYS_IN_TITLE and k != "eps_train"}
    below = {k: v for k, v in values.items() if k == "eps_train" or (k in swept and k not in ALWAYS_IN_TITLE)}
    return describe(top) + ("\n" + describe(below) if below else "")


def curve_order(kv):
    """Sort key of ((ssl_task, λ), rows) groups: by λ, no SSL task first."""
    (task, lam), _ = kv
    return (float(lam), task != "none")


def adv_panels(frame: pd.DataFrame, train_keys: list[str]):
    """The figure of the robustness panels (attack variant columns × init, norm, ε_train, ... rows)
    and an iterator over (axes, the panel's factor values), each panel already titled."""
    col_f, row_f = adv_layout(train_keys)
    swept = set(varying(frame, row_f))
    cols, rows = panel_layout(frame, col_f, row_f)
    fig, axes = new_figure(len(rows), len(cols), sharey=True)

    def panels():
        for i, rv in enumerate(rows):
            for j, cv in enumerate(cols):
                where = {**dict(zip(col_f, cv)), **dict(zip(row_f, rv))}
                axes[i, j].set_title(panel_title(where, swept), fontsize=8)
                yield axes[i, j], where

    return fig, axes, panels()
