"""The report of a study: figures and tables a researcher reads, rebuilt from the Parquet files alone.

    python -m orchestrator.report NAME [--storage PATH_OR_URI] [--out DIR]

Modules: `statistics` (intervals over seeds, seed-level tables, aggregation; no matplotlib, so the
end-of-run summary can use it), one module per analysis (`robustness`, `attacks`, `corruptions`,
`ood`, `label_noise`, `label_free`, `smoothing`, `defence`, `example_intervals`), each giving its sections as small
values (`section.Section`) listed in `registry`; `render` (Markdown, CSV, PNG/SVG and HTML);
`build.build_report`, a loop over the registry; `cli`, the command line.

Every number is a mean over seeds with a 95% confidence interval from Student's t; with one seed
the interval is NaN and the figures say so instead of drawing a band. The exceptions are the two
tables of `example_intervals`: robust accuracy and its paired difference to λ = 0 with intervals
over seeds and test examples (orchestrator.interval_tables), as the end-of-run text gives them.
Studies with
out-of-distribution rows also get an OOD table and an AUROC figure; studies with label-free rows a
table of the label-free measures, a certified-accuracy figure and a center-smoothing figure;
studies that sweep label_noise a table and a figure of clean test accuracy against the fraction of
corrupted training labels; studies with a test-time defence a figure of it. None of these appears
for other studies.

This file imports nothing: importing `orchestrator.report.statistics` must not load matplotlib.
"""
