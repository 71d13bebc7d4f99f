"""Writing the report: tables as Markdown (what a reader sees) and CSV (every number), figures as PNG
and SVG, and report.html, which embeds the PNGs and links the other files."""
from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .labels import ONE_SEED, column_label, fmt_value
from .section import Section
from .statistics import CONFIG_COLUMNS, StudyData

PACKAGES = ("torch", "ray", "mlflow", "pyarrow", "pandas", "numpy", "scipy", "matplotlib")


def display_table(df: pd.DataFrame, keep: Iterable[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Drop factor columns constant across the table (returned separately) and format values."""
    factors = [c for c in df.columns if c in set(CONFIG_COLUMNS) | {"norm", "dataset"} or c in keep]
    fixed = {}
    if len(df) > 1:
        for c in factors:
            if df[c].astype(str).nunique(dropna=False) == 1 and c not in ("ssl_weight", "eps_test"):
                fixed[c] = df[c].iloc[0]
    shown = df.drop(columns=list(fixed))
    text = pd.DataFrame({column_label(c): [fmt_value(v, c) for v in shown[c]] for c in shown.columns})
    return text, fixed


def to_markdown(text: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the (already formatted) cells of `text`."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in text.columns) + " |", "|" + "---|" * len(text.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines) + "\n"




def write_table(out: Path, study: str, section: Section, keep: Iterable[str]) -> tuple[list[str], str]:
    """Write a table section as `<name>.md` (the displayed table, factor columns constant across it
    (other than those in `keep`) stated once above it) and `<name>.csv` (the full table); return
    the two paths and its HTML."""
    name, title, caption = section.name, section.title, section.caption
    text, fixed = display_table(section.table if section.shown is None else section.shown, keep=keep)
    fixed_txt = "; ".join(f"{column_label(k)} = {fmt_value(v, k)}" for k, v in fixed.items())
    md = f"# {title} (study {study})\n\n{caption}\n\n" + (f"Fixed: {fixed_txt}\n\n" if fixed_txt else "") + to_markdown(text)
    (out / f"{name}.md").write_text(md, encoding="utf-8")
    section.table.to_csv(out / f"{name}.csv", index=False)
    fragment = (
        f"<h3 id='{name}'>{html.escape(title)}</h3><p class='caption'>{html.escape(caption)}</p>"
        + (f"<p class='fixed'>Fixed: {html.escape(fixed_txt)}</p>" if fixed_txt else "")
        + text.to_html(index=False, escape=True, border=0, classes="t")
        + f"<p class='files'>{name}.csv · {name}.md</p>"
    )
    return [str(out / f"{name}.md"), str(out / f"{name}.csv")], fragment


def unavailable_html(section: Section) -> str:
    """The HTML of a table section without rows that says why."""
    return f"<h3>{html.escape(section.title)}</h3><p class='note'>Not available: {html.escape(section.empty_reason)}.</p>"


def write_figure(out: Path, section: Section) -> tuple[list[str], str]:
    """Write a figure section as `<name>.png` and `<name>.svg`; return the two paths and its HTML
    (the PNG embedded)."""
    png, svg = out / f"{section.name}.png", out / f"{section.name}.svg"
    section.figure.savefig(png, dpi=110)
    section.figure.set_layout_engine("none")  # keep the layout just computed: the SVG need not redo it
    section.figure.savefig(svg)
    esc = html.escape
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    fragment = (
        f"<figure id='{section.name}'><h3>{esc(section.title)}</h3><img alt='{esc(section.title)}' "
        f"src='data:image/png;base64,{b64}'><figcaption class='caption'>{esc(section.caption)} "
        f"(files: {section.name}.png, {section.name}.svg)</figcaption></figure>"
    )
    return [str(png), str(svg)], fragment


def write_aggregate(out: Path, study: str, full: pd.DataFrame, keep: Iterable[str]) -> list[str]:
    """All cells with their means, CIs and seeds as aggregate.csv and aggregate.md; their paths."""
    full.to_csv(out / "aggregate.csv", index=False)
    (out / "aggregate.md").write_text(
        f"# All cells, mean over seeds (study {study})\n\n" + to_markdown(display_table(full, keep=keep)[0]),
        encoding="utf-8",
    )
    return [str(out / "aggregate.md"), str(out / "aggregate.csv")]


def missing_cells_html(missing: pd.DataFrame, n_expected: int, unexpected: list[str]) -> str:
    """The grid's cells without results (`missing`, one row each) and the result files of no cell."""
    if missing.empty:
        text = f"<p>All {n_expected} expected cells have results.</p>"
    else:
        text = (f"<p><b>{len(missing)} of {n_expected} expected cells are missing</b> "
                "(re-run the study to fill them):</p>" + missing.to_html(index=False, border=0, classes="t"))
    if unexpected:
        text += (f"<p class='note'>{len(unexpected)} result file(s) belong to no expected cell "
                 f"(an older version of the study spec?): {html.escape(', '.join(unexpected[:20]))}</p>")
    return text


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


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


def report_html(study: str, study_dir: str, df: pd.DataFrame, data: StudyData, figure_html: list[str],
                table_html: list[str], notes: list[str], missing_html: str, spec_text: str | None,
                n_min: int, n_max: int) -> str:
    """report.html: the study's facts, notes, missing cells, the figures and tables (their HTML
    fragments, in order), the study spec and the software versions; `n_min`/`n_max` seeds per
    configuration."""
    esc = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    n_trials = df["config_hash"].nunique()
    seeds = sorted(int(s) for s in df["seed"].unique())
    n_configs = len(data.clean.drop_duplicates(data.train_keys)) if not data.clean.empty else 0
    shas = df.drop_duplicates("config_hash")["git_sha"].dropna()
    seeds_txt = f"{n_min}" if n_min == n_max else f"{n_min}-{n_max}"
    facts = [
        ("study", study),
        ("storage", study_dir),
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
    parts += figure_html
    parts.append("<h2>Tables</h2>" + "".join(table_html))
    parts.append("<p class='files'>All cells with means, CIs and seeds: aggregate.csv · aggregate.md</p>")
    parts.append("<h2>Study specification</h2>")
    parts.append(f"<pre>{esc(spec_text)}</pre>" if spec_text else "<p class='note'>No study spec file found.</p>")
    parts.append("<h2>Software</h2><table class='t'>"
                 + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _versions().items()) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)

