"""The tests' one factory of results: evaluation records (trainables.records.EvalRecord) and the
Parquet rows of orchestrator/results.py's schema built from them.

Columns not given get values that fit the row's kind (`EvalRecord.kind`, decided by the columns
given: ood_set → OOD, measure → label-free, defence → defended, corruption → corruption, else
robustness), so a test names only what it is about.
"""
from __future__ import annotations

import datetime as dt
import json

from orchestrator.result_schema import CONFIG_COLUMNS
from trainables.records import CORRUPTION, DEFENDED, EVAL_COLUMNS, LABEL_FREE, OOD, ROBUSTNESS, EvalRecord

FINISHED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
# A trial's config: the config columns of a result row (plus any other key given, in config_json only).
CONFIG = dict(dataset="fashion_mnist", arch="small_cnn", ssl_task="rotation", ssl_weight=0.5, attack_variant="joint",
              init="scratch", norm_train="linf", eps_train=0.1, train_attack_steps=3, rotations="one", seed=0)

_DEFAULTS = {
    ROBUSTNESS: dict(norm="linf", eps_test=0.1, attack="pgd", attack_steps=10, step_size=0.025, restarts=1,
                     robust_acc=0.5),
    DEFENDED: dict(norm="linf", eps_test=0.1, attack="pgd", attack_steps=10, step_size=0.025, restarts=1,
                   robust_acc=0.5),
    CORRUPTION: dict(attack="none", attack_steps=0, step_size=0.0, restarts=0, severity=1, robust_acc=0.6),
    OOD: dict(attack="none", score="msp", measure="auroc", value=0.9),
    LABEL_FREE: dict(attack="none", value=0.5),
}


def record(**columns) -> EvalRecord:
    """An evaluation record: `columns` (EvalRecord's fields) over the defaults of its kind
    (n_examples 100, clean_acc 0.8)."""
    kind = EvalRecord(**columns).kind
    return EvalRecord(**{"n_examples": 100, "clean_acc": 0.8, **_DEFAULTS[kind], **columns})


def result_row(config: dict | None = None, **columns) -> dict:
    """A Parquet result row: the trial's config columns (CONFIG updated by `config`, all of it in
    config_json), provenance (study "s", config_hash "h0", trial_id "t", node_id "n", FINISHED),
    the evaluation's columns (`record`), and any column of `columns` over those."""
    cfg = {**CONFIG, **(config or {})}
    evaluation = record(**{k: v for k, v in columns.items() if k in EVAL_COLUMNS}).to_row()
    other = {k: v for k, v in columns.items() if k not in EVAL_COLUMNS}
    return {
        **{c: cfg[c] for c in CONFIG_COLUMNS if c in cfg}, "study": "s", "config_hash": "h0", "trial_id": "t",
        "node_id": "n", "finished_at": FINISHED, "config_json": json.dumps(cfg, sort_keys=True),
        **evaluation, **other,
    }
