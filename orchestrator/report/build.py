"""`build_report`: the report of a study rebuilt from its Parquet results alone, one section per
entry of the registry (registry.FIGURES, registry.TABLES) plus the notes, the missing cells and the
table of all cells."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from orchestrator import results
from orchestrator.errors import UserError

from . import registry, render
from .attacks import attack_description
from .labels import ONE_SEED
from .section import Inputs
from .statistics import (ADV_EVAL_COLUMNS, CORRUPTION_EVAL_COLUMNS, LABEL_FREE_EVAL_COLUMNS, OOD_EVAL_COLUMNS,
                         aggregate, json_value, prepare)


class ReportError(UserError):
    """The report cannot be built (no results, bad study name, unwritable output)."""


@dataclass
class ReportFiles:
    html: str
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)


def _default_out_dir(storage: str, study: str) -> Path:
    storage = str(storage)
    if storage.startswith("file://"):
        return Path(storage[len("file://"):]) / "reports" / study
    if "://" in storage:
        return Path("reports") / study
    return Path(storage) / "reports" / study


def _default_spec_text(study: str) -> str | None:
    base = Path(__file__).resolve().parents[2] / "studies"
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
    varying = [k for k in keys if len({json_value(c.get(k)) for c in configs.values()}) > 1]
    return pd.DataFrame(
        [{"config_hash": h, **{k: json_value(configs[h].get(k)) for k in varying}} for h in missing]
    )


def _all_cells(inputs: Inputs) -> pd.DataFrame:
    """Every adversarial and corruption cell with its mean, CI and seeds, beside its clean accuracy."""
    tk = inputs.train_keys
    full = pd.concat([inputs.agg_adv.assign(kind="adversarial"), inputs.agg_cor.assign(kind="corruption")],
                     ignore_index=True)
    clean = inputs.clean_agg[tk + ["mean", "ci95"]].rename(columns={"mean": "clean_mean", "ci95": "clean_ci95"})
    full = full.merge(clean, on=tk, how="left")
    return full[["kind"] + tk + ["norm", "eps_test", "corruption", "severity", "mean", "ci95", "n_seeds", "seeds",
                                 "clean_mean", "clean_ci95"]]


def _seeds_per_configuration(inputs: Inputs) -> tuple[int, int]:
    """The fewest and the most seeds of any evaluated configuration (0, 0 without any)."""
    counts = [a["n_seeds"] for a in (inputs.agg_adv, inputs.agg_cor, inputs.agg_ood, inputs.agg_lf) if len(a)]
    return int(min((c.min() for c in counts), default=0)), int(max((c.max() for c in counts), default=0))


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
    eval_hash (orchestrator.evaluate; in reports/STUDY/eval-HASH/, `evaluation_note` says how).
    Raises ReportError when there are no results or the output directory cannot be made."""
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
    tk = data.train_keys
    inputs = Inputs(
        study=study, df=df, data=data,
        agg_adv=aggregate(data.adv, tk + list(ADV_EVAL_COLUMNS)),
        agg_cor=aggregate(data.cor, tk + list(CORRUPTION_EVAL_COLUMNS)),
        clean_agg=aggregate(data.clean, tk, value="clean_acc"),
        agg_ood=aggregate(data.ood, tk + list(OOD_EVAL_COLUMNS), value="value"),
        agg_lf=aggregate(data.label_free, tk + list(LABEL_FREE_EVAL_COLUMNS), value="value"),
        attack_text=attack_description(df),
    )
    n_min, n_max = _seeds_per_configuration(inputs)
    notes = ([f"The kept models were evaluated again ({len(others)} re-evaluation(s), python -m "
              "orchestrator.evaluate); this report shows the trials' own evaluation, the others are in the "
              "folder(s) " + ", ".join(f"eval-{h}/" for h in others) + " of this one."] if others else [])
    notes += [evaluation_note] if evaluation_note else []
    notes += data.notes + replication  # adaptive replication: seeds per cell and why (orchestrator.replication)
    if aliases:
        notes.append(f"{sum(len(a) for a in aliases.values())} cell(s) of the grid are the same experiment as another "
                     "(e.g. λ = 0 under the 'ce' and 'joint' variants, or any variant at ε_train = 0): each was "
                     "trained once and is shown under every name.")
    if n_max <= 1:
        notes.append(f"Only 1 seed per configuration ({ONE_SEED}s or intervals; a CI needs ≥ 2 seeds).")
    elif n_min == 1:
        k = int((inputs.clean_agg["n_seeds"] == 1).sum())
        notes.append(f"{k} configuration(s) have only 1 seed: no confidence band or interval for them.")
    for analysis_notes in registry.NOTES:
        notes += analysis_notes(inputs)

    figure_paths: list[str] = []
    figure_html: list[str] = []
    for figure_section in registry.FIGURES:
        section = figure_section(inputs)
        if section.figure is None:
            continue
        if n_max <= 1:
            section = replace(section, caption=f"{section.caption} {ONE_SEED}.")
        paths, fragment = render.write_figure(out, section)
        figure_paths += paths
        figure_html.append(fragment)

    table_paths: list[str] = []
    table_html: list[str] = []
    for table_section in registry.TABLES:
        section = table_section(inputs)
        if section.table.empty:
            if section.empty_reason is not None:
                table_html.append(render.unavailable_html(section))
            continue
        paths, fragment = render.write_table(out, study, section, keep=data.extras)
        table_paths += paths
        table_html.append(fragment)
    table_paths += render.write_aggregate(out, study, _all_cells(inputs), keep=data.extras)

    missing_html = ""
    if expected_hashes is not None:
        present = set(df["config_hash"])
        missing = _missing_cells(expected_hashes, present)
        if not missing.empty:
            notes.append(f"Partial study: {len(missing)} of {len(expected_hashes)} expected cells are missing "
                         "(listed below).")
        missing_html = render.missing_cells_html(missing, len(expected_hashes), sorted(present - set(expected_hashes)))

    html_path = out / "report.html"
    html_path.write_text(
        render.report_html(study, results.study_dir(storage, study), df, data, figure_html, table_html, notes,
                           missing_html, spec_text, n_min, n_max),
        encoding="utf-8",
    )
    return ReportFiles(str(html_path), figure_paths, table_paths)
