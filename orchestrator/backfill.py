"""Log to MLflow the results that reached Parquet while the tracking server was unreachable.

Each trial gets exactly what the live tracking callback logs (`metrics.trial_metrics` from the
trial's Parquet rows, its applicable settings as params, its factors as the run name): an
unfinished run of the trial (left RUNNING/KILLED/FAILED when tracking broke) is completed;
otherwise a child run is created under a new parent run tagged sslrobust.role=backfill.
Idempotent: a trial with a FINISHED run is skipped.
"""
from __future__ import annotations

import json
import time

from trainables.config import applicable

from . import results, storage as storage_mod, tracking
from .metrics import trial_metrics
from .mlflow_callback import run_name


def backfill(spec, storage: str, tracking_uri: str | None) -> int:
    storage = storage_mod.normalize(storage)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    table = results.own_evaluation(results.load(spec.name, storage))  # re-evaluations: orchestrator.evaluate
    rows_by_hash = {h: g.astype(object).where(g.notna(), None).to_dict("records")
                    for h, g in table.groupby("config_hash")} if len(table) else {}
    experiment_id = tracking.study_experiment(uri, spec.name)
    # Runs the interrupted invocation could not end (its parent, trials cut off mid-run) are
    # RUNNING forever otherwise; trials among them are then completed from their Parquet rows.
    stale = tracking.close_stale_runs(uri, experiment_id)
    if stale:
        print(f"marked {len(stale)} MLflow run(s) left RUNNING by an interrupted invocation as KILLED")
    varying = spec.varying()
    names = {t.config_hash: run_name({k: t.factors[k] for k in varying if k in t.factors}) for t in spec.trials()}
    written = backfill_rows(uri, experiment_id, spec.name, rows_by_hash, names)
    print(f"logged {written} trial(s) of {spec.name} to MLflow at {uri} "
          f"({len(rows_by_hash) - written} were already there)")
    return written


def backfill_rows(uri: str, experiment_id: str, study: str, rows_by_hash: dict[str, list[dict]],
                  names: dict[str, str]) -> int:
    """Write the runs of the trials in ``rows_by_hash`` (Parquet rows, missing cells None) that
    have no FINISHED run; returns how many were written."""
    from mlflow.entities import Metric, Param, RunTag

    def run():
        c = tracking.client(uri)
        by_hash: dict[str, list] = {}
        for r in tracking.search_all(c, experiment_id, f"tags.`{tracking.ROLE_TAG}` = 'trial'"):
            if tracking.HASH_TAG in r.data.tags:
                by_hash.setdefault(r.data.tags[tracking.HASH_TAG], []).append(r)
        parent_id, written = None, 0
        try:
            for chash in sorted(rows_by_hash):
                rows = rows_by_hash[chash]
                runs = by_hash.get(chash, [])
                if not rows or any(r.info.status == "FINISHED" for r in runs):
                    continue
                config = json.loads(rows[0]["config_json"])
                name = names.get(chash) or f"{study}-{chash[:8]}"
                tags = {tracking.BACKFILLED_TAG: "true"}
                existing = max(runs, key=lambda r: r.info.start_time or 0) if runs else None
                if existing is None:
                    if parent_id is None:
                        parent_id = c.create_run(experiment_id, run_name=f"{study} backfill {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                                 tags={**tracking.provenance_tags(), tracking.ROLE_TAG: "backfill",
                                                       tracking.STUDY_TAG: study}).info.run_id
                    run_id = c.create_run(experiment_id, run_name=name, tags={
                        **tags, tracking.PARENT_TAG: parent_id, tracking.RUN_NAME_TAG: name,
                        tracking.HASH_TAG: chash, tracking.ROLE_TAG: "trial", tracking.STUDY_TAG: study,
                        tracking.ATTEMPT_TAG: "1"}).info.run_id
                    done_params: dict = {}
                else:
                    run_id, done_params = existing.info.run_id, dict(existing.data.params)
                    if existing.info.status != "RUNNING":
                        c.update_run(run_id, status="RUNNING")
                params = {k: v for k, v in tracking.flatten_params(applicable(config)).items() if k not in done_params}
                now = int(time.time() * 1000)
                metrics = [Metric(n, v, now, s) for n, v, s in trial_metrics(config, rows)]
                for i in range(0, max(len(metrics), 1), 1000):
                    c.log_batch(run_id, metrics=metrics[i:i + 1000], params=params and [Param(k, v) for k, v in params.items()],
                                tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
                    params, tags = {}, {}
                c.set_terminated(run_id, "FINISHED")
                written += 1
        except BaseException:
            if parent_id is not None:
                try:
                    c.set_terminated(parent_id, "FAILED")
                except Exception:  # noqa: BLE001 - the original failure is the one to report
                    pass
            raise
        if parent_id is not None:
            c.set_terminated(parent_id, "FINISHED")
        return written

    return tracking.driver_call(uri, f"backfill runs of study '{study}'", run)
