"""What produced a report's robustness numbers: the attack named in every robustness caption, the
per-attack breakdown (how many examples each attack of APGD / AutoAttack fooled first, as
AutoAttack's own log shows), RobustBench-style lines per cell, and the gradient-masking warnings."""
from __future__ import annotations

import json
import math

import pandas as pd

from orchestrator.result_schema import row_kinds
from trainables.records import ROBUSTNESS

from .section import Inputs, Section

ATTACK_NAMES = {
    "pgd": "PGD on the cross-entropy (last iterate)",
    "pgd_any_iterate": "PGD on the cross-entropy (any iterate)",
    "apgd": "APGD-CE + APGD-T (targeted DLR)",
    "autoattack": "AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square)",
    "pgd_adaptive": "adaptive PGD through the defence",
}


def _adversarial(df: pd.DataFrame) -> pd.DataFrame:
    """The undefended robustness rows (trainables.records.row_kind) with a norm."""
    return df[(row_kinds(df) == ROBUSTNESS) & df["norm"].notna()]


def _steps(df: pd.DataFrame, attack: str) -> str:
    steps = sorted({int(s) for s in df.loc[df["attack"] == attack, "attack_steps"].dropna()})
    return f", {'/'.join(map(str, steps))} steps" if steps else ""


def attack_description(df: pd.DataFrame) -> str:
    """One sentence naming the attack(s) behind the study's robust accuracies."""
    rows = _adversarial(df)
    attacks = sorted(set(rows["attack"]) - {"none"})
    if not attacks:
        return "No adversarial evaluation in these results."
    parts = [ATTACK_NAMES.get(a, a) + _steps(rows, a) for a in attacks]
    text = "Robust accuracy under " + "; ".join(parts) + "."
    if len(attacks) > 1:
        text += " Rows of different attacks are kept apart by the results' attack column."
    return text


def breakdown_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per trial × norm × ε_test: how many examples each attack fooled first (from `fooled_by`),
    summed over the trials of a configuration; empty without APGD or AutoAttack rows."""
    if "fooled_by" not in df.columns:
        return pd.DataFrame()
    rows = _adversarial(df)
    rows = rows[rows["fooled_by"].notna()]
    if rows.empty:
        return pd.DataFrame()
    out = []
    for r in rows.itertuples():
        taken = json.loads(r.fooled_by)
        out.append(dict(ssl_weight=r.ssl_weight, attack_variant=r.attack_variant, eps_train=r.eps_train,
                        attack=r.attack, norm=r.norm, eps_test=r.eps_test, seed=r.seed, n_examples=r.n_examples,
                        robust_acc=r.robust_acc, **{f"fooled_by_{k}": v for k, v in taken.items()}))
    table = pd.DataFrame(out)
    keys = ["ssl_weight", "attack_variant", "eps_train", "attack", "norm", "eps_test"]
    counts = [c for c in table.columns if c.startswith("fooled_by_")]
    agg = table.groupby(keys, dropna=False, sort=True).agg(
        seeds=("seed", "nunique"), n_examples=("n_examples", "sum"), robust_acc=("robust_acc", "mean"),
        **{c: (c, "sum") for c in counts}).reset_index()
    return agg


def robustbench_table(df: pd.DataFrame) -> pd.DataFrame:
    """One RobustBench-style line per configuration: dataset, architecture, threat model, eps
    (ε_train), clean_acc, autoattack_acc (mean over seeds; empty when AutoAttack did not run) and
    the study's own robust accuracy at ε_train with the attack that produced it."""
    rows = _adversarial(df)
    if rows.empty:
        return pd.DataFrame()
    rows = rows[rows["norm"] == rows["norm_train"]]
    at = rows[(rows["eps_test"] - rows["eps_train"]).abs() < 1e-9]
    out = []
    keys = ["dataset", "arch", "ssl_task", "ssl_weight", "attack_variant", "norm_train", "eps_train"]
    for key, g in at.groupby(keys, dropna=False, sort=True):
        cell = dict(zip(keys, key))
        clean = df[(df[keys] == pd.Series(cell)).all(axis=1)]["clean_acc"]
        aa = g[g["attack"] == "autoattack"]["robust_acc"]
        other = g[g["attack"] != "autoattack"]
        line = dict(dataset=cell["dataset"], architecture=cell["arch"], ssl_task=cell["ssl_task"],
                    ssl_weight=cell["ssl_weight"], attack_variant=cell["attack_variant"],
                    threat_model={"linf": "Linf", "l2": "L2"}.get(cell["norm_train"], cell["norm_train"]),
                    eps=cell["eps_train"], clean_acc=float(clean.mean()),
                    autoattack_acc=float(aa.mean()) if len(aa) else math.nan,
                    seeds=int(g["seed"].nunique()))
        if len(other):
            line["robust_acc"] = float(other["robust_acc"].mean())
            line["attack"] = ",".join(sorted(set(other["attack"])))
        out.append(line)
    return pd.DataFrame(out)


def masking_warnings(df: pd.DataFrame) -> list[str]:
    """One warning per trial whose gradient-masking checks fired (its `masking_flags`)."""
    if "masking_flags" not in df.columns:
        return []
    rows = _adversarial(df)
    rows = rows[rows["masking_flags"].notna() & (rows["masking_flags"] != "")]
    warnings = []
    for chash, g in rows.groupby("config_hash", sort=True):
        r = g.iloc[0]
        flags = "; ".join(f"{norm}: {f}" for norm, f in g.groupby("norm")["masking_flags"].first().items())
        warnings.append(
            f"WARNING: gradient-masking checks fired for trial {chash} (λ={r.ssl_weight:g}, "
            f"variant {r.attack_variant}, seed {int(r.seed)}): {flags}. Its robust accuracy may be "
            "overstated; evaluate it with eval_attack=autoattack and see README (evaluation).")
    return warnings


def notes(inputs: Inputs) -> list[str]:
    """The attack behind the robust accuracies, then a warning per trial whose masking checks fired."""
    return [inputs.attack_text] + masking_warnings(inputs.df)


def robustbench_section(inputs: Inputs) -> Section:
    return Section("robustbench", "RobustBench-style summary",
                   "One line per configuration at ε_test = ε_train, in RobustBench's field names: clean_acc and "
                   "autoattack_acc (mean over seeds; empty unless the study ran eval_attack=autoattack), plus the "
                   "study's own robust accuracy and the attack that produced it.",
                   table=robustbench_table(inputs.df))


def breakdown_section(inputs: Inputs) -> Section:
    return Section("attack_breakdown", "Which attack fooled each example",
                   "Per configuration × ε_test, summed over seeds: the examples each attack fooled first (the "
                   "attacks run in the order of the columns, each on the examples the earlier ones and the smaller "
                   "ε left robust), as AutoAttack's own log counts them. " + inputs.attack_text,
                   table=breakdown_table(inputs.df))
