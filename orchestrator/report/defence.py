"""Test-time SSL-reversal defence (Lawhon, Mao and Yang 2022): accuracy against attack strength of
the defended models, under the plain and the adaptive PGD (the table is statistics.defence_table)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plotting import eps_ticks, new_figure, suptitle
from .section import Inputs, Section
from .statistics import defence_table


def plot_defence(table: pd.DataFrame) -> Figure | None:
    """Accuracy against ε_test, a panel per dataset × norm, a colour per trained model × defence;
    solid: the plain attack (unaware of the defence), dashed: the adaptive attack."""
    if table.empty:
        return None
    panels = sorted(table.groupby(["dataset", "norm"]).groups)
    fig, axes = new_figure(1, len(panels), w=6.5, h=5.0)
    short = lambda text: text.replace("rotation", "rot").replace("contrastive", "con").replace("inpainting", "inp")  # noqa: E731
    palette = [f"C{i}" for i in range(10)]
    curves = sorted(table.groupby(["model", "defence"]).groups)
    colors = {c: palette[i % len(palette)] for i, c in enumerate(curves)}
    for ax, (dataset, norm) in zip(axes[0], panels):
        sel = table[(table["dataset"] == dataset) & (table["norm"] == norm)]
        for (model, defence, attack), c in sorted(sel.groupby(["model", "defence", "attack"])):
            c = c.sort_values("eps_test")
            x, y, ci = (c[k].to_numpy(float) for k in ("eps_test", "mean", "ci95"))
            color = colors[(model, defence)]
            ax.plot(x, y, marker="o", ms=3, lw=1.5, color=color, ls="--" if attack == "adaptive" else "-",
                    label=f"trained {short(model)}: {short(defence)}, {attack} ({int(c['n_seeds'].max())} seeds)")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.12, lw=0)
        eps_ticks(ax, sorted(set(sel["eps_test"])), dataset)
        ax.set_title(f"{dataset}, {norm}", fontsize=9)
        ax.set_xlabel("ε_test (attack strength)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    suptitle(fig, "Test-time SSL-reversal defence\nsolid: plain PGD, dashed: adaptive PGD", fontsize=10)
    return fig



def defence_section(inputs: Inputs) -> Section:
    return Section("defence", "Test-time defence: SSL reversal",
                   "Accuracy against ε_test of the models of trials evaluated with a test-time defence: defence "
                   "none (the same model undefended) vs SSL reversal with the model's SSL tasks. Solid: the plain "
                   "PGD (attacks the undefended model, then the defence runs); dashed: the adaptive PGD (maximises "
                   "CE − λ_S·SSL, so the attacked image also looks natural to the SSL tasks). Such defences are not "
                   "eligible for RobustBench's standard AutoAttack protocol (see README). Shaded: 95% t-interval "
                   "over seeds.",
                   figure=plot_defence(defence_table(inputs.df)))
