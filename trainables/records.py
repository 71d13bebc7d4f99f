"""The result record: one row of a trial's evaluation, and the one rule for what kind of row it is.

Every evaluation (the robustness curve, corruptions, OOD detection, label-free measures, the
test-time defence) returns `EvalRecord`s; the orchestrator writes their `to_row()` to Parquet, where
orchestrator/results.py types these same columns. A record reads as a mapping of its columns too
(`record["robust_acc"]`, `dict(record)`), so the functions over result rows (metrics, summaries)
take records and rows read back from Parquet alike; `row_kind` gives the kind of either.

This module imports nothing else of the project: results, tracking, backfill, the summary and
the report all ask it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Iterator

ROBUSTNESS = "robustness"  # accuracy under a norm-bounded attack at eps_test (eps 0: clean)
CORRUPTION = "corruption"  # accuracy under a natural corruption at a severity
OOD = "ood"  # an out-of-distribution detection measure (ood_set, score, measure, value)
LABEL_FREE = "label_free"  # a label-free measure (measure, value; radius for certified_acc)
DEFENDED = "defended"  # accuracy behind a test-time defence (defence, attack, norm, eps_test)
KINDS = (ROBUSTNESS, CORRUPTION, OOD, LABEL_FREE, DEFENDED)


def present(value: Any) -> bool:
    """False for None, NaN, pd.NA/NaT and the empty string."""
    if value is None or (isinstance(value, str) and not value):
        return False
    try:
        return bool(value == value)
    except (TypeError, ValueError):  # pd.NA refuses bool()
        return False


@dataclass(frozen=True)
class EvalRecord(Mapping):
    """One evaluation result. Accuracies are fractions in [0, 1] over `n_examples` test images; ε
    and radii are in the [0, 1] pixel scale. A column another kind of row fills is None.

    norm, eps_test: the threat model ("linf"/"l2") and ε_test of robustness and defended rows.
    attack, attack_steps, step_size, restarts: the attack that produced the row ("none" for clean,
    corruption and most measure rows). clean_acc: the model's clean accuracy (the defended model's
    on defended rows; NaN where unmeasured). robust_acc: accuracy under the attack or corruption
    (None on measure rows). corruption, severity: the natural corruption. ood_set, score: the OOD
    set and detection score of an OOD measure. measure, value: what a measure row measured and its
    number. radius: the certified l2 radius (certified_acc) or l2 input radius (center smoothing).
    defence: the test-time defence of a defended row. fooled_by: JSON {attack: examples it took}
    of apgd/autoattack rows. masking_flags: the gradient-masking checks that fired for the curve.
    correct: robustness rows' packed bits of which examples were correct (trainables.correct_bits).
    """

    norm: str | None = None
    eps_test: float | None = None
    attack: str = "none"
    attack_steps: int | None = None
    step_size: float | None = None
    restarts: int | None = None
    n_examples: int | None = None
    clean_acc: float | None = None
    robust_acc: float | None = None
    corruption: str | None = None
    severity: int | None = None
    ood_set: str | None = None
    score: str | None = None
    measure: str | None = None
    value: float | None = None
    radius: float | None = None
    defence: str | None = None
    fooled_by: str | None = None
    masking_flags: str | None = None
    correct: bytes | None = None

    @property
    def kind(self) -> str:
        """One of KINDS. A measure with an OOD set is OOD, one without is label-free; a row with a
        defence other than "none" is defended; a row with a corruption is a corruption row; every
        other row is a robustness row."""
        if present(self.ood_set):
            return OOD
        if present(self.measure):
            return LABEL_FREE
        if present(self.defence) and self.defence != "none":
            return DEFENDED
        if present(self.corruption):
            return CORRUPTION
        return ROBUSTNESS

    def to_row(self) -> dict[str, Any]:
        """The record as a plain dict of every column (what the trainable writes to Parquet)."""
        return {name: getattr(self, name) for name in EVAL_COLUMNS}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "EvalRecord":
        """The record of a result row (a dict or pandas row; its other columns ignored)."""
        return cls(**{name: row.get(name) for name in EVAL_COLUMNS if name in row})

    def __getitem__(self, name: str) -> Any:
        if name not in _COLUMN_SET:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(EVAL_COLUMNS)

    def __len__(self) -> int:
        return len(EVAL_COLUMNS)


EVAL_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(EvalRecord))
_COLUMN_SET = frozenset(EVAL_COLUMNS)


def row_kind(row: Mapping[str, Any]) -> str:
    """`EvalRecord.kind` of a record or a result row (missing values may be None, NaN or pd.NA)."""
    return (row if isinstance(row, EvalRecord) else EvalRecord.from_row(row)).kind


def masking_tags(records: list[dict]) -> dict[str, str]:
    """{"gradient_masking/<norm>": checks that fired, comma-separated} over a trial's records
    (their `masking_flags`, from trainables.masking), only for norms where a check fired: the
    tags of the trial's run. Here, not beside the checks, so the driver never imports torch."""
    tags: dict[str, str] = {}
    for r in records:
        if r.get("masking_flags") and r.get("norm") and row_kind(r) == ROBUSTNESS:
            tags[f"gradient_masking/{r['norm']}"] = r["masking_flags"]
    return tags
