"""What a trial's results are called in MLflow: per-ε scalar metrics, robustness curves as metric
histories over ε, and the summary numbers a search optimises. Pure functions over result records
(`trainables.records.EvalRecord`s, or rows read back from Parquet), shared by the live tracking callback and `--backfill-tracking`,
so both log exactly the same metrics.

Curves: ``acc_vs_eps/robust_acc_<norm>`` (and ``acc_vs_eps/defended_acc_<defence>_<attack>_<norm>``,
``acc_vs_radius/certified_acc``) is one metric whose history holds one point per ε, at step
round(ε·EPS_STEP_SCALE): ε = 0.1 is step 1000, 8/255 is step 314. MLflow's chart view then draws
accuracy against ε and overlays runs. ``acc_vs_severity/corruption_acc_<corruption>`` has one point
per severity (step = severity). The ``acc_vs_`` sections are named so that MLflow 3's chart view
shows them first: it puts a metric ``a/b`` in section ``a``, sorts the sections by name and puts
the section of the names without a ``/`` last (mlflow/server/js/src/experiment-tracking/components/
runs-charts/runs-charts.types.ts, getBaseChartAndSectionConfigs). The scalars
(``robust_acc/linf/0.1``) carry ε exactly (the shortest repr of the float), so two distinct ε are
always two metrics.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from trainables.records import CORRUPTION, DEFENDED, LABEL_FREE, OOD, ROBUSTNESS, present, row_kind

EPS_STEP_SCALE = 10_000  # step of ε on a curve: round(ε · 10^4)
MAX_KEY_LENGTH = 250  # MLflow's limit on metric and param names
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
# The chart-view sections of the curves, by their x axis (see the module docstring).
CURVES_VS_EPS, CURVES_VS_RADIUS, CURVES_VS_SEVERITY = "acc_vs_eps", "acc_vs_radius", "acc_vs_severity"
CURVE_PREFIX = "acc_vs_"


def clean_name(name: Any) -> str:
    """A valid MLflow param/metric key: only alnum, ``_-./`` and space; no empty/'..' segments."""
    text = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in text.split("/") if p not in ("", ".")]
    parts = ["_" if p == ".." else p for p in parts]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


def exact_number(value: float) -> str:
    """The shortest text that reads back as the same float: 0.1 -> "0.1", 2.0 -> "2",
    8/255 -> "0.03137254901960784". Distinct floats never share a text."""
    x = float(value)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def eps_step(eps: float) -> int:
    """The step of ε on a curve metric (EPS_STEP_SCALE)."""
    return int(round(float(eps) * EPS_STEP_SCALE))


def result_metric_name(norm: str | None, eps: float | None, corruption: str | None, severity: int | None) -> str:
    """``robust_acc/<norm>/<eps>`` (ε exact), ``corruption_acc/<name>/<severity>``, or ``clean_acc``."""
    if present(corruption):
        if present(norm):
            raise ValueError("a result is either adversarial (norm, eps) or a corruption, not both")
        if not present(severity):
            raise ValueError(f"corruption {corruption!r} needs a severity")
        return clean_name(f"corruption_acc/{corruption}/{int(severity)}")
    if present(norm):
        if not present(eps):
            raise ValueError(f"norm {norm!r} needs an eps")
        return clean_name(f"robust_acc/{norm}/{exact_number(eps)}")
    return "clean_acc"


def ood_metric_name(ood_set: str, score: str, measure: str) -> str:
    """``ood/<set>/<score>/<measure>``, e.g. ``ood/gaussian/rotation/auroc``."""
    for what, value in (("ood_set", ood_set), ("score", score), ("measure", measure)):
        if not present(value):
            raise ValueError(f"an OOD metric needs '{what}'")
    return clean_name(f"ood/{ood_set}/{score}/{measure}")


def label_free_metric_name(measure: str, radius: float | None = None) -> str:
    """``certified_acc/<radius>`` for measure certified_acc, else ``label_free/<measure>``, or with a
    radius (center smoothing's l2 input radius ε) ``label_free/<measure>/<radius>``."""
    if not present(measure):
        raise ValueError("a label-free metric needs 'measure'")
    if measure == "certified_acc":
        if not present(radius):
            raise ValueError("certified_acc needs a radius")
        return clean_name(f"certified_acc/{exact_number(radius)}")
    if present(radius):
        return clean_name(f"label_free/{measure}/{exact_number(radius)}")
    return clean_name(f"label_free/{measure}")


def defended_metric_name(record: dict) -> str:
    """``defended_acc/<defence>/<attack>/<norm>/<eps>``, e.g. defended_acc/ssl_reverse/pgd_adaptive/linf/0.1."""
    plain = result_metric_name(record["norm"], record["eps_test"], None, None)
    return clean_name(f"defended_acc/{record['defence']}/{record['attack']}/" + plain.split("/", 1)[1])


def curve_metric_name(section: str, name: str) -> str:
    """``<section>/<name>``, e.g. curve_metric_name(CURVES_VS_EPS, "robust_acc_linf") is
    ``acc_vs_eps/robust_acc_linf``."""
    return clean_name(f"{section}/{name}")


def is_curve(name: str) -> bool:
    return name.startswith(CURVE_PREFIX)


def _number(value: Any) -> float | None:
    if not present(value) or isinstance(value, (bool, str)):
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


def record_metrics(records: Iterable[dict]) -> list[tuple[str, float, int]]:
    """(name, value, step) of every metric a trial's records give: the scalars at step 0 and the
    curves (see the module docstring). Records whose value is missing are skipped."""
    out: list[tuple[str, float, int]] = []
    clean = None
    for r in records:
        kind = row_kind(r)
        if kind == OOD:
            value = _number(r.get("value"))
            if value is not None:
                out.append((ood_metric_name(r["ood_set"], r.get("score"), r.get("measure")), value, 0))
            continue
        if kind == LABEL_FREE:
            value = _number(r.get("value"))
            if value is None:
                continue
            out.append((label_free_metric_name(r["measure"], r.get("radius")), value, 0))
            if r["measure"] == "certified_acc":
                out.append((curve_metric_name(CURVES_VS_RADIUS, "certified_acc"), value, eps_step(r["radius"])))
            continue
        value = _number(r.get("robust_acc"))
        if clean is None:
            clean = _number(r.get("clean_acc"))
        if value is None:
            continue
        if kind == DEFENDED:
            out.append((defended_metric_name(r), value, 0))
            out.append((curve_metric_name(CURVES_VS_EPS, f"defended_acc_{r['defence']}_{r['attack']}_{r['norm']}"),
                        value, eps_step(r["eps_test"])))
        elif kind == CORRUPTION:
            out.append((result_metric_name(None, None, r["corruption"], r["severity"]), value, 0))
            out.append((curve_metric_name(CURVES_VS_SEVERITY, f"corruption_acc_{r['corruption']}"), value,
                        int(r["severity"])))
        elif present(r.get("norm")) and present(r.get("eps_test")):
            out.append((result_metric_name(r["norm"], r["eps_test"], None, None), value, 0))
            out.append((curve_metric_name(CURVES_VS_EPS, f"robust_acc_{r['norm']}"), value, eps_step(r["eps_test"])))
    if clean is not None:
        out.append(("clean_acc", clean, 0))
    return out


def summary_metrics(config: dict, records: list[dict]) -> dict[str, float]:
    """The numbers a search optimises and the progress line shows, from the robustness rows of the
    training norm: clean_acc, robust_acc_at_eps_train, robust_acc_above_eps_train (mean over ε ≥ ε_train)."""
    kept = [r for r in records if row_kind(r) in (ROBUSTNESS, CORRUPTION)]
    adversarial = [r for r in kept if row_kind(r) == ROBUSTNESS and r["norm"] == config["norm_train"]]
    clean = (kept or records)[0]["clean_acc"] if records else float("nan")  # on every row
    above = [r["robust_acc"] for r in adversarial if r["eps_test"] >= config["eps_train"] - 1e-12]
    at = [r["robust_acc"] for r in adversarial if abs(r["eps_test"] - config["eps_train"]) < 1e-12]
    out = {
        "clean_acc": float(clean),
        "robust_acc_above_eps_train": sum(above) / len(above) if above else float("nan"),
        "robust_acc_at_eps_train": at[0] if at else float("nan"),
    }
    if config.get("eval_attack") == "autoattack":  # RobustBench's name for this number
        out["autoattack_acc"] = out["robust_acc_at_eps_train"]
    return out


def trial_metrics(config: dict, records: list[dict]) -> list[tuple[str, float, int]]:
    """Everything the MLflow run of a finished trial gets: record_metrics plus summary_metrics
    (at step 0; NaN summaries left out)."""
    out = record_metrics(records)
    names = {n for n, _, s in out if not is_curve(n)}
    for name, value in summary_metrics(config, records).items():
        if value == value and name not in names:
            out.append((name, float(value), 0))
    return out


def scalar_metrics(records: Iterable[dict]) -> dict[str, float]:
    """The metrics of `record_metrics` that are not curves, as {name: value} (robust_acc/<norm>/<ε>, ...)."""
    return {name: value for name, value, step in record_metrics(records) if not is_curve(name)}
