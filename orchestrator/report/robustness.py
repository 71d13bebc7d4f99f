"""Robust accuracy against ε_test, the seed papers' central question: the curves per λ, their change
from the λ = 0 curve of the same configuration (paired by seed), clean against robust accuracy, the
effect of λ below / at / above ε_train (Kucer et al.), the best attack variant, and SSL pre-training
against training from scratch."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .labels import NO_BASELINE, ONE_SEED, describe, fmt_eps, lam_label, seed_label
from .plotting import Colors, adv_panels, curve_order, empty_panel, eps_ticks, new_figure, suptitle
from .section import Inputs, Section
from ..intervals import T_SOURCES, Interval, difference_interval, interval_legend, mixed, table_cell
from .statistics import StudyData, diff_ci, mean_ci, select_rows, sort_key, varying


def _curves(adv: pd.DataFrame, train_keys: list[str]) -> dict[tuple, dict[int, dict[float, float]]]:
    """(train key..., norm) -> seed -> eps_test -> robust_acc."""
    out: dict[tuple, dict[int, dict[float, float]]] = {}
    if adv.empty:
        return out
    for key, g in adv.groupby(train_keys + ["norm"], dropna=False, sort=True):
        curve: dict[int, dict[float, float]] = {}
        for s, e, v in zip(g["seed"], g["eps_test"], g["robust_acc"]):
            curve.setdefault(int(s), {})[float(e)] = float(v)
        out[tuple(key)] = curve
    return out


def _baseline_key(key: tuple, keys: list[str], curves: dict) -> tuple | None:
    """The λ=0 curve to compare `key` (a train key + norm) with, or None.

    First the same configuration with λ = 0; else the same configuration trained without an SSL
    task (its `rotations` setting is irrelevant then)."""
    idx = {k: i for i, k in enumerate(keys)}
    same = list(key)
    same[idx["ssl_weight"]] = 0.0
    if tuple(same) in curves and tuple(same) != key:
        return tuple(same)
    for cand in curves:
        if cand == key or cand[idx["ssl_task"]] != "none":
            continue
        if all(cand[i] == key[i] for k, i in idx.items() if k not in ("ssl_task", "ssl_weight", "rotations")):
            return cand
    return None


# ============================================================================================


def plot_robust_vs_eps(agg: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Robust accuracy vs ε_test, one curve per λ; a panel per attack variant (columns) × init ×
    norm × ε_train (× any other swept factor) (rows); dashed line at ε_train (when the panel's norm
    is the training norm); shaded 95% CI band where n ≥ 2 seeds."""
    if agg.empty:
        return None
    colors = Colors(agg["ssl_weight"])
    fig, axes, panels = adv_panels(agg, train_keys)
    for ax, where in panels:
        sel = select_rows(agg, where)
        if sel.empty:
            empty_panel(ax, "no data")
            continue
        for (task, lam), c in sorted(sel.groupby(["ssl_task", "ssl_weight"]), key=curve_order):
            c = c.sort_values("eps_test")
            x, y = c["eps_test"].to_numpy(float), c["mean"].to_numpy(float)
            ci = c["ci95"].to_numpy(float)
            color = colors(task, lam)
            label = f"{lam_label(task, lam)}, {seed_label(c['n_seeds'])}"
            ax.plot(x, y, marker="o", ms=3, lw=1.5, color=color, label=label,
                    ls="--" if task == "none" else "-")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.18, lw=0)
        if where["norm"] == where.get("norm_train"):
            et = where["eps_train"]
            ax.axvline(et, color="0.3", ls="--", lw=1, label="_eps_train")
            ax.annotate("ε_train", (et, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        color="0.3", ha="left", va="top", xytext=(2, -2), textcoords="offset points")
        eps_ticks(ax, list(sel["eps_test"]), where.get("dataset"))
        ax.set_xlabel(f"ε_test ({where['norm']})", fontsize=8)
        ax.set_ylabel("robust accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    axes[0, 0].set_ylim(bottom=0)
    suptitle(fig, "Robust accuracy vs ε_test (mean over seeds, shaded: 95% t-interval)", fontsize=10)
    return fig


def delta_table(data: StudyData) -> tuple[pd.DataFrame, list[tuple]]:
    """Per λ>0 curve and ε_test: robust accuracy minus the λ=0 curve of the same configuration,
    paired by seed. Returns (table, keys of curves without a λ=0 baseline)."""
    keys = data.train_keys + ["norm"]
    curves = _curves(data.adv, data.train_keys)
    idx = {k: i for i, k in enumerate(keys)}
    rows, missing = [], []
    for key, curve in curves.items():
        if key[idx["ssl_weight"]] == 0:
            continue
        base_key = _baseline_key(key, keys, curves)
        if base_key is None:
            missing.append(key)
            continue
        base = curves[base_key]
        eps_all = sorted({e for s in curve.values() for e in s})
        for e in eps_all:
            a = {s: v[e] for s, v in curve.items() if e in v}
            b = {s: v[e] for s, v in base.items() if e in v}
            if not b:
                continue
            m, ci, n, paired = diff_ci(a, b)
            rows.append((*key, e, m, ci, n, paired, base_key[idx["ssl_task"]]))
    cols = keys + ["eps_test", "delta", "ci95", "n_seeds", "paired", "baseline_ssl_task"]
    return pd.DataFrame(rows, columns=cols), missing


def plot_delta_vs_lambda0(delta: pd.DataFrame, agg: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Robust accuracy minus the λ=0 curve against ε_test/ε_train, same panels as robust_vs_eps
    (ε_train = 0 and evaluations outside the training norm are skipped)."""
    if agg.empty:
        return None
    panels = agg[(agg["eps_train"] > 0) & (agg["norm"] == agg["norm_train"])]
    if panels.empty:
        return None
    colors = Colors(agg["ssl_weight"])
    fig, axes, grid = adv_panels(panels, train_keys)
    for ax, where in grid:
        if select_rows(panels, where).empty:
            empty_panel(ax, "no data")
            continue
        sel = select_rows(delta, where) if not delta.empty else delta
        if sel.empty:
            empty_panel(ax, NO_BASELINE)
            continue
        et = float(where["eps_train"])
        for (task, lam), c in sorted(sel.groupby(["ssl_task", "ssl_weight"]), key=curve_order):
            c = c.sort_values("eps_test")
            x = c["eps_test"].to_numpy(float) / et
            y, ci = c["delta"].to_numpy(float), c["ci95"].to_numpy(float)
            color = colors(task, lam)
            ax.plot(x, y, marker="o", ms=3, lw=1.5, color=color,
                    label=f"{lam_label(task, lam)} − λ=0, {seed_label(c['n_seeds'])}")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.18, lw=0)
        ax.axhline(0, color="0.3", lw=1, label="_zero")
        ax.axvline(1, color="0.3", ls="--", lw=1, label="_eps_train")
        ax.set_xlabel("ε_test / ε_train", fontsize=8)
        ax.set_ylabel("Δ robust accuracy vs λ=0", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    suptitle(fig, "Change in robust accuracy from the SSL loss (paired by seed, shaded: 95% t-interval)", fontsize=10)
    return fig



def clean_vs_robust_table(data: StudyData) -> pd.DataFrame:
    """Per configuration (evaluated in its training norm): clean accuracy and robust accuracy at
    ε_test = ε_train (nearest grid point above ε_train when ε_train itself is not on the grid)."""
    tk = data.train_keys
    cols = tk + ["eps_test", "robust_mean", "robust_ci95", "clean_mean", "clean_ci95", "n_seeds"]
    rows = []
    adv = data.adv[data.adv["norm"] == data.adv["norm_train"]] if not data.adv.empty else data.adv
    if adv.empty:
        return pd.DataFrame(columns=cols)
    for key, g in adv.groupby(tk, dropna=False, sort=True):
        et = float(dict(zip(tk, key))["eps_train"])
        grid = np.array(sorted(set(g["eps_test"])))
        exact = grid[np.isclose(grid, et, rtol=0, atol=1e-9)]
        above = grid[grid >= et]
        if len(exact):
            eps = float(exact[0])
        elif len(above):
            eps = float(above[0])
        else:
            continue
        at = g[np.isclose(g["eps_test"], eps, rtol=0, atol=1e-12)]
        rm, rci, n = mean_ci(at["robust_acc"])
        cm, cci, _ = mean_ci(at["clean_acc"])
        rows.append((*key, eps, rm, rci, cm, cci, n))
    return pd.DataFrame(rows, columns=cols)


_MARKERS = "osD^vP*Xh<>"


def plot_clean_vs_robust(table: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Clean accuracy against robust accuracy at ε_test = ε_train, one point per configuration:
    a panel per training norm × ε_train, colour = λ, marker = attack variant, hollow = SSL
    pre-trained. Points are labelled with text when a panel has few of them."""
    if table.empty:
        return None
    panel_f = ["norm_train", "eps_train"]
    panels = sorted({tuple(r) for r in table[panel_f].itertuples(index=False)}, key=sort_key)
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(nrows, ncols, w=5.0, h=4.3)
    colors = Colors(table["ssl_weight"])
    variants = sorted(set(table["attack_variant"]))
    marker = {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(variants)}
    label_f = [k for k in varying(table, train_keys) if k not in panel_f] or ["attack_variant", "init", "ssl_weight"]
    for n, pv in enumerate(panels):
        ax = axes[n // ncols, n % ncols]
        sel = select_rows(table, dict(zip(panel_f, pv)))
        few = len(sel) <= 10
        for _, r in sel.iterrows():
            color = colors(r["ssl_task"], r["ssl_weight"])
            hollow = r["init"] == "ssl_pretrained"
            text = describe({k: r[k] for k in label_f})
            ax.errorbar(
                r["robust_mean"], r["clean_mean"],
                xerr=r["robust_ci95"] if np.isfinite(r["robust_ci95"]) else None,
                yerr=r["clean_ci95"] if np.isfinite(r["clean_ci95"]) else None,
                fmt=marker[r["attack_variant"]], ms=6, color=color, mfc="white" if hollow else color,
                capsize=2, elinewidth=0.8, label=text,
            )
            if few:
                ax.annotate(text, (r["robust_mean"], r["clean_mean"]), fontsize=6, xytext=(4, 3),
                            textcoords="offset points")
        if not few:  # a key instead of one label per point
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], ls="", marker="o", color=c, label=f"λ={lam:g}") for lam, c in colors.map.items()]
            handles += [Line2D([], [], ls="", marker=m, color="0.3", label=v) for v, m in marker.items()]
            if {"scratch", "ssl_pretrained"} <= set(sel["init"]):
                handles += [Line2D([], [], ls="", marker="o", color="0.3", label="filled: scratch"),
                            Line2D([], [], ls="", marker="o", color="0.3", mfc="white", label="hollow: ssl_pretrained")]
            ax.legend(handles=handles, fontsize=6.5, loc="best")
        eps = sorted(set(sel["eps_test"]))
        if all(math.isclose(e, pv[1], abs_tol=1e-9) for e in eps):
            at = "ε_test = ε_train"
        else:  # ε_train is not on the ε_test grid
            at = "ε_test = " + "/".join(fmt_eps(e) for e in eps) + " (nearest grid point ≥ ε_train)"
        ax.set_title(f"{pv[0]}, ε_train={fmt_eps(pv[1])}", fontsize=9)
        ax.set_xlabel(f"robust accuracy at {at}", fontsize=8)
        ax.set_ylabel("clean accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    for n in range(len(panels), nrows * ncols):
        axes[n // ncols, n % ncols].set_visible(False)
    one = int(table["n_seeds"].max()) <= 1
    suptitle(fig, "Clean vs robust accuracy" + (f" ({ONE_SEED})" if one else " (bars: 95% t-intervals over seeds)"), fontsize=10)
    return fig


# ============================================================================================
# Tables


EFFECT_CATEGORIES = ("below", "at", "above")  # ε_test against ε_train


def lambda_effect_table(data: StudyData) -> pd.DataFrame:
    """The seed paper's claim, per configuration and λ > 0: mean change in robust accuracy vs the
    λ=0 baseline averaged over ε_test < ε_train, at ε_test = ε_train, and over ε_test > ε_train,
    each with its 95% interval [low_*, high_*] from orchestrator.intervals: paired over seeds and
    test examples (each example's correctness averaged over the category's ε_test) where the rows
    carry per-example correctness, else Student's t over the seeds' differences; Welch's unpaired
    interval when the two share no seed. `interval_*` says which (`Interval.sources`). These are
    the end-of-run table's intervals, so the console and the report give one verdict. Only
    evaluations in the training norm (ε_test and ε_train must be comparable)."""
    keys = data.train_keys + ["norm"]
    idx = {k: i for i, k in enumerate(keys)}
    curves = _curves(data.adv, data.train_keys)
    rows_of = ({tuple(k): g for k, g in data.adv_rows.groupby(keys, dropna=False, sort=True)}
               if not data.adv_rows.empty else {})
    out_cols = keys + ["baseline", "n_seeds", "paired"]
    for cat in EFFECT_CATEGORIES:
        out_cols += [f"n_eps_{cat}", f"delta_{cat}", f"low_{cat}", f"high_{cat}", f"interval_{cat}"]
    out_cols += ["direction", "claim"]
    rows = []
    for key, curve in curves.items():
        if key[idx["ssl_weight"]] == 0 or key[idx["norm"]] != key[idx["norm_train"]]:
            continue
        et = float(key[idx["eps_train"]])
        base_key = _baseline_key(key, keys, curves)
        if base_key is None:
            rows.append([*key, NO_BASELINE, 0, False] + [0, math.nan, math.nan, math.nan, ""] * 3 + ["", ""])
            continue
        base = curves[base_key]
        eps_sets = [set(v) for v in curve.values()] + [set(v) for v in base.values()]
        common_eps = sorted(set.intersection(*eps_sets)) if eps_sets else []
        cats = {
            "below": [e for e in common_eps if e < et and not math.isclose(e, et, abs_tol=1e-9)],
            "at": [e for e in common_eps if math.isclose(e, et, abs_tol=1e-9)],
            "above": [e for e in common_eps if e > et and not math.isclose(e, et, abs_tol=1e-9)],
        }
        row = [*key, "λ=0" if base_key[idx["ssl_task"]] != "none" else "no SSL task"]
        found: dict[str, Interval | None] = {}
        n_max, paired_all = 0, True
        for cat, eps in cats.items():
            if not eps:
                found[cat] = None
                continue
            interval, paired = _category_difference(rows_of.get(key), rows_of.get(base_key), curve, base, eps)
            found[cat] = interval
            n_max, paired_all = max(n_max, interval.n_seeds), paired_all and paired
        row += [n_max, paired_all]
        for cat in EFFECT_CATEGORIES:
            i = found[cat]
            row += [len(cats[cat])] + ([i.mean, i.low, i.high, i.sources] if i is not None else [math.nan] * 3 + [""])
        dirs = {c: i.direction() for c, i in found.items() if i is not None}
        row.append(", ".join(f"{c}: {d}" for c, d in dirs.items() if d))
        row.append(_claim(dirs))
        rows.append(row)
    df = pd.DataFrame(rows, columns=out_cols)
    if not df.empty:
        df = df.sort_values(keys, key=lambda s: s.astype(str) if s.dtype == object else s, kind="stable")
    return df.reset_index(drop=True)


def _category_difference(a_rows, b_rows, curve: dict, base: dict, eps: list[float]) -> tuple[Interval, bool]:
    """(a − b averaged over the ε_test in `eps`, paired?): orchestrator.intervals' paired interval
    on the rows at those ε; Welch's unpaired t-interval on the seeds' means when they share no seed."""
    if a_rows is not None and b_rows is not None:
        interval = difference_interval(a_rows[a_rows["eps_test"].isin(eps)], b_rows[b_rows["eps_test"].isin(eps)])
        if interval is not None:
            return interval, True
    a = {s: float(np.mean([v[e] for e in eps])) for s, v in curve.items()}
    b = {s: float(np.mean([v[e] for e in eps])) for s, v in base.items()}
    m, ci, n, paired = diff_ci(a, b)
    return Interval(m, m - ci, m + ci, n, 0, T_SOURCES), paired


def _effect_intervals(table: pd.DataFrame) -> dict[str, list[Interval | None]]:
    """Per category, the λ-effect table's intervals back as `Interval`s (None where there is none)."""
    return {cat: [None if not np.isfinite(m) else Interval(m, lo, hi, 0, 0, src)
                  for m, lo, hi, src in zip(table[f"delta_{cat}"], table[f"low_{cat}"], table[f"high_{cat}"],
                                             table[f"interval_{cat}"])]
            for cat in EFFECT_CATEGORIES}


def lambda_effect_shown(table: pd.DataFrame, found: dict[str, list[Interval | None]]) -> pd.DataFrame:
    """The λ-effect table as the report displays it: each category's difference with its interval
    (`found`, from _effect_intervals) in one cell ('-0.017 [-0.039, +0.004]', † on a t-interval
    where the table mixes both kinds)."""
    if table.empty:
        return table
    mark = mixed([i for cells in found.values() for i in cells])
    # the CSV keeps how many ε_test each category averages; the display keeps one cell per category
    shown = table.drop(columns=[f"{f}_{cat}" for cat in EFFECT_CATEGORIES
                                for f in ("n_eps", "delta", "low", "high", "interval")])
    for at, cat in enumerate(EFFECT_CATEGORIES, start=list(shown.columns).index("paired") + 1):
        shown.insert(at, f"Δ {cat} ε_train", [table_cell(i, mark, signed=True) for i in found[cat]])
    return shown


def _claim(dirs: dict[str, str]) -> str:
    """Kucer et al.: SSL raises accuracy below ε_train and lowers it above."""
    below, above = dirs.get("below", ""), dirs.get("above", "")
    if below == "lower" or above == "higher":
        return "contradicts"
    if above == "lower" and below in ("higher", ""):
        return "consistent"
    if "1 seed" in (below, above):
        return "1 seed"
    return "inconclusive"


def best_variant_table(agg: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """At each norm × ε_test (and every other factor), the attack variant with the highest mean
    robust accuracy, with its CI and the runner-up. Only where ≥ 2 variants were run."""
    ctx = [k for k in train_keys if k != "attack_variant"] + ["norm", "eps_test"]
    cols = ctx + ["best_variant", "best_mean", "best_ci95", "best_n_seeds", "runner_up", "runner_up_mean",
                  "runner_up_ci95", "margin", "n_variants"]
    rows = []
    if not agg.empty:
        for key, g in agg.groupby(ctx, dropna=False, sort=True):
            if g["attack_variant"].nunique() < 2:
                continue
            g = g.sort_values("mean", ascending=False)
            b, r = g.iloc[0], g.iloc[1]
            rows.append((*key, b["attack_variant"], b["mean"], b["ci95"], b["n_seeds"], r["attack_variant"],
                         r["mean"], r["ci95"], b["mean"] - r["mean"], g["attack_variant"].nunique()))
    return pd.DataFrame(rows, columns=cols)


def pretrain_vs_scratch_table(data: StudyData) -> pd.DataFrame:
    """ssl_pretrained minus scratch robust accuracy per configuration and ε_test, paired by seed."""
    tk = data.train_keys
    ctx = [k for k in tk if k != "init"] + ["norm", "eps_test"]
    cols = ctx + ["scratch_mean", "pretrained_mean", "diff", "ci95", "n_seeds", "paired"]
    rows = []
    adv = data.adv
    if not adv.empty and {"scratch", "ssl_pretrained"} <= set(adv["init"]):
        for key, g in adv.groupby(ctx, dropna=False, sort=True):
            s = g[g["init"] == "scratch"]
            p = g[g["init"] == "ssl_pretrained"]
            if s.empty or p.empty:
                continue
            a = dict(zip(p["seed"].astype(int), p["robust_acc"].astype(float)))
            b = dict(zip(s["seed"].astype(int), s["robust_acc"].astype(float)))
            m, ci, n, paired = diff_ci(a, b)
            rows.append((*key, float(np.mean(list(b.values()))), float(np.mean(list(a.values()))), m, ci, n, paired))
    return pd.DataFrame(rows, columns=cols)


# ============================================================================================


# ============================================================================================
# Sections and notes
# ============================================================================================
def _delta(inputs: Inputs) -> tuple[pd.DataFrame, list[tuple]]:
    return inputs.memo("delta", lambda: delta_table(inputs.data))


def notes(inputs: Inputs) -> list[str]:
    """Curves without a λ = 0 baseline, and the evaluations the Δ figure cannot show."""
    out = []
    _, no_base = _delta(inputs)
    if no_base:
        idx = {k: i for i, k in enumerate(inputs.train_keys + ["norm"])}
        shown = ("attack_variant", "init", "norm", "eps_train", "ssl_weight")
        descr = sorted({describe({k: key[i] for k, i in idx.items() if k in shown}) for key in no_base})
        out.append(f"{NO_BASELINE} for {len(no_base)} curve(s) (not in the Δ figure or the λ-effect table): "
                   + "; ".join(descr[:12]) + ("; …" if len(descr) > 12 else ""))
    agg = inputs.agg_adv
    if not agg.empty and (agg["eps_train"] == 0).any():
        out.append("ε_train = 0 (standard training) is skipped in the Δ vs λ=0 figure: ε_test/ε_train is undefined.")
    if not agg.empty and (agg["norm"] != agg["norm_train"]).any():
        out.append("Evaluations in a norm other than the training norm appear in the robust-accuracy figure only "
                   "(ε_test and ε_train are not comparable across norms).")
    return out


def robust_vs_eps_section(inputs: Inputs) -> Section:
    return Section("robust_vs_eps", "Robust accuracy vs ε_test",
                   "One curve per λ; dashed vertical line: ε_train. Shaded: 95% t-interval over seeds. "
                   + inputs.attack_text,
                   figure=plot_robust_vs_eps(inputs.agg_adv, inputs.train_keys))


def delta_vs_lambda0_section(inputs: Inputs) -> Section:
    return Section("delta_vs_lambda0", "Change vs λ = 0",
                   "Robust accuracy minus the λ=0 curve of the same configuration, paired by seed, against "
                   "ε_test/ε_train. Kucer et al.: above 0 left of 1, below 0 right of 1, more so for larger λ. "
                   "ε_train = 0 is skipped. " + inputs.attack_text,
                   figure=plot_delta_vs_lambda0(_delta(inputs)[0], inputs.agg_adv, inputs.train_keys))


def clean_vs_robust_section(inputs: Inputs) -> Section:
    return Section("clean_vs_robust", "Clean vs robust accuracy",
                   "Each point one configuration; robust accuracy at ε_test = ε_train (the nearest grid point "
                   "above ε_train when it is not on the grid). " + inputs.attack_text,
                   figure=plot_clean_vs_robust(clean_vs_robust_table(inputs.data), inputs.train_keys))


def lambda_effect_section(inputs: Inputs) -> Section:
    table = lambda_effect_table(inputs.data)
    found = _effect_intervals(table) if not table.empty else {}
    legend = interval_legend([i for cells in found.values() for i in cells], paired=True)
    return Section("lambda_effect", "Effect of the SSL loss (λ) vs λ = 0",
                   "Change in robust accuracy vs the λ=0 baseline, averaged over ε_test below ε_train (ε_test "
                   "= 0, the clean accuracy, included), at ε_train, and above ε_train: "
                   f"{legend}, as in the end-of-run table. direction: higher/lower "
                   "when the interval excludes 0, n.s. otherwise. claim: Kucer et al. (higher below ε_train, "
                   "lower above). " + inputs.attack_text,
                   table=table, shown=lambda_effect_shown(table, found),
                   empty_reason="no configuration with λ > 0 evaluated in its training norm")


def best_variant_section(inputs: Inputs) -> Section:
    return Section("best_variant", "Best attack variant",
                   "At each norm × ε_test (other factors fixed), the variant with the highest mean robust accuracy "
                   "and the runner-up. " + inputs.attack_text,
                   table=best_variant_table(inputs.agg_adv, inputs.train_keys),
                   empty_reason="only one attack variant per configuration in this study")


def pretrain_vs_scratch_section(inputs: Inputs) -> Section:
    return Section("pretrain_vs_scratch", "SSL pre-training vs scratch",
                   "Robust accuracy of ssl_pretrained minus scratch, paired by seed, with 95% t-intervals. "
                   + inputs.attack_text,
                   table=pretrain_vs_scratch_table(inputs.data),
                   empty_reason="needs both init = scratch and init = ssl_pretrained")
