"""What kind of result a record is: the one rule that results, tracking, backfill, the console summary
and the report all use.

A record is a row of a trial's results (`trainables.evaluate.RECORD_KEYS`, plus `defence` and
`radius` where present), as a dict or a pandas row; a missing value may be None, NaN or pd.NA.
"""
from __future__ import annotations

from typing import Any, Mapping

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


def row_kind(record: Mapping[str, Any]) -> str:
    """One of KINDS. A measure with an OOD set is OOD, one without is label-free; a row with a
    defence other than "none" is defended; a row with a corruption is a corruption row; every
    other row is a robustness row."""
    if present(record.get("ood_set")):
        return OOD
    if present(record.get("measure")):
        return LABEL_FREE
    defence = record.get("defence")
    if present(defence) and defence != "none":
        return DEFENDED
    if present(record.get("corruption")):
        return CORRUPTION
    return ROBUSTNESS
