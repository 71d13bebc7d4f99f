"""The schema of the results table (orchestrator/results.py reads and writes it), defined once here,
and the check of result rows against it.

It is a long table: one row per trial x norm x eps_test (adversarial rows, ``corruption`` and
``severity`` null) and one per trial x corruption x severity (corruption rows, ``norm`` and
``eps_test`` null, ``attack`` = "none", ``robust_acc`` = accuracy under the corruption), plus,
when a trial evaluates out-of-distribution detection, one *measure row* per trial x ood_set x
score x measure (``norm``, ``eps_test``, ``corruption``, ``severity`` null, ``attack`` = "none",
``robust_acc`` null, the number in ``value``, e.g. measure "auroc"). Label-free robustness
(`trainables.label_free`) gives measure rows with ``ood_set`` null too (e.g. "breakaway_risk"), and
"certified_acc" rows with the certified radius in ``radius`` (center-smoothing rows: the l2 input
radius ε there). ``robust_acc`` may only be
empty on measure rows. Files written before a nullable column existed read with it empty.
Rows of a trial evaluated with a test-time defence carry ``defence`` (e.g. "ssl_reverse") and
the attack that produced them (``attack`` "pgd" or "pgd_adaptive"); ``defence`` null = undefended.
Robustness rows carry ``correct``, which test examples were still classified correctly (packed
bits, see its column), from which the end-of-run table and the report resample test examples.

The evaluation's columns are the fields of `trainables.records.EvalRecord`; this module types them
(EVAL_COLUMN_TYPES, checked against the record when imported).
"""
from __future__ import annotations

import datetime as _dt
import math
import numbers
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from orchestrator.errors import UserError
from trainables.records import CORRUPTION, EVAL_COLUMNS, LABEL_FREE, OOD, ROBUSTNESS, row_kind

# --------------------------------------------------------------------------------------------
# The schema: (name, arrow type, nullable). Everything else is derived from this list.
# --------------------------------------------------------------------------------------------
_TS = pa.timestamp("us", tz="UTC")

# The evaluation's columns: exactly the fields of trainables.records.EvalRecord (what every
# evaluation returns), in its order, typed here: name -> (arrow type, nullable). `eval_hash`, which
# the orchestrator sets, sits after `defence`, where files have always had it.
EVAL_COLUMN_TYPES: dict[str, tuple[pa.DataType, bool]] = {
    "norm": (pa.string(), True),  # null on corruption and measure rows
    "eps_test": (pa.float64(), True),  # null on corruption and measure rows
    # eval_attack: "apgd", "autoattack", "pgd_any_iterate" or "pgd" (eval_stop_on_success); "none"
    # at ε 0 and on corruption rows
    "attack": (pa.string(), False),
    "attack_steps": (pa.int64(), True),  # null (or 0) on corruption rows
    "step_size": (pa.float64(), True),  # null (or 0) on corruption rows
    "restarts": (pa.int64(), True),  # null (or 0) on corruption rows
    "n_examples": (pa.int64(), False),
    "clean_acc": (pa.float64(), False),
    # corruption rows: accuracy under the corruption; null only on measure rows (validate_rows)
    "robust_acc": (pa.float64(), True),
    "corruption": (pa.string(), True),  # null on adversarial rows
    "severity": (pa.int64(), True),  # null on adversarial rows
    "ood_set": (pa.string(), True),  # OOD rows: gaussian, rademacher, blobs, mnist; else null
    "score": (pa.string(), True),  # OOD rows: the detection score (msp, rotation); else null
    "measure": (pa.string(), True),  # measure rows: what `value` is (auroc, aupr, fpr95); else null
    "value": (pa.float64(), True),  # measure rows: the measured number; else null
    # label-free measure rows (ood_set null): the certified l2 radius of measure certified_acc, the
    # l2 input radius ε of the center_smoothing_* measures; else null
    "radius": (pa.float64(), True),
    # test-time defence of the row (trainables.defence), e.g. "ssl_reverse"; null: undefended
    # (every row written before the column existed). Defended rows name their attack in `attack`:
    # "pgd" (plain, unaware of the defence), "pgd_adaptive", or "none" at ε_test = 0.
    "defence": (pa.string(), True),
    # apgd and autoattack rows: JSON {attack: examples it fooled first at this ε}, in the order the
    # attacks ran (AutoAttack's own log), e.g. {"apgd_ce": 40, "apgd_t": 3}; else null
    "fooled_by": (pa.string(), True),
    # adversarial rows: the gradient-masking checks that fired for this curve (trainables.masking),
    # comma-separated; "" when none fired; null where the checks did not run (older files)
    "masking_flags": (pa.string(), True),
    # robustness rows (clean at ε_test 0, and each attacked ε_test): which test examples were still
    # classified correctly, so intervals can resample examples as well as seeds and comparisons can
    # pair on them (orchestrator.intervals). Packed bits in the evaluation's example order (the test
    # set's first n_examples images): example i is bit i % 8 (least significant first) of byte
    # i // 8, 1 = correct, ceil(n_examples / 8) bytes, padding bits 0, popcount / n_examples =
    # robust_acc (trainables.correct_bits). Null on other rows and in files written before it.
    "correct": (pa.binary(), True),
}
if tuple(EVAL_COLUMN_TYPES) != EVAL_COLUMNS:  # pragma: no cover - a field added to one and not the other
    raise AssertionError(f"EVAL_COLUMN_TYPES {tuple(EVAL_COLUMN_TYPES)} != EvalRecord's fields {EVAL_COLUMNS}")
# the re-evaluation of a kept model that wrote the row (orchestrator.evaluate): the hash of the
# evaluation settings it changed (`config_json` holds the config it evaluated with); null: the
# trial's own evaluation right after training. Its rows' node_id is `evaluate@HOST`.
_EVAL_HASH = ("eval_hash", pa.string(), True)
_EVAL_SPECS = tuple((name, *EVAL_COLUMN_TYPES[name]) for name in EVAL_COLUMNS)
_AFTER_DEFENCE = EVAL_COLUMNS.index("defence") + 1

COLUMN_SPECS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("study", pa.string(), False),
    ("trial_id", pa.string(), False),
    ("config_hash", pa.string(), False),
    ("seed", pa.int64(), False),
    ("dataset", pa.string(), False),
    ("arch", pa.string(), False),
    ("ssl_task", pa.string(), False),
    ("ssl_weight", pa.float64(), False),
    ("attack_variant", pa.string(), False),
    ("init", pa.string(), False),
    ("norm_train", pa.string(), False),
    ("eps_train", pa.float64(), False),
    ("train_attack_steps", pa.int64(), False),
    ("rotations", pa.string(), False),
    ("label_noise", pa.float64(), True),  # fraction of training labels corrupted (null: older files)
    # the training epoch whose weights were evaluated (checkpoint_selection: the last epoch, or the
    # best on robust validation accuracy); null in files written before it was recorded
    ("selected_epoch", pa.int64(), True),
    *_EVAL_SPECS[:_AFTER_DEFENCE], _EVAL_HASH, *_EVAL_SPECS[_AFTER_DEFENCE:],
    ("node_id", pa.string(), False),
    ("mlflow_run_id", pa.string(), True),
    ("git_sha", pa.string(), True),
    ("finished_at", _TS, False),
    ("config_json", pa.string(), False),  # the trial's full config, json.dumps(sort_keys=True)
)

SCHEMA: pa.Schema = pa.schema([pa.field(n, t, nullable=nullable) for n, t, nullable in COLUMN_SPECS])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
REQUIRED_COLUMNS: frozenset[str] = frozenset(n for n, _, nullable in COLUMN_SPECS if not nullable)
KEY_COLUMNS: tuple[str, ...] = (
    "config_hash", "norm", "eps_test", "corruption", "severity", "ood_set", "score", "measure",
    "radius", "attack", "defence", "eval_hash",
)
# Config keys that are also columns, copied from the trial's config (the rest is in config_json).
CONFIG_COLUMNS: tuple[str, ...] = tuple(
    c for c in COLUMNS
    if c in ("seed", "dataset", "arch", "ssl_task", "ssl_weight", "attack_variant", "init",
             "norm_train", "eps_train", "train_attack_steps", "rotations", "label_noise")
)

assert set(KEY_COLUMNS) <= set(COLUMNS)

_PANDAS_3 = int(pd.__version__.split(".")[0]) >= 3


def _pandas_dtype(field: pa.Field) -> Any:
    t = field.type
    if pa.types.is_string(t):
        # pandas >= 3: the default string dtype (missing values are NaN); pandas 2: object.
        return "str" if _PANDAS_3 else object
    if pa.types.is_int64(t):
        return "Int64" if field.nullable else "int64"
    if pa.types.is_float64(t):
        return "float64"
    if pa.types.is_timestamp(t):
        return pd.DatetimeTZDtype(unit=t.unit, tz=t.tz)
    if pa.types.is_binary(t):
        return object  # bytes, None where missing
    raise AssertionError(f"no pandas dtype for {t}")  # pragma: no cover - schema is fixed above


PANDAS_DTYPES: dict[str, Any] = {f.name: _pandas_dtype(f) for f in SCHEMA}


class ResultsError(UserError):
    """A results file or a result row is unusable; the message says which and how to fix it."""

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _check_cell(col: str, field: pa.Field, value: Any, where: str) -> Any:
    t = field.type
    if _is_missing(value):
        if field.nullable:
            return None
        raise ResultsError(f"{where}: column '{col}' must not be empty")
    if pa.types.is_string(t):
        if not isinstance(value, str):
            raise ResultsError(f"{where}: column '{col}' must be a string, got {value!r}")
        return value
    if pa.types.is_int64(t):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ResultsError(f"{where}: column '{col}' must be an integer, got {value!r}")
        return int(value)
    if pa.types.is_float64(t):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ResultsError(f"{where}: column '{col}' must be a number, got {value!r}")
        value = float(value)
        if math.isinf(value):
            raise ResultsError(f"{where}: column '{col}' must be finite, got {value!r}")
        return value
    if pa.types.is_binary(t):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ResultsError(f"{where}: column '{col}' must be bytes, got {type(value).__name__}")
        return bytes(value)
    if pa.types.is_timestamp(t):
        if not isinstance(value, _dt.datetime):
            raise ResultsError(f"{where}: column '{col}' must be a datetime, got {value!r}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ResultsError(
                f"{where}: column '{col}' must be timezone-aware, e.g. datetime.now(timezone.utc)"
            )
        return value.astimezone(_dt.timezone.utc)
    raise AssertionError(t)  # pragma: no cover


def validate_rows(rows: list[dict], study: str | None = None, config_hash: str | None = None) -> pa.Table:
    """Check result rows against SCHEMA and return them as an Arrow table (ResultsError if not)."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ResultsError("a trial must have at least one result row")
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for i, row in enumerate(rows):
        where = f"result row {i}" + (f" of trial {config_hash}" if config_hash else "")
        if not isinstance(row, dict):
            raise ResultsError(f"{where}: must be a dict, got {type(row).__name__}")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ResultsError(f"{where}: unknown column '{unknown[0]}' (columns are defined in orchestrator/results.py)")
        row = dict(row)
        if study is not None:
            row.setdefault("study", study)
        for field in SCHEMA:
            name = field.name
            if name not in row:
                if not field.nullable:
                    raise ResultsError(f"{where}: missing required column '{name}'")
                columns[name].append(None)
                continue
            columns[name].append(_check_cell(name, field, row[name], where))
        kind = row_kind(row)
        if kind == OOD and _is_missing(row.get("measure")):
            raise ResultsError(f"{where}: OOD row (ood_set {row['ood_set']!r}) needs 'measure', e.g. auroc")
        if kind in (OOD, LABEL_FREE):
            if _is_missing(row.get("value")):
                raise ResultsError(f"{where}: measure row ({row['measure']!r}) needs 'value'")
            if kind == OOD and _is_missing(row.get("score")):
                raise ResultsError(f"{where}: OOD row (ood_set {row['ood_set']!r}) needs 'score'")
        else:
            if kind == CORRUPTION and row.get("severity") is None:
                raise ResultsError(f"{where}: corruption row needs 'severity'")
            if kind != CORRUPTION and (row.get("norm") is None or row.get("eps_test") is None):
                raise ResultsError(f"{where}: adversarial row needs 'norm' and 'eps_test' (or set 'corruption')")
            if _is_missing(row.get("robust_acc")):
                raise ResultsError(
                    f"{where}: {'corruption' if kind == CORRUPTION else 'adversarial'} row needs column "
                    f"'robust_acc' (only measure rows leave it empty)"
                )
        if not _is_missing(row.get("correct")):
            _check_correct(row, where)
        if study is not None and row["study"] != study:
            raise ResultsError(f"{where}: column 'study' is {row['study']!r}, expected {study!r}")
        if config_hash is not None and row["config_hash"] != config_hash:
            raise ResultsError(f"{where}: column 'config_hash' is {row['config_hash']!r}, expected {config_hash!r}")
    # Cells are checked values now (None for every missing one), so plain tuples compare as keys.
    seen: set[tuple] = set()
    for key in zip(*(columns[name] for name in KEY_COLUMNS)):
        if key in seen:
            trial = f"trial {config_hash}" if config_hash else "result rows"
            raise ResultsError(f"{trial}: duplicate rows for {fmt_key(dict(zip(KEY_COLUMNS, key)))}")
        seen.add(key)
    return pa.table({name: pa.array(columns[name], type=SCHEMA.field(name).type) for name in COLUMNS}, schema=SCHEMA)


def _check_correct(row: dict, where: str) -> None:
    """`correct` must decode to n_examples examples whose share correct is the row's robust_acc."""
    from trainables.correct_bits import unpack_correct

    if row_kind(row) != ROBUSTNESS:
        raise ResultsError(f"{where}: column 'correct' is only for robustness rows, this is a {row_kind(row)} row")
    try:
        mask = unpack_correct(row["correct"], int(row["n_examples"]))
    except ValueError as err:
        raise ResultsError(f"{where}: column 'correct': {err}") from None
    if len(mask) and abs(mask.mean() - float(row["robust_acc"])) > 0.5 / len(mask):
        raise ResultsError(f"{where}: column 'correct' has {int(mask.sum())} of {len(mask)} examples correct, "
                           f"but robust_acc is {row['robust_acc']}")


def fmt_key(key: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items() if v is not None and not (isinstance(v, float) and math.isnan(v)))


def row_kinds(frame: pd.DataFrame) -> pd.Series:
    """`trainables.records.row_kind` of every row of a results table (a Series of kind names)."""
    if frame.empty:
        return pd.Series([], index=frame.index, dtype=object)
    return pd.Series([row_kind(r) for r in frame.to_dict("records")], index=frame.index, dtype=object)
