"""How the report writes factor values and numbers, the same in figures, tables and notes."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

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


def fmt_eps(v: Any) -> str:
    """ε as text: 8/255 for CIFAR-style fractions, else a short decimal."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    v = float(v)
    k = v * 255
    if abs(v - round(v, 4)) > 1e-9 and abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{v:g}"


def fmt_value(v: Any, col: str = "") -> str:
    """A table cell: ε as fmt_eps, λ short, differences signed, other floats to 4 places, — for none."""
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


def column_label(col: str) -> str:
    """The heading of a column (λ for ssl_weight, ...)."""
    return LABELS.get(col, col)


def describe(values: dict[str, Any]) -> str:
    """Factor values as one line, e.g. 'joint · scratch · ε_train=0.1'."""
    parts = []
    for k, v in values.items():
        if k in ("attack_variant", "init", "norm") and isinstance(v, str):
            parts.append(v)
        elif k.startswith("eps"):
            parts.append(f"{column_label(k)}={fmt_eps(v)}")
        else:
            parts.append(f"{column_label(k)}={fmt_value(v, k) if isinstance(v, float) else v}")
    return " · ".join(parts)


def lam_label(ssl_task: str, lam: float) -> str:
    """The legend name of a curve of λ (a trial without an SSL task is λ = 0)."""
    return "no SSL task (λ=0)" if ssl_task == "none" else f"λ={lam:g}"


def seed_label(ns: Iterable[int]) -> str:
    """How many seeds a curve's points have, for its legend entry."""
    ns = [int(n) for n in ns if n]
    if not ns:
        return "no data"
    lo, hi = min(ns), max(ns)
    if hi <= 1:
        return ONE_SEED
    if lo == hi:
        return f"{lo} seeds"
    return f"{lo}-{hi} seeds" + (" (1-seed points: no band)" if lo == 1 else "")


def pm(mean: float, ci: float, digits: int = 3) -> str:
    """'mean ± ci' (just the mean when the interval is undefined, e.g. one seed)."""
    if mean is None or not np.isfinite(mean):
        return "—"
    if ci is None or not np.isfinite(ci):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"

