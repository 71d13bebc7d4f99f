"""The report's numbers, without any plotting: Student-t intervals over seeds, the seed-level tables
of a study's results and their aggregation, and the row selections the analyses share.

`summary` (the end-of-run tables) imports this module alone, so it must never import matplotlib.

Every number is a mean over seeds with a 95% confidence interval from Student's t
(t_{0.975, n-1} * sd / sqrt(n)); with one seed the interval is NaN. Configurations are grouped by
every config factor except the seed: the result columns (CONFIG_COLUMNS) plus any other config key
that takes more than one value in the study (read from config_json), so a sweep over e.g. `epochs`
is never averaged as if it were seeds. A trial with ssl_task "none" has no SSL loss whatever its
ssl_weight says, so it counts as λ = 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy.special import stdtrit  # Student t quantiles; scipy.stats costs >1 s to import

from orchestrator.result_schema import row_kinds
from trainables.records import CORRUPTION, DEFENDED, LABEL_FREE, OOD, ROBUSTNESS

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
CORRUPTION_EVAL_COLUMNS = ("corruption", "severity")
# Config keys that decide which rows a trial has (or how fast it runs), not the value of a row.
NOT_FACTORS = frozenset(
    {"seed", "eval_batch_size", "eval_norms", "eval_eps_linf", "eval_eps_l2", "corruptions", "corruption_severities",
     "ood_sets", "ood_scores", "label_free_eval", "center_smoothing_eps"}
)
OOD_EVAL_COLUMNS = ("ood_set", "score", "measure")
LABEL_FREE_EVAL_COLUMNS = ("measure", "radius")
# Factors that never define panels or table groups of their own (curves are per λ).
CURVE_FACTORS = ("ssl_task", "ssl_weight")


# ============================================================================================
# Intervals
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


# ============================================================================================
# Seed-level tables
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
    # the robustness rows behind `adv`, one per trial and ε_test, with their per-example `correct`
    # bits: what intervals over seeds and test examples are computed from (orchestrator.intervals)
    adv_rows: pd.DataFrame = field(default_factory=pd.DataFrame)


def json_value(v: Any) -> str:
    """A config value as comparable text (strings as they are, everything else as sorted JSON)."""
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
        values = [json_value(c.get(k, late.get(k))) for c in configs.values()]
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
    kinds = row_kinds(d)  # trainables.records: the one rule
    is_cor, is_ood, is_lf = kinds == CORRUPTION, kinds == OOD, kinds == LABEL_FREE
    # rows behind a test-time defence (trainables.defence) have their own figure (report.defence)
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
    return StudyData(df, adv, cor, clean, train_keys, extras, notes, ood, label_free, adv_raw)


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



# ============================================================================================
# Row selection
# ============================================================================================
def sort_key(t: tuple) -> tuple:
    """A sort key for a tuple of factor values that puts missing values (None, NaN) last."""
    return tuple((1, "") if (v is None or (isinstance(v, float) and math.isnan(v))) else (0, v) for v in t)


def varying(frame: pd.DataFrame, cols: Iterable[str]) -> list[str]:
    """The columns of `cols` in `frame` that take more than one value."""
    return [c for c in cols if c in frame.columns and frame[c].astype(str).nunique(dropna=False) > 1]


def select_rows(frame: pd.DataFrame, values: dict[str, Any]) -> pd.DataFrame:
    """The rows of `frame` with column == value for every item of `values` (None/NaN match missing)."""
    mask = np.ones(len(frame), dtype=bool)
    for k, v in values.items():
        col = frame[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            mask &= col.isna().to_numpy()
        else:
            mask &= (col == v).to_numpy()
    return frame[mask]


def defended_rows(df: pd.DataFrame) -> pd.Series:
    """Rows of a model behind a test-time defence (column `defence` set and not "none")."""
    return row_kinds(df) == DEFENDED


def _model_tasks(cfg: dict) -> list[str]:
    if cfg.get("ssl_tasks"):
        return [t for t in ("rotation", "contrastive", "inpainting") if t in cfg["ssl_tasks"]]
    task = cfg.get("ssl_task", "none")
    return [] if task == "none" else [task]


def defence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy against ε_test per trained model × defence × attack (plain or adaptive), mean and 95%
    t-interval over seeds; empty when the study has no defended rows. Only trials with a defence
    are shown, their undefended rows as defence "none"; ε_test = 0 starts both attack curves.
    Here, not with the defence figure, because the end-of-run summary prints it too."""
    if not defended_rows(df).any():
        return pd.DataFrame()
    d = df[row_kinds(df).isin([ROBUSTNESS, DEFENDED])].copy()
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
