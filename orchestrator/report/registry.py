"""The report's sections in the order report.html shows them: each analysis module contributes
functions `Inputs -> Section` (and `Inputs -> list[str]` of notes); a new analysis adds its
functions here and nowhere else."""
from __future__ import annotations

from . import attacks, corruptions, defence, example_intervals, label_free, label_noise, ood, robustness, smoothing

NOTES = (
    attacks.notes,
    robustness.notes,
    corruptions.notes,
)
FIGURES = (
    robustness.robust_vs_eps_section,
    robustness.delta_vs_lambda0_section,
    corruptions.corruptions_section,
    robustness.clean_vs_robust_section,
    ood.auroc_section,
    label_noise.figure_section,
    defence.defence_section,
    smoothing.certified_accuracy_section,
    smoothing.center_smoothing_section,
)
TABLES = (
    robustness.lambda_effect_section,
    robustness.best_variant_section,
    robustness.pretrain_vs_scratch_section,
    example_intervals.accuracy_section,
    example_intervals.difference_section,
    attacks.robustbench_section,
    attacks.breakdown_section,
    ood.table_section,
    label_noise.table_section,
    label_free.table_section,
)
