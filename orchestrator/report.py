"""The report of a study: figures and tables a researcher reads, rebuilt from the Parquet files alone.

    python -m orchestrator.report NAME [--storage PATH_OR_URI] [--out DIR]

Every number is a mean over seeds with a 95% confidence interval from Student's t
(t_{0.975, n-1} * sd / sqrt(n)); with one seed the interval is NaN and the figures say so instead
of drawing a band. The exceptions are the two interval tables (orchestrator.summary
.interval_report_tables): robust accuracy and its paired difference to λ = 0 with intervals over
seeds and test examples (orchestrator.intervals), as the end-of-run table gives them.
Configurations are grouped by every config factor except the seed: the result columns (dataset,
arch, ssl_task, ssl_weight, attack_variant, init, norm_train, eps_train, train_attack_steps,
rotations) plus any other config key that takes more than one value in the
study (read from config_json), so a sweep over e.g. `epochs` is never averaged as if it were seeds.

A trial with ssl_task "none" has no SSL loss whatever its ssl_weight says, so the report counts it
as λ = 0.

Studies with out-of-distribution rows (ood_set/score/measure/value) also get an OOD table and an
AUROC figure; studies with label-free measure rows (measure/value with no ood_set, `radius` on
certified_acc and center-smoothing rows) get a table of the label-free measures, a
certified-accuracy figure and a center-smoothing figure;
studies that sweep label_noise get a table and a figure of clean test accuracy
against the fraction of corrupted training labels. Neither appears for other studies.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from scipy.special import stdtrit  # Student t quantiles; scipy.stats costs >1 s to import

from orchestrator import report_attacks, results
from orchestrator.errors import UserError
from orchestrator.summary import interval_report_tables
from trainables.row_kind import CORRUPTION, DEFENDED, LABEL_FREE, OOD, ROBUSTNESS

CONFIG_COLUMNS: tuple[str, ...] = (
    "dataset",
    "arch",
    "ssl_task",
    "ssl_weight",
    "attack_variant",
    "init",
    "norm_train",
    "eps_train",
    "train_attack_steps",
    "rotations",
)
ADV_EVAL_COLUMNS = ("norm", "eps_test")
# Figures and tables of robust accuracy: their captions name the attack that produced it.
ROBUSTNESS_SECTIONS = frozenset({"robust_vs_eps", "delta_vs_lambda0", "clean_vs_robust", "lambda_effect",
                                 "best_variant", "pretrain_vs_scratch"})
CORRUPTION_EVAL_COLUMNS = ("corruption", "severity")
# Config keys that decide which rows a trial has (or how fast it runs), not the value of a row.
NOT_FACTORS = frozenset(
    {"seed", "eval_batch_size", "eval_norms", "eval_eps_linf", "eval_eps_l2", "corruptions", "corruption_severities",
     "ood_sets", "ood_scores", "label_free_eval", "center_smoothing_eps"}
)
OOD_EVAL_COLUMNS = ("ood_set", "score", "measure")
OOD_MEASURES = ("auroc", "aupr", "fpr95")
LABEL_FREE_EVAL_COLUMNS = ("measure", "radius")
LABEL_FREE_MEASURES = ("repr_distance_untargeted", "repr_distance_targeted", "breakaway_risk", "overlap_risk",
                       "smoothing_abstain_rate")
# center smoothing (trainables.center_smoothing): one row per l2 input radius ε, in `radius`
CENTER_SMOOTHING_MEASURES = ("center_smoothing_bound", "center_smoothing_bound_normalized",
                             "center_smoothing_abstain_rate")
# Factors that never define panels (curves are per λ).
CURVE_FACTORS = ("ssl_task", "ssl_weight")
# Adversarial figures: a column per attack variant, a row per init × norm × ε_train (× any other
# swept factor); every panel title names variant, init, norm and ε_train.
PANEL_COLUMN_FACTORS = ("attack_variant",)
PANEL_ROW_FACTORS = ("init", "norm", "eps_train")
ALWAYS_IN_TITLE = frozenset({"attack_variant", "init", "norm", "eps_train"})
PACKAGES = ("torch", "ray", "mlflow", "pyarrow", "pandas", "numpy", "scipy", "matplotlib")
LABELS = {
    "ssl_weight": "λ",
    "eps_train": "ε_train",
    "eps_test": "ε_test",
    "attack_variant": "variant",
    "norm_train": "norm_train",
    "train_attack_steps": "train steps",
}
NO_BASELINE = "no λ=0 baseline"
ONE_SEED = "1 seed: no confidence band"
_MNIST_FAMILY = ("mnist", "fashion_mnist")


class ReportError(UserError):
    """The report cannot be built (no results, bad study name, unwritable output)."""


@dataclass
class ReportFiles:
    html: str
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)


# ============================================================================================
# Statistics
# ============================================================================================
def mean_ci(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t interval, n) of the finite values; CI is NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = float(stdtrit(n - 1, 0.975) * x.std(ddof=1) / math.sqrt(n))
    return float(x.mean()), half, n


def diff_ci(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int, bool]:
    """Mean difference a - b over seeds with its 95% CI: paired on the seeds both have; if they
    share no seed, Welch's unpaired interval. Returns (mean, ci, n, paired)."""
    common = sorted(set(a) & set(b))
    if common:
        m, ci, n = mean_ci([a[s] - b[s] for s in common])
        return m, ci, n, True
    xa = np.asarray([v for v in a.values() if np.isfinite(v)], dtype=float)
    xb = np.asarray([v for v in b.values() if np.isfinite(v)], dtype=float)
    if len(xa) == 0 or len(xb) == 0:
        return math.nan, math.nan, 0, False
    m = float(xa.mean() - xb.mean())
    n = min(len(xa), len(xb))
    if len(xa) < 2 or len(xb) < 2:
        return m, math.nan, n, False
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return m, 0.0, n, False
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    return m, float(stdtrit(dof, 0.975) * se), n, False


def _direction(mean: float, ci: float) -> str:
    if not np.isfinite(mean):
        return ""
    if not np.isfinite(ci):
        return "1 seed"
    if mean - ci > 0:
        return "higher"
    if mean + ci < 0:
        return "lower"
    return "n.s."


# ============================================================================================
# Data preparation
# ============================================================================================
@dataclass
class StudyData:
    raw: pd.DataFrame
    adv: pd.DataFrame  # seed level: train_keys + norm + eps_test + seed -> robust_acc, clean_acc
    cor: pd.DataFrame  # seed level: train_keys + corruption + severity + seed -> robust_acc, clean_acc
    clean: pd.DataFrame  # seed level: train_keys + seed -> clean_acc
    train_keys: list[str]
    extras: list[str]
    notes: list[str]
    # seed level: train_keys + ood_set + score + measure + seed -> value (empty without OOD rows)
    ood: pd.DataFrame = field(default_factory=pd.DataFrame)
    # seed level: train_keys + measure + radius + seed -> value (empty without label-free rows)
    label_free: pd.DataFrame = field(default_factory=pd.DataFrame)


def _json_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _config_keys() -> set[str] | None:
    """The trial config's semantic keys (trainables.config), or None if it cannot be imported."""
    try:
        from trainables import config as trial_config
    except Exception:
        return None
    return set(trial_config.SCHEMA) - set(trial_config.NON_SEMANTIC_KEYS)


def _late_defaults() -> dict[str, Any]:
    """Defaults of the config keys added after results existed (trainables.config)."""
    try:
        from trainables import config as trial_config
    except Exception:
        return {}
    return {k: trial_config.SCHEMA[k][0] for k in getattr(trial_config, "HASH_NEUTRAL_DEFAULTS", ())}


def _extra_factors(df: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """Config keys (from config_json) outside the result columns that vary across trials."""
    per_trial = df.drop_duplicates("config_hash")[["config_hash", "config_json"]]
    configs = {}
    for h, text in zip(per_trial.config_hash, per_trial.config_json):
        try:
            cfg = json.loads(text)
        except (TypeError, ValueError):
            cfg = {}
        configs[h] = cfg if isinstance(cfg, dict) else {}
    keys = {k for c in configs.values() for k in c} - set(CONFIG_COLUMNS) - NOT_FACTORS
    known = _config_keys()
    if known is not None:  # only real config settings (not e.g. bookkeeping keys unique per trial)
        keys &= known
    keys = sorted(keys)
    late = _late_defaults()
    extras = []
    table = pd.DataFrame({"config_hash": list(configs)})
    for k in keys:
        # a setting added after a trial ran is absent from its config: it had the default
        values = [_json_value(c.get(k, late.get(k))) for c in configs.values()]
        if len(set(values)) > 1:
            extras.append(k)
            table[k] = values
    return extras, table


def prepare(df: pd.DataFrame) -> StudyData:
    """Seed-level tables from the long results table (duplicate cells within a seed averaged)."""
    notes: list[str] = []
    d = df.copy()
    no_ssl = d["ssl_task"] == "none"
    if (no_ssl & (d["ssl_weight"] != 0)).any():
        notes.append("Trials with ssl_task = none have no SSL loss: they are shown as λ = 0.")
    d["ssl_weight"] = np.where(no_ssl, 0.0, d["ssl_weight"].astype(float))
    for c in ("ssl_weight", "eps_train", "eps_test"):
        d[c] = d[c].astype(float).round(10)
    extras, extra_table = _extra_factors(d)
    if extras:
        # a result column that is swept (e.g. label_noise) is taken from config_json like the others
        d = d.drop(columns=[c for c in extras if c in d.columns])
        d = d.merge(extra_table, on="config_hash", how="left")
        notes.append(
            "Config keys swept besides the standard factors (treated as factors, not averaged): "
            + ", ".join(extras)
            + "."
        )
    train_keys = list(CONFIG_COLUMNS) + extras
    for c in train_keys:
        if d[c].dtype == object or str(d[c].dtype) in ("str", "string"):
            d[c] = d[c].astype(object)
    d["seed"] = d["seed"].astype(int)
    kinds = results.row_kinds(d)  # trainables.row_kind: the one rule
    is_cor, is_ood, is_lf = kinds == CORRUPTION, kinds == OOD, kinds == LABEL_FREE
    # rows behind a test-time defence (trainables.defence) have their own figure (plot_defence)
    adv_raw = d[kinds == ROBUSTNESS].copy()
    cor_raw = d[is_cor].copy()
    adv_raw["norm"] = adv_raw["norm"].astype(object)
    cor_raw["corruption"] = cor_raw["corruption"].astype(object)
    cor_raw["severity"] = cor_raw["severity"].astype(int)

    def seed_level(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        if frame.empty:
            return pd.DataFrame(columns=keys + ["seed", "robust_acc", "clean_acc"])
        return (
            frame.groupby(keys + ["seed"], dropna=False, sort=True)[["robust_acc", "clean_acc"]]
            .mean()
            .reset_index()
        )

    adv = seed_level(adv_raw, train_keys + list(ADV_EVAL_COLUMNS))
    cor = seed_level(cor_raw, train_keys + list(CORRUPTION_EVAL_COLUMNS))
    clean = d[kinds != DEFENDED].groupby(train_keys + ["seed"], dropna=False, sort=True)["clean_acc"].mean().reset_index()
    ood_keys = train_keys + list(OOD_EVAL_COLUMNS)
    ood_raw = d[is_ood].copy()
    if ood_raw.empty:
        ood = pd.DataFrame(columns=ood_keys + ["seed", "value"])
    else:
        for c in OOD_EVAL_COLUMNS:
            ood_raw[c] = ood_raw[c].astype(object)
        ood = ood_raw.groupby(ood_keys + ["seed"], dropna=False, sort=True)["value"].mean().reset_index()
    lf_keys = train_keys + list(LABEL_FREE_EVAL_COLUMNS)
    lf_raw = d[is_lf].copy()
    if lf_raw.empty:
        label_free = pd.DataFrame(columns=lf_keys + ["seed", "value"])
    else:
        lf_raw["measure"] = lf_raw["measure"].astype(object)
        lf_raw["radius"] = (lf_raw["radius"].astype(float).round(10) if "radius" in lf_raw.columns
                            else math.nan)
        label_free = lf_raw.groupby(lf_keys + ["seed"], dropna=False, sort=True)["value"].mean().reset_index()
    return StudyData(df, adv, cor, clean, train_keys, extras, notes, ood, label_free)


def aggregate(seed_df: pd.DataFrame, keys: list[str], value: str = "robust_acc") -> pd.DataFrame:
    """Mean, 95% t CI and n_seeds of `value` per group of `keys` (one row per seed in seed_df)."""
    cols = list(keys) + ["mean", "ci95", "n_seeds", "seeds"]
    if seed_df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in seed_df.groupby(list(keys), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        m, ci, n = mean_ci(g[value].to_numpy(float))
        rows.append((*key, m, ci, n, ",".join(str(s) for s in sorted(g["seed"]))))
    return pd.DataFrame(rows, columns=cols)


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
# Formatting helpers
# ============================================================================================
def fmt_eps(v: Any) -> str:
    """ε as text: 8/255 for CIFAR-style fractions, else a short decimal."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    v = float(v)
    k = v * 255
    if abs(v - round(v, 4)) > 1e-9 and abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{v:g}"


def _fmt(v: Any, col: str = "") -> str:
    if v is None or v is pd.NA:
        return "—"
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "—"
        if col.startswith("eps") or col == "eps_test/eps_train":
            return fmt_eps(v)
        if col in ("ssl_weight", "λ"):
            return f"{v:g}"
        if col.startswith(("delta", "diff", "margin")):
            return f"{v:+.4f}"
        return f"{v:.4f}"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    return str(v)


def _label(col: str) -> str:
    return LABELS.get(col, col)


def _describe(values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        if k in ("attack_variant", "init", "norm") and isinstance(v, str):
            parts.append(v)
        elif k.startswith("eps"):
            parts.append(f"{_label(k)}={fmt_eps(v)}")
        else:
            parts.append(f"{_label(k)}={_fmt(v, k) if isinstance(v, float) else v}")
    return " · ".join(parts)


def _sort_key(t: tuple) -> tuple:
    return tuple((1, "") if (v is None or (isinstance(v, float) and math.isnan(v))) else (0, v) for v in t)


def _varying(frame: pd.DataFrame, cols: Iterable[str]) -> list[str]:
    return [c for c in cols if c in frame.columns and frame[c].astype(str).nunique(dropna=False) > 1]


def _lam_label(ssl_task: str, lam: float) -> str:
    return "no SSL task (λ=0)" if ssl_task == "none" else f"λ={lam:g}"


def _seed_label(ns: Iterable[int]) -> str:
    ns = [int(n) for n in ns if n]
    if not ns:
        return "no data"
    lo, hi = min(ns), max(ns)
    if hi <= 1:
        return ONE_SEED
    if lo == hi:
        return f"{lo} seeds"
    return f"{lo}-{hi} seeds" + (" (1-seed points: no band)" if lo == 1 else "")


class _Colors:
    def __init__(self, lams: Iterable[float]):
        import matplotlib

        lams = sorted(set(float(x) for x in lams))
        cmap = matplotlib.colormaps["viridis"]
        span = max(len(lams) - 1, 1)
        self.map = {lam: cmap(0.9 * i / span) for i, lam in enumerate(lams)}

    def __call__(self, ssl_task: str, lam: float):
        return "0.35" if ssl_task == "none" else self.map.get(float(lam), "k")


def _suptitle(fig: Figure, text: str, **kwargs) -> None:
    """The figure's title, wrapped to the figure's width (a one-panel figure is 5 in wide)."""
    import textwrap

    size = kwargs.get("fontsize", 10)
    width = max(20, int(fig.get_figwidth() * 140 / size))  # ~0.5 em per character
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), **kwargs)


def _new_figure(nrows: int, ncols: int, w: float = 4.3, h: float = 3.3, sharey: bool = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(w * ncols, 5.0), h * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg, without pyplot's global state
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    if sharey:  # same scale everywhere, but numbers on every panel (a neighbour may be empty)
        for ax in axes.flat:
            ax.yaxis.set_tick_params(labelleft=True)
    return fig, axes


def _adv_layout(train_keys: list[str]) -> tuple[list[str], list[str]]:
    col_f = list(PANEL_COLUMN_FACTORS)
    row_f = list(PANEL_ROW_FACTORS) + [k for k in train_keys
                                      if k not in CURVE_FACTORS and k not in col_f and k not in PANEL_ROW_FACTORS]
    return col_f, row_f


def _eps_ticks(ax, eps: list[float], dataset: str | None) -> None:
    eps = sorted(set(eps))
    if 1 < len(eps) <= 8:
        ax.set_xticks(eps)
        if dataset not in _MNIST_FAMILY:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_eps(v)))
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)


def _empty_panel(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_axis_off()  # not set_yticks([]): the y axis may be shared with the other panels


def _panel_layout(agg: pd.DataFrame, col_factors: list[str], row_factors: list[str]):
    cols = sorted({tuple(r) for r in agg[col_factors].itertuples(index=False)}, key=_sort_key)
    rows = sorted({tuple(r) for r in agg[row_factors].itertuples(index=False)}, key=_sort_key) if row_factors else [()]
    return cols, rows


def _panel_title(values: dict[str, Any], varying: set[str]) -> str:
    top = {k: v for k, v in values.items() if k in ALWAYS_IN_TITLE and k != "eps_train"}
    below = {k: v for k, v in values.items() if k == "eps_train" or (k in varying and k not in ALWAYS_IN_TITLE)}
    return _describe(top) + ("\n" + _describe(below) if below else "")


def _select(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for k, v in values.items():
        col = frame[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            mask &= col.isna().to_numpy()
        else:
            mask &= (col == v).to_numpy()
    return frame[mask]


# ============================================================================================
# Figures (each returns a matplotlib Figure, or None when there is nothing to draw)
# ============================================================================================
def _curve_order(kv):
    (task, lam), _ = kv
    return (float(lam), task != "none")


def _adv_panels(frame: pd.DataFrame, train_keys: list[str]):
    """The figure of the robustness panels (attack variant columns × init, norm, ε_train, ... rows)
    and an iterator over (axes, the panel's factor values), each panel already titled."""
    col_f, row_f = _adv_layout(train_keys)
    varying = set(_varying(frame, row_f))
    cols, rows = _panel_layout(frame, col_f, row_f)
    fig, axes = _new_figure(len(rows), len(cols), sharey=True)

    def panels():
        for i, rv in enumerate(rows):
            for j, cv in enumerate(cols):
                where = {**dict(zip(col_f, cv)), **dict(zip(row_f, rv))}
                axes[i, j].set_title(_panel_title(where, varying), fontsize=8)
                yield axes[i, j], where

    return fig, axes, panels()


def plot_robust_vs_eps(agg: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Robust accuracy vs ε_test, one curve per λ; a panel per attack variant (columns) × init ×
    norm × ε_train (× any other swept factor) (rows); dashed line at ε_train (when the panel's norm
    is the training norm); shaded 95% CI band where n ≥ 2 seeds."""
    if agg.empty:
        return None
    colors = _Colors(agg["ssl_weight"])
    fig, axes, panels = _adv_panels(agg, train_keys)
    for ax, where in panels:
        sel = _select(agg, where)
        if sel.empty:
            _empty_panel(ax, "no data")
            continue
        for (task, lam), c in sorted(sel.groupby(["ssl_task", "ssl_weight"]), key=_curve_order):
            c = c.sort_values("eps_test")
            x, y = c["eps_test"].to_numpy(float), c["mean"].to_numpy(float)
            ci = c["ci95"].to_numpy(float)
            color = colors(task, lam)
            label = f"{_lam_label(task, lam)}, {_seed_label(c['n_seeds'])}"
            ax.plot(x, y, marker="o", ms=3, lw=1.5, color=color, label=label,
                    ls="--" if task == "none" else "-")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.18, lw=0)
        if where["norm"] == where.get("norm_train"):
            et = where["eps_train"]
            ax.axvline(et, color="0.3", ls="--", lw=1, label="_eps_train")
            ax.annotate("ε_train", (et, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        color="0.3", ha="left", va="top", xytext=(2, -2), textcoords="offset points")
        _eps_ticks(ax, list(sel["eps_test"]), where.get("dataset"))
        ax.set_xlabel(f"ε_test ({where['norm']})", fontsize=8)
        ax.set_ylabel("robust accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    axes[0, 0].set_ylim(bottom=0)
    _suptitle(fig, "Robust accuracy vs ε_test (mean over seeds, shaded: 95% t-interval)", fontsize=10)
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
    colors = _Colors(agg["ssl_weight"])
    fig, axes, grid = _adv_panels(panels, train_keys)
    for ax, where in grid:
        if _select(panels, where).empty:
            _empty_panel(ax, "no data")
            continue
        sel = _select(delta, where) if not delta.empty else delta
        if sel.empty:
            _empty_panel(ax, NO_BASELINE)
            continue
        et = float(where["eps_train"])
        for (task, lam), c in sorted(sel.groupby(["ssl_task", "ssl_weight"]), key=_curve_order):
            c = c.sort_values("eps_test")
            x = c["eps_test"].to_numpy(float) / et
            y, ci = c["delta"].to_numpy(float), c["ci95"].to_numpy(float)
            color = colors(task, lam)
            ax.plot(x, y, marker="o", ms=3, lw=1.5, color=color,
                    label=f"{_lam_label(task, lam)} − λ=0, {_seed_label(c['n_seeds'])}")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.18, lw=0)
        ax.axhline(0, color="0.3", lw=1, label="_zero")
        ax.axvline(1, color="0.3", ls="--", lw=1, label="_eps_train")
        ax.set_xlabel("ε_test / ε_train", fontsize=8)
        ax.set_ylabel("Δ robust accuracy vs λ=0", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    _suptitle(fig, "Change in robust accuracy from the SSL loss (paired by seed, shaded: 95% t-interval)", fontsize=10)
    return fig


def plot_corruptions(agg_cor: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """Accuracy under each corruption (columns) against severity, one curve per λ; a row per
    training configuration."""
    if agg_cor.empty:
        return None
    col_f = ["corruption"]
    _, adv_rows = _adv_layout(train_keys)
    row_f = ["attack_variant"] + [k for k in adv_rows if k != "norm"]
    varying = set(_varying(agg_cor, row_f))
    cols, rows = _panel_layout(agg_cor, col_f, row_f)
    colors = _Colors(agg_cor["ssl_weight"])
    fig, axes = _new_figure(len(rows), len(cols), w=3.4, h=3.0, sharey=True)
    for i, rv in enumerate(rows):
        for j, cv in enumerate(cols):
            ax = axes[i, j]
            where = {**dict(zip(col_f, cv)), **dict(zip(row_f, rv))}
            sel = _select(agg_cor, where)
            below = {k: v for k, v in zip(row_f, rv) if k in varying or k in ("attack_variant", "init", "eps_train")}
            ax.set_title(cv[0] + "\n" + _describe(below), fontsize=8)
            if sel.empty:
                _empty_panel(ax, "no data")
                continue
            for (task, lam), c in sorted(sel.groupby(["ssl_task", "ssl_weight"]), key=_curve_order):
                c = c.sort_values("severity")
                x, y, ci = c["severity"].to_numpy(float), c["mean"].to_numpy(float), c["ci95"].to_numpy(float)
                color = colors(task, lam)
                ax.plot(x, y, marker="o", ms=3, color=color, label=f"{_lam_label(task, lam)}, {_seed_label(c['n_seeds'])}",
                        ls="--" if task == "none" else "-")
                if np.isfinite(ci).any():
                    ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.18, lw=0)
            ax.set_xticks(sorted(set(int(s) for s in sel["severity"])))
            ax.set_xlabel("severity", fontsize=8)
            ax.set_ylabel("accuracy", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
    _suptitle(fig, "Accuracy under natural corruptions (mean over seeds, shaded: 95% t-interval)", fontsize=10)
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
    panels = sorted({tuple(r) for r in table[panel_f].itertuples(index=False)}, key=_sort_key)
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, w=5.0, h=4.3)
    colors = _Colors(table["ssl_weight"])
    variants = sorted(set(table["attack_variant"]))
    marker = {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(variants)}
    label_f = [k for k in _varying(table, train_keys) if k not in panel_f] or ["attack_variant", "init", "ssl_weight"]
    for n, pv in enumerate(panels):
        ax = axes[n // ncols, n % ncols]
        sel = _select(table, dict(zip(panel_f, pv)))
        few = len(sel) <= 10
        for _, r in sel.iterrows():
            color = colors(r["ssl_task"], r["ssl_weight"])
            hollow = r["init"] == "ssl_pretrained"
            text = _describe({k: r[k] for k in label_f})
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
    _suptitle(fig, "Clean vs robust accuracy" + (f" ({ONE_SEED})" if one else " (bars: 95% t-intervals)"), fontsize=10)
    return fig


# ============================================================================================
# Tables
# ============================================================================================
def lambda_effect_table(data: StudyData) -> pd.DataFrame:
    """The seed paper's claim, per configuration and λ > 0: mean change in robust accuracy vs the
    λ=0 baseline averaged over ε_test < ε_train, at ε_test = ε_train, and over ε_test > ε_train,
    with 95% t-intervals over seeds (paired by seed where both exist). Only evaluations in the
    training norm (ε_test and ε_train must be comparable)."""
    keys = data.train_keys + ["norm"]
    idx = {k: i for i, k in enumerate(keys)}
    curves = _curves(data.adv, data.train_keys)
    out_cols = keys + ["baseline", "n_seeds", "paired"]
    for cat in ("below", "at", "above"):
        out_cols += [f"n_eps_{cat}", f"delta_{cat}", f"ci95_{cat}"]
    out_cols += ["direction", "claim"]
    rows = []
    for key, curve in curves.items():
        if key[idx["ssl_weight"]] == 0 or key[idx["norm"]] != key[idx["norm_train"]]:
            continue
        et = float(key[idx["eps_train"]])
        base_key = _baseline_key(key, keys, curves)
        if base_key is None:
            row = [*key, NO_BASELINE, 0, False] + [0, math.nan, math.nan] * 3 + ["", ""]
            rows.append(row)
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
        stats_by_cat, n_max, paired_any = {}, 0, True
        for cat, eps in cats.items():
            if not eps:
                stats_by_cat[cat] = (0, math.nan, math.nan)
                continue
            a = {s: float(np.mean([v[e] for e in eps])) for s, v in curve.items()}
            b = {s: float(np.mean([v[e] for e in eps])) for s, v in base.items()}
            m, ci, n, paired = diff_ci(a, b)
            n_max, paired_any = max(n_max, n), paired_any and paired
            stats_by_cat[cat] = (len(eps), m, ci)
        row += [n_max, paired_any]
        for cat in ("below", "at", "above"):
            row += list(stats_by_cat[cat])
        dirs = {c: _direction(stats_by_cat[c][1], stats_by_cat[c][2]) for c in cats}
        row.append(", ".join(f"{c}: {d}" for c, d in dirs.items() if d))
        row.append(_claim(dirs))
        rows.append(row)
    df = pd.DataFrame(rows, columns=out_cols)
    if not df.empty:
        df = df.sort_values(keys, key=lambda s: s.astype(str) if s.dtype == object else s, kind="stable")
    return df.reset_index(drop=True)


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
# Out-of-distribution detection and label corruption (only for studies that have them)
# ============================================================================================
_OOD_SET_ORDER = ("gaussian", "rademacher", "blobs", "mnist")
_SCORE_ORDER = ("msp", "rotation")


def _ordered(values: Iterable[Any], preferred: tuple[str, ...]) -> list[Any]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def _pm(mean: float, ci: float, digits: int = 3) -> str:
    """'mean ± ci' (just the mean when the interval is undefined, e.g. one seed)."""
    if mean is None or not np.isfinite(mean):
        return "—"
    if ci is None or not np.isfinite(ci):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


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
        _sort_key(tuple(table.iloc[i][k] for k in train_keys if k not in CURVE_FACTORS)),
        set_rank[table["ood_set"].iloc[i]], score_rank[table["score"].iloc[i]],
        float(table["ssl_weight"].iloc[i]), str(table["ssl_task"].iloc[i])))
    return table.iloc[order].reset_index(drop=True)


def ood_display(table: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """The OOD table with 'mean ± CI' cells (for Markdown and HTML; the CSV keeps the numbers)."""
    shown = table[list(train_keys) + ["ood_set", "score"]].copy()
    for m, title in (("auroc", "AUROC"), ("aupr", "AUPR-In"), ("fpr95", "FPR95")):
        shown[title] = [_pm(a, b) for a, b in zip(table[f"{m}_mean"], table[f"{m}_ci95"])]
    shown["n_seeds"] = table["n_seeds"].to_numpy()
    return shown


def defended_rows(df: pd.DataFrame) -> pd.Series:
    """Rows of a model behind a test-time defence (column `defence` set and not "none")."""
    return results.row_kinds(df) == DEFENDED


def _model_tasks(cfg: dict) -> list[str]:
    if cfg.get("ssl_tasks"):
        return [t for t in ("rotation", "contrastive", "inpainting") if t in cfg["ssl_tasks"]]
    task = cfg.get("ssl_task", "none")
    return [] if task == "none" else [task]


def defence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy against ε_test per trained model × defence × attack (plain or adaptive), mean and 95%
    t-interval over seeds; empty when the study has no defended rows. Only trials with a defence
    are shown, their undefended rows as defence "none"; ε_test = 0 starts both attack curves."""
    if not defended_rows(df).any():
        return pd.DataFrame()
    d = df[results.row_kinds(df).isin([ROBUSTNESS, DEFENDED])].copy()
    configs = {h: json.loads(t) for h, t in d.drop_duplicates("config_hash")[["config_hash", "config_json"]].itertuples(index=False)}
    keep = {h for h, c in configs.items() if c.get("defence", "none") != "none"}
    d = d[d["config_hash"].isin(keep)]
    rows = []
    for r in d.itertuples(index=False):
        cfg = configs[r.config_hash]
        defended = isinstance(r.defence, str) and r.defence != "none"
        model = "+".join(_model_tasks(cfg)) or "none"
        setting = f"{r.defence} ({'+'.join(cfg.get('defence_tasks') or _model_tasks(cfg))})" if defended else "none"
        attacks = ["plain", "adaptive"] if r.attack == "none" and defended else \
            ["adaptive" if r.attack == "pgd_adaptive" else "plain"]
        for attack in attacks:
            rows.append(dict(dataset=r.dataset, model=model, defence=setting, attack=attack, norm=r.norm,
                             eps_test=round(float(r.eps_test), 10), seed=int(r.seed), robust_acc=float(r.robust_acc)))
    seed_level = pd.DataFrame(rows).groupby(["dataset", "model", "defence", "attack", "norm", "eps_test", "seed"],
                                            sort=True)["robust_acc"].mean().reset_index()
    out = []
    for key, g in seed_level.groupby(["dataset", "model", "defence", "attack", "norm", "eps_test"], sort=True):
        mean, ci, n = mean_ci(g["robust_acc"])
        out.append(dict(zip(["dataset", "model", "defence", "attack", "norm", "eps_test"], key),
                        mean=mean, ci95=ci, n_seeds=n))
    return pd.DataFrame(out)


def plot_defence(table: pd.DataFrame) -> Figure | None:
    """Accuracy against ε_test, a panel per dataset × norm, a colour per trained model × defence;
    solid: the plain attack (unaware of the defence), dashed: the adaptive attack."""
    if table.empty:
        return None
    panels = sorted(table.groupby(["dataset", "norm"]).groups)
    fig, axes = _new_figure(1, len(panels), w=6.5, h=5.0)
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
        _eps_ticks(ax, sorted(set(sel["eps_test"])), dataset)
        ax.set_title(f"{dataset}, {norm}", fontsize=9)
        ax.set_xlabel("ε_test (attack strength)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    _suptitle(fig, "Test-time SSL-reversal defence\nsolid: plain PGD, dashed: adaptive PGD", fontsize=10)
    return fig


def plot_ood_auroc(agg_ood: pd.DataFrame, train_keys: list[str]) -> Figure | None:
    """AUROC per OOD set (groups of bars), a bar per λ, one panel per score (columns) × any other
    swept factor (rows); error bars: 95% t-interval over seeds; dotted line: chance (0.5)."""
    sel_all = agg_ood[agg_ood["measure"] == "auroc"] if not agg_ood.empty else agg_ood
    if sel_all.empty:
        return None
    scores = _ordered(sel_all["score"], _SCORE_ORDER)
    sets = _ordered(sel_all["ood_set"], _OOD_SET_ORDER)
    row_f = [k for k in _varying(sel_all, train_keys) if k not in CURVE_FACTORS]
    rows = sorted({tuple(r) for r in sel_all[row_f].itertuples(index=False)}, key=_sort_key) if row_f else [()]
    bars = sorted({(t, float(w)) for t, w in zip(sel_all["ssl_task"], sel_all["ssl_weight"])},
                  key=lambda b: (b[1], b[0] != "none"))
    colors = _Colors(sel_all["ssl_weight"])
    fig, axes = _new_figure(len(rows), len(scores), w=max(4.3, 1.2 * len(sets) + 1.5), sharey=True)
    width = 0.8 / max(len(bars), 1)
    x = np.arange(len(sets))
    for i, rv in enumerate(rows):
        for j, score in enumerate(scores):
            ax = axes[i, j]
            where = dict(zip(row_f, rv))
            sel = _select(sel_all[sel_all["score"] == score], where)
            ax.set_title(f"score: {score}" + (f"\n{_describe(where)}" if where else ""), fontsize=8)
            if sel.empty:
                _empty_panel(ax, "no data")
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
                       color=colors(task, lam), label=f"{_lam_label(task, lam)}, {_seed_label(c['n_seeds'])}")
            ax.axhline(0.5, color="0.4", ls=":", lw=1, label="_chance")
            ax.set_xticks(x)
            ax.set_xticklabels(sets, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("AUROC (in-distribution vs OOD)", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6.5, loc="lower right")
    _suptitle(fig, "OOD detection: AUROC per OOD set (mean over seeds, bars: 95% t-interval)", fontsize=10)
    return fig


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
# ============================================================================================
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
        _sort_key(tuple(table.iloc[i][k] for k in train_keys if k not in CURVE_FACTORS)),
        float(table["ssl_weight"].iloc[i]), str(table["ssl_task"].iloc[i])))
    return table.iloc[order].reset_index(drop=True)


def label_free_display(table: pd.DataFrame, train_keys: list[str]) -> pd.DataFrame:
    """The label-free table with 'mean ± CI' cells (Markdown and HTML; the CSV keeps the numbers)."""
    shown = table[list(train_keys)].copy()
    measures = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    for m in measures:
        shown[m] = [_pm(a, b) for a, b in zip(table[f"{m}_mean"], table[f"{m}_ci95"])]
    shown["n_seeds"] = table["n_seeds"].to_numpy()
    return shown


def _radius_figure_layout(sel_all: pd.DataFrame, train_keys: list[str]):
    """What the figures against an l2 radius (certified accuracy, center smoothing) share: the
    factors that make rows of panels, those rows, and `draw(ax, rows_of_one_panel)`, which draws one
    line per (task, λ, variant) of mean against `radius` with its 95% band."""
    curve_f = ["ssl_task", "ssl_weight", "attack_variant"]
    row_f = [k for k in _varying(sel_all, train_keys) if k not in curve_f]
    rows = sorted({tuple(r) for r in sel_all[row_f].itertuples(index=False)}, key=_sort_key) if row_f else [()]
    colors = _Colors(sel_all["ssl_weight"])
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
                    label=f"{_lam_label(task, lam)}, {variant}, {_seed_label(c['n_seeds'])}")
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
    fig, axes = _new_figure(len(rows), 1, w=7.0, h=4.0, sharey=True)
    for i, rv in enumerate(rows):
        ax = axes[i, 0]
        where = dict(zip(row_f, rv))
        sel = _select(sel_all, where)
        ax.set_title(_describe(where) if where else "certified accuracy (randomized smoothing)", fontsize=8)
        draw(ax, sel)
        ax.set_xlabel("l2 radius r", fontsize=8)
        ax.set_ylabel("certified accuracy at r", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
    _suptitle(fig, "Randomized smoothing: certified accuracy against radius\n(mean over seeds, shaded: 95% t-interval)",
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
    fig, axes = _new_figure(len(rows), len(panels), w=4.3, h=3.4)
    for i, rv in enumerate(rows):
        where = dict(zip(row_f, rv))
        sel = _select(sel_all, where)
        for j, (measure, ylabel) in enumerate(panels):
            ax = axes[i, j]
            part = sel[sel["measure"] == measure]
            ax.set_title((_describe(where) + "\n" if where else "") + ylabel, fontsize=8)
            if part.empty:
                _empty_panel(ax, "every image abstained")
                continue
            draw(ax, part)
            ax.set_xlabel("l2 input radius ε", fontsize=8)
            if measure == "center_smoothing_abstain_rate":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6.5, loc="best")
    _suptitle(fig, "Center smoothing: certified bound on the representation's movement against ε\n"
                   "(mean over seeds of the mean over certified images, shaded: 95% t-interval)", fontsize=10)
    return fig


def _label_noise_display(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.drop(columns=["mean", "ci95", "seeds", "delta_vs_p0", "delta_ci95", "n_seeds"]).copy()
    shown["label_noise"] = [f"{p:g}" for p in table["label_noise"]]
    shown["clean test accuracy"] = [_pm(m, c) for m, c in zip(table["mean"], table["ci95"])]
    shown["change vs p=0"] = [
        "—" if not np.isfinite(m) else ("+" if m >= 0 else "") + _pm(m, c)
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
    row_f = [k for k in _varying(table, train_keys) if k not in curve_f and k != "label_noise"]
    rows = sorted({tuple(r) for r in table[row_f].itertuples(index=False)}, key=_sort_key) if row_f else [()]
    colors = _Colors(table["ssl_weight"])
    fig, axes = _new_figure(len(rows), 1, w=7.0, h=4.0, sharey=True)
    for i, rv in enumerate(rows):
        ax = axes[i, 0]
        where = dict(zip(row_f, rv))
        sel = _select(table, where)
        ax.set_title(_describe(where) if where else "clean test accuracy under label corruption", fontsize=8)
        curves = sorted(sel.groupby(curve_f, dropna=False), key=lambda kv: (float(kv[0][1]), kv[0][0] != "none", str(kv[0][2])))
        for (task, lam, init), c in curves:
            c = c.sort_values("label_noise")
            x, y, ci = (c[k].to_numpy(float) for k in ("label_noise", "mean", "ci95"))
            color = colors(task, lam)
            pre = init == "ssl_pretrained"
            ax.plot(x, y, marker="s" if pre else "o", ms=3.5, lw=1.5, color=color, ls="--" if pre else "-",
                    label=f"{_lam_label(task, lam)}, {init}, {_seed_label(c['n_seeds'])}")
            if np.isfinite(ci).any():
                ax.fill_between(x, y - ci, y + ci, color=color, alpha=0.15, lw=0)
        ax.set_xticks(sorted(set(float(p) for p in sel["label_noise"])))
        ax.set_xlabel("fraction of training labels corrupted (p)", fontsize=8)
        ax.set_ylabel("clean test accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    _suptitle(fig, "Label corruption: clean test accuracy against p\n(mean over seeds, shaded: 95% t-interval)",
              fontsize=10)
    return fig


def _display(df: pd.DataFrame, keep: Iterable[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Drop factor columns constant across the table (returned separately) and format values."""
    factors = [c for c in df.columns if c in set(CONFIG_COLUMNS) | {"norm", "dataset"} or c in keep]
    fixed = {}
    if len(df) > 1:
        for c in factors:
            if df[c].astype(str).nunique(dropna=False) == 1 and c not in ("ssl_weight", "eps_test"):
                fixed[c] = df[c].iloc[0]
    shown = df.drop(columns=list(fixed))
    text = pd.DataFrame({_label(c): [_fmt(v, c) for v in shown[c]] for c in shown.columns})
    return text, fixed


def to_markdown(text: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in text.columns) + " |", "|" + "---|" * len(text.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ============================================================================================
# The report
# ============================================================================================
@dataclass
class _Section:
    name: str
    title: str
    caption: str
    png: str | None = None
    svg: str | None = None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _default_out_dir(storage: str, study: str) -> Path:
    storage = str(storage)
    if storage.startswith("file://"):
        return Path(storage[len("file://"):]) / "reports" / study
    if "://" in storage:
        return Path("reports") / study
    return Path(storage) / "reports" / study


def _default_spec_text(study: str) -> str | None:
    base = Path(__file__).resolve().parents[1] / "studies"
    for suffix in (".yaml", ".yml"):
        p = base / f"{study}{suffix}"
        if p.is_file():
            return p.read_text(encoding="utf-8")
    return None


def _missing_cells(expected: dict[str, dict], present: set[str]) -> pd.DataFrame:
    missing = sorted(set(expected) - present)
    if not missing:
        return pd.DataFrame(columns=["config_hash"])
    configs = {h: (expected[h] or {}) for h in expected}
    keys = sorted({k for c in configs.values() for k in c})
    varying = [k for k in keys if len({_json_value(c.get(k)) for c in configs.values()}) > 1]
    return pd.DataFrame(
        [{"config_hash": h, **{k: _json_value(configs[h].get(k)) for k in varying}} for h in missing]
    )


def _write_table(out: Path, study: str, name: str, title: str, caption: str, table: pd.DataFrame,
                 text: pd.DataFrame, fixed: dict, table_html: list[str]) -> list[str]:
    """Write a report table as `<name>.md` (the displayed `text`, with the values `fixed` across it)
    and `<name>.csv` (the full `table`), append its HTML section; return the two paths."""
    fixed_txt = "; ".join(f"{_label(k)} = {_fmt(v, k)}" for k, v in fixed.items())
    md = f"# {title} (study {study})\n\n{caption}\n\n" + (f"Fixed: {fixed_txt}\n\n" if fixed_txt else "") + to_markdown(text)
    (out / f"{name}.md").write_text(md, encoding="utf-8")
    table.to_csv(out / f"{name}.csv", index=False)
    table_html.append(
        f"<h3 id='{name}'>{html.escape(title)}</h3><p class='caption'>{html.escape(caption)}</p>"
        + (f"<p class='fixed'>Fixed: {html.escape(fixed_txt)}</p>" if fixed_txt else "")
        + text.to_html(index=False, escape=True, border=0, classes="t")
        + f"<p class='files'>{name}.csv · {name}.md</p>"
    )
    return [str(out / f"{name}.md"), str(out / f"{name}.csv")]


def build_report(
    study: str,
    storage: str = "runs",
    out_dir: str | None = None,
    spec_text: str | None = None,
    expected_hashes: dict[str, dict] | None = None,
    table=None,
    evaluation: str | None = None,
    evaluation_note: str | None = None,
    aliases: dict[str, list[dict]] | None = None,
) -> ReportFiles:
    """Rebuild the report of `study` from its Parquet results (`table`: those results already read
    by `results.load`); returns the files written. The report shows one evaluation of the models:
    the trials' own (`evaluation` None, in reports/STUDY/), or the re-evaluation with that
    eval_hash (orchestrator.evaluate; in reports/STUDY/eval-HASH/, `evaluation_note` says how)."""
    df = results.load(study, storage) if table is None else table
    others = sorted(set(df["eval_hash"].dropna())) if evaluation is None and "eval_hash" in df.columns else []
    df = results.evaluation_rows(df, evaluation)  # evaluations of one model are never averaged together
    if df.empty:
        raise ReportError(
            f"no results for study '{study}' in {results.study_dir(storage, study)}: "
            "run the study first, or pass the right --storage"
        )
    replication: list[str] = []
    if expected_hashes is None and spec_text is None:  # a rebuild: the grid of the last invocation
        grid = results.read_grid(storage, study)
        if grid is not None:
            expected_hashes = grid.get("cells") or None
            spec_text = grid.get("spec_text")
            aliases = grid.get("aliases") or None
            replication = grid.get("replication") or []
    # cells of the grid that are the same experiment are shown under each of their names
    df = results.with_aliases(df, aliases)
    out = Path(out_dir) if out_dir else _default_out_dir(storage, study)
    if evaluation is not None and not out_dir:
        out = out / f"eval-{evaluation}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create report directory {out}: {exc.strerror or exc}") from None
    if spec_text is None:
        spec_text = _default_spec_text(study)

    data = prepare(df)
    notes = list(data.notes)
    notes.extend(replication)  # adaptive replication: seeds per cell and why (orchestrator.replication)
    if aliases:
        notes.append(f"{sum(len(a) for a in aliases.values())} cell(s) of the grid are the same experiment as another "
                     "(e.g. λ = 0 under the 'ce' and 'joint' variants, or any variant at ε_train = 0): each was "
                     "trained once and is shown under every name.")
    if evaluation_note:
        notes.insert(0, evaluation_note)
    if others:
        notes.insert(0, f"The kept models were evaluated again ({len(others)} re-evaluation(s), "
                        f"python -m orchestrator.evaluate); this report shows the trials' own evaluation, the "
                        f"others are in the folder(s) " + ", ".join(f"eval-{h}/" for h in others) + " of this one.")
    tk = data.train_keys
    agg_adv = aggregate(data.adv, tk + list(ADV_EVAL_COLUMNS))
    agg_cor = aggregate(data.cor, tk + list(CORRUPTION_EVAL_COLUMNS))
    clean_agg = aggregate(data.clean, tk, value="clean_acc")
    agg_ood = aggregate(data.ood, tk + list(OOD_EVAL_COLUMNS), value="value")
    agg_lf = aggregate(data.label_free, tk + list(LABEL_FREE_EVAL_COLUMNS), value="value")

    seed_counts = [a["n_seeds"] for a in (agg_adv, agg_cor, agg_ood, agg_lf) if len(a)]
    n_max = int(max((c.max() for c in seed_counts), default=0))
    n_min = int(min((c.min() for c in seed_counts), default=0))
    if n_max <= 1:
        notes.append(f"Only 1 seed per configuration ({ONE_SEED}s or intervals; a CI needs ≥ 2 seeds).")
    elif n_min == 1:
        k = int((clean_agg["n_seeds"] == 1).sum())
        notes.append(f"{k} configuration(s) have only 1 seed: no confidence band or interval for them.")

    attack_text = report_attacks.attack_description(df)
    notes.append(attack_text)
    notes += report_attacks.masking_warnings(df)

    delta, no_base = delta_table(data)
    if no_base:
        idx = {k: i for i, k in enumerate(tk + ["norm"])}
        descr = sorted({_describe({k: key[i] for k, i in idx.items() if k in ("attack_variant", "init", "norm", "eps_train", "ssl_weight")}) for key in no_base})
        notes.append(f"{NO_BASELINE} for {len(no_base)} curve(s) (not in the Δ figure or the λ-effect table): " + "; ".join(descr[:12]) + ("; …" if len(descr) > 12 else ""))
    if not agg_adv.empty and (agg_adv["eps_train"] == 0).any():
        notes.append("ε_train = 0 (standard training) is skipped in the Δ vs λ=0 figure: ε_test/ε_train is undefined.")
    if not agg_adv.empty and (agg_adv["norm"] != agg_adv["norm_train"]).any():
        notes.append("Evaluations in a norm other than the training norm appear in the robust-accuracy figure only "
                     "(ε_test and ε_train are not comparable across norms).")

    # ---- figures
    sections: list[_Section] = []
    figure_paths: list[str] = []
    cvr = clean_vs_robust_table(data)
    figures = [
        ("robust_vs_eps", "Robust accuracy vs ε_test", plot_robust_vs_eps(agg_adv, tk),
         "One curve per λ; dashed vertical line: ε_train. Shaded: 95% t-interval over seeds."),
        ("delta_vs_lambda0", "Change vs λ = 0", plot_delta_vs_lambda0(delta, agg_adv, tk),
         "Robust accuracy minus the λ=0 curve of the same configuration, paired by seed, against "
         "ε_test/ε_train. Kucer et al.: above 0 left of 1, below 0 right of 1, more so for larger λ. "
         "ε_train = 0 is skipped."),
        ("corruptions", "Natural corruptions", plot_corruptions(agg_cor, tk),
         "Accuracy under each corruption against severity, one curve per λ."),
        ("clean_vs_robust", "Clean vs robust accuracy", plot_clean_vs_robust(cvr, tk),
         "Each point one configuration; robust accuracy at ε_test = ε_train (the nearest grid point above "
         "ε_train when it is not on the grid)."),
    ]
    # OOD detection and label corruption: only for studies that have such results
    noise_table = label_noise_table(data)
    figures += [
        ("ood_auroc", "Out-of-distribution detection", plot_ood_auroc(agg_ood, tk),
         "AUROC of telling in-distribution test images from each OOD set (in-distribution positive), a bar "
         "per λ, a panel per score (msp: maximum softmax probability; rotation: −KL(U‖softmax) + mean "
         "rotation-prediction loss over the four rotations). Dotted: chance. Bars: 95% t-interval over seeds."),
        ("label_noise", "Label corruption", plot_label_noise(noise_table, tk),
         "Clean test accuracy (test labels are never corrupted) against the fraction p of training labels "
         "replaced by a random other class; one curve per λ × init (dashed: SSL pre-trained). "
         "Shaded: 95% t-interval over seeds."),
        ("defence", "Test-time defence: SSL reversal", plot_defence(defence_table(df)),
         "Accuracy against ε_test of the models of trials evaluated with a test-time defence: defence none "
         "(the same model undefended) vs SSL reversal with the model's SSL tasks. Solid: the plain PGD "
         "(attacks the undefended model, then the defence runs); dashed: the adaptive PGD (maximises "
         "CE − λ_S·SSL, so the attacked image also looks natural to the SSL tasks). Such defences are not "
         "eligible for RobustBench's standard AutoAttack protocol (see README). Shaded: 95% t-interval over seeds."),
        ("certified_accuracy", "Label-free robustness: certified accuracy", plot_certified_accuracy(agg_lf, tk),
         "Randomized smoothing (Cohen et al. 2019, CERTIFY): the fraction of test images the smoothed "
         "classifier predicts correctly with a certified l2 radius of at least r; one curve per λ × attack "
         "variant. Shaded: 95% t-interval over seeds."),
        ("center_smoothing", "Label-free robustness: center smoothing", plot_center_smoothing(agg_lf, tk),
         "Center smoothing of the representation (Kumar and Goldstein 2021): for each l2 input radius ε, a "
         "bound, certified with probability 1 − α, on how far the smoothed representation can move, in l2 "
         "(left) and over the median distance between clean representations of distinct test images "
         "(middle), averaged over the images not abstained on; right: the fraction abstained on (the "
         "centre failed its check, or ε is too large for the samples). One curve per λ × attack variant. "
         "Shaded: 95% t-interval over seeds."),
    ]
    for name, title, fig, caption in figures:
        if fig is None:
            continue
        if name in ROBUSTNESS_SECTIONS:
            caption += " " + attack_text
        if n_max <= 1:
            caption += f" {ONE_SEED}."
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        fig.savefig(png, dpi=110)
        fig.set_layout_engine("none")  # keep the layout just computed: the SVG need not redo it
        fig.savefig(svg)
        figure_paths += [str(png), str(svg)]
        sections.append(_Section(name, title, caption, str(png), str(svg)))
    if agg_cor.empty:
        notes.append("No corruption results in this study (no corruption figure).")

    # ---- tables
    table_paths: list[str] = []
    tables: list[tuple[str, str, str, pd.DataFrame]] = [
        ("lambda_effect", "Effect of the SSL loss (λ) vs λ = 0",
         "Mean change in robust accuracy vs the λ=0 baseline, averaged over ε_test below ε_train, at ε_train, "
         "and above ε_train, with 95% t-intervals over seeds (paired by seed). direction: higher/lower when the "
         "interval excludes 0, n.s. otherwise. claim: Kucer et al. (higher below ε_train, lower above).",
         lambda_effect_table(data)),
        ("best_variant", "Best attack variant",
         "At each norm × ε_test (other factors fixed), the variant with the highest mean robust accuracy and the runner-up.",
         best_variant_table(agg_adv, tk)),
        ("pretrain_vs_scratch", "SSL pre-training vs scratch",
         "Robust accuracy of ssl_pretrained minus scratch, paired by seed, with 95% t-intervals.",
         pretrain_vs_scratch_table(data)),
    ]
    empty_reason = {
        "lambda_effect": "no configuration with λ > 0 evaluated in its training norm",
        "best_variant": "only one attack variant per configuration in this study",
        "pretrain_vs_scratch": "needs both init = scratch and init = ssl_pretrained",
    }
    table_html: list[str] = []
    for name, title, caption, table in tables:
        if name in ROBUSTNESS_SECTIONS:
            caption += " " + attack_text
        if table.empty:
            table_html.append(f"<h3>{html.escape(title)}</h3><p class='note'>Not available: {html.escape(empty_reason[name])}.</p>")
            continue
        text, fixed = _display(table, keep=data.extras)
        table_paths += _write_table(out, study, name, title, caption, table, text, fixed, table_html)
    # intervals over seeds and test examples, the same as the end-of-run table's (orchestrator.summary)
    extra_tables = interval_report_tables(df, _varying(data.adv, tk)) + [
        ("robustbench", "RobustBench-style summary",
         "One line per configuration at ε_test = ε_train, in RobustBench's field names: clean_acc and "
         "autoattack_acc (mean over seeds; empty unless the study ran eval_attack=autoattack), plus the "
         "study's own robust accuracy and the attack that produced it.",
         report_attacks.robustbench_table(df), lambda t: t),
        ("attack_breakdown", "Which attack fooled each example",
         "Per configuration × ε_test, summed over seeds: the examples each attack fooled first (the attacks "
         "run in the order of the columns, each on the examples the earlier ones and the smaller ε left "
         "robust), as AutoAttack's own log counts them. " + attack_text,
         report_attacks.breakdown_table(df), lambda t: t),
        ("ood", "Out-of-distribution detection",
         "Per λ × OOD set × score: AUROC, AUPR (in-distribution as positive, as in Hendrycks' code) and FPR "
         "at 95% TPR (the fraction of OOD images accepted when 95% of test images are), mean ± 95% t-interval "
         "over seeds. Higher AUROC/AUPR and lower FPR95 are better.",
         ood_table(agg_ood, tk), lambda t: ood_display(t, tk)),
        ("label_noise", "Label corruption: clean test accuracy",
         "Per configuration and label-noise fraction p: clean test accuracy, mean ± 95% t-interval over seeds, "
         "and its change from p = 0 of the same configuration (paired by seed).",
         noise_table, _label_noise_display),
        ("label_free", "Label-free robustness of the representation",
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
         label_free_table(agg_lf, tk), lambda t: label_free_display(t, tk)),
    ]
    for name, title, caption, table, display in extra_tables:
        if table.empty:
            continue  # not an OOD / label-noise study: nothing to say
        text, fixed = _display(display(table), keep=data.extras)
        table_paths += _write_table(out, study, name, title, caption, table, text, fixed, table_html)
    # the full aggregate (CSV and Markdown only, linked from the HTML)
    full = pd.concat([agg_adv.assign(kind="adversarial"), agg_cor.assign(kind="corruption")], ignore_index=True)
    full = full.merge(clean_agg[tk + ["mean", "ci95"]].rename(columns={"mean": "clean_mean", "ci95": "clean_ci95"}),
                      on=tk, how="left")
    full = full[["kind"] + tk + ["norm", "eps_test", "corruption", "severity", "mean", "ci95", "n_seeds", "seeds",
                                 "clean_mean", "clean_ci95"]]
    full.to_csv(out / "aggregate.csv", index=False)
    (out / "aggregate.md").write_text(
        f"# All cells, mean over seeds (study {study})\n\n" + to_markdown(_display(full, keep=data.extras)[0]), encoding="utf-8"
    )
    table_paths += [str(out / "aggregate.md"), str(out / "aggregate.csv")]

    # ---- missing cells
    present = set(df["config_hash"])
    missing_html = ""
    if expected_hashes is not None:
        missing = _missing_cells(expected_hashes, present)
        extra = sorted(present - set(expected_hashes))
        if missing.empty:
            missing_html = f"<p>All {len(expected_hashes)} expected cells have results.</p>"
        else:
            notes.append(f"Partial study: {len(missing)} of {len(expected_hashes)} expected cells are missing (listed below).")
            missing_html = (f"<p><b>{len(missing)} of {len(expected_hashes)} expected cells are missing</b> "
                            "(re-run the study to fill them):</p>" + missing.to_html(index=False, border=0, classes="t"))
        if extra:
            missing_html += (f"<p class='note'>{len(extra)} result file(s) belong to no expected cell "
                             f"(an older version of the study spec?): {html.escape(', '.join(extra[:20]))}</p>")

    html_path = out / "report.html"
    html_path.write_text(
        _html(study, storage, df, data, sections, table_html, notes, missing_html, spec_text, n_min, n_max),
        encoding="utf-8",
    )
    return ReportFiles(str(html_path), figure_paths, table_paths)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table.t{border-collapse:collapse;font-size:12px;margin:.5em 0} table.t th,table.t td{padding:3px 7px;
border-bottom:1px solid #e4e4e4;text-align:right} table.t th{background:#f4f4f4}
.note,.caption,.fixed,.files{color:#555;font-size:13px} .notes li{margin:.2em 0}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
"""


def _html(study, storage, df, data, sections, table_html, notes, missing_html, spec_text, n_min, n_max) -> str:
    esc = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    n_trials = df["config_hash"].nunique()
    seeds = sorted(int(s) for s in df["seed"].unique())
    n_configs = len(data.clean.drop_duplicates(data.train_keys)) if not data.clean.empty else 0
    shas = df.drop_duplicates("config_hash")["git_sha"].dropna()
    seeds_txt = f"{n_min}" if n_min == n_max else f"{n_min}-{n_max}"
    facts = [
        ("study", study),
        ("storage", results.study_dir(storage, study)),
        ("trials (result files)", str(n_trials)),
        ("configurations (without seed)", str(n_configs)),
        ("seeds per configuration", seeds_txt + (f" — {ONE_SEED}" if n_max <= 1 else "")),
        ("seeds", ", ".join(map(str, seeds))),
        ("result rows", str(len(df))),
        ("last trial finished", str(df["finished_at"].max())),
        ("code versions (git_sha: trials)",
         ", ".join(f"{s}: {c}" for s, c in shas.value_counts().items()) or "not recorded"),
        ("nodes", str(df["node_id"].nunique())),
        ("generated", now),
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Study {esc(study)} — sslrobust report</title><style>{_CSS}</style></head><body>",
        f"<h1>Study <code>{esc(study)}</code></h1>",
        "<table class='t'>" + "".join(f"<tr><th>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>" for k, v in facts) + "</table>",
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if missing_html:
        parts.append("<h2>Missing cells</h2>" + missing_html)
    parts.append("<h2>Figures</h2>")
    for s in sections:
        b64 = base64.b64encode(Path(s.png).read_bytes()).decode("ascii")
        parts.append(
            f"<figure id='{s.name}'><h3>{esc(s.title)}</h3><img alt='{esc(s.title)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption class='caption'>{esc(s.caption)} (files: {s.name}.png, {s.name}.svg)</figcaption></figure>"
        )
    parts.append("<h2>Tables</h2>" + "".join(table_html))
    parts.append("<p class='files'>All cells with means, CIs and seeds: aggregate.csv · aggregate.md</p>")
    parts.append("<h2>Study specification</h2>")
    parts.append(f"<pre>{esc(spec_text)}</pre>" if spec_text else "<p class='note'>No study spec file found.</p>")
    parts.append("<h2>Software</h2><table class='t'>"
                 + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _versions().items()) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ============================================================================================
# CLI
# ============================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.report",
        description="Rebuild a study's report (figures, tables, report.html) from its Parquet results.",
    )
    parser.add_argument("study", metavar="NAME", help="study name")
    parser.add_argument("--storage", default="runs", help="results root: local path or URI (default: runs)")
    parser.add_argument("--out", default=None, help="output directory (default: STORAGE/reports/NAME)")
    parser.add_argument("--eval-hash", default=None, help="the report of that re-evaluation of the kept "
                        "models (python -m orchestrator.evaluate; default: the trials' own evaluation), "
                        "in STORAGE/reports/NAME/eval-HASH")
    args = parser.parse_args(argv)
    try:
        files = build_report(args.study, storage=args.storage, out_dir=args.out, evaluation=args.eval_hash)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(files.html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
