"""Log to MLflow the results that reached Parquet while the tracking server was unreachable."""
from __future__ import annotations

import json

from . import results, storage as storage_mod, tracking


def backfill(spec, storage: str, tracking_uri: str | None) -> int:
    storage = storage_mod.normalize(storage)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    table = results.own_evaluation(results.load(spec.name, storage))  # re-evaluations: orchestrator.evaluate
    rows_by_hash = {h: g.to_dict("records") for h, g in table.groupby("config_hash")} if len(table) else {}
    configs = {h: json.loads(rows[0]["config_json"]) for h, rows in rows_by_hash.items()}
    # Runs the interrupted invocation could not end (its parent, trials cut off mid-run) are
    # RUNNING forever otherwise; trials among them are then completed from their Parquet rows.
    stale = tracking.close_stale_runs(uri, tracking.study_experiment(uri, spec.name))
    if stale:
        print(f"marked {len(stale)} MLflow run(s) left RUNNING by an interrupted invocation as KILLED")
    from .trainable import summary_metrics  # the same summary numbers as a live trial logs

    written = tracking.backfill_from_results(uri, spec.name, rows_by_hash, configs, summary_metrics=summary_metrics)
    print(f"logged {written} trial(s) of {spec.name} to MLflow at {uri} "
          f"({len(rows_by_hash) - written} were already there)")
    return written
