"""The study's one MLflow writer: a Ray Tune callback in the driver.

The pattern of Ray's own `ray.air.integrations.mlflow.MLflowLoggerCallback` (a run per trial,
created on trial start, fed from what the trial reports, ended on completion or error), extended
with the invocation's parent run, which Ray's lacks. Trials never import MLflow: they report each
epoch's numbers and, at the end, the path of their Parquet file, which this callback reads to log
the trial's result metrics (`orchestrator.metrics`), the file itself and its figure.

Tune runs its callbacks on the driver's event loop, so the slow part (reading the Parquet file,
drawing the figure, metric batches, artifact uploads, ending runs) is handed to one background
thread (`orchestrator.mlflow_writer`) that writes in the order the hooks ran; only a new trial's
run is created on the loop itself, because the trial reads its run id from a file before it
writes its rows. The writer is drained when the invocation ends (`end`, also on errors). The
parent run's heartbeat is renewed by a second such thread, so that it never waits behind uploads.

Failure model: a failed MLflow call never stops the study. The trial's tracking stops at its first
failure (its results are in Parquet); the failures are listed at the end with the
`--backfill-tracking` command that logs them later.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from trainables.records import masking_tags

from . import liveness, models_store, results, run_id_file, storage as storage_mod, tracking
from .metrics import exact_number, summary_metrics, trial_metrics
from .mlflow_writer import BackgroundWriter
from .tracking_problem import Scope, TrackingProblem
from .tracking_uri import TrackingError, one_line, reason

# Report keys that are bookkeeping, not per-epoch measurements.
_NOT_LOGGED = frozenset(AUTO_RESULT_KEYS) | {
    "epoch", "config_hash", "parquet", "mlflow_run_id", "pretrained_here", "reused_result", "done",
    "trial_id", "experiment_tag", "iterations_since_restore", "masking_flags",
    *summary_metrics({"norm_train": "", "eps_train": 0, "eval_attack": "autoattack"}, []),
}
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch


def run_name(factors: dict[str, Any]) -> str:
    """``ssl_weight=0.5 seed=1``: the varying factors of a trial, in the study's own names."""
    return " ".join(f"{k}={exact_number(v) if isinstance(v, float) else v}" for k, v in factors.items()) or "cell"


@dataclass
class _TrialRun:
    config: dict
    config_hash: str
    name: str
    run_id: str | None = None
    error: str | None = None
    logged_result: bool = False
    epochs: dict = field(default_factory=dict)


_active: "StudyTracking | None" = None


def _active_callback():
    """What an unpickled StudyTracking becomes (Tune pickles its RunConfig into the experiment
    folder and, on --resume, unpickles it): this invocation's callback."""
    return _active if _active is not None else Callback()


class StudyTracking(Callback):
    """Writes one study invocation to MLflow. `set_up()` (before `Tuner.fit`) creates the experiment
    and the parent run or, for --resume, takes over the interrupted invocation's parent run; `end()`
    ends it. Child runs are named by the trial's varying factors (`run_name`) and tagged with
    tracking.HASH_TAG (``sslrobust.config_hash``)."""

    def __init__(self, uri: str, study: str, *, storage: str, invocation: str, context, varying: list[str],
                 description: str, spec_text: str, parent_name: str, parent_params: dict, parent_tags: dict,
                 resume_parent_run_id: str | None = None):
        global _active
        self.uri, self.study, self.storage, self.invocation = uri, study, storage, invocation
        self.context, self.varying = context, list(varying)
        self.description, self.spec_text = description, spec_text
        self.parent_name, self.parent_params, self.parent_tags = parent_name, parent_params, parent_tags
        self.resume_parent_run_id = resume_parent_run_id
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.parent_error: str | None = None
        self.trial_errors: dict[str, str] = {}  # config hash -> first failure
        self.warnings: list[str] = []
        self._runs: dict[str, _TrialRun] = {}  # by Tune trial id
        self._cell_results: dict[str, dict] = {}  # run name -> summary of the finished trial
        self._last_beat = 0.0
        self._writer = BackgroundWriter()
        # The heartbeat has a thread of its own: a long artifact upload in the writer must not make
        # this invocation look dead to another one (liveness.STALE_AFTER_S).
        self._beats = BackgroundWriter("mlflow-heartbeat")
        _active = self

    def __reduce__(self):
        return _active_callback, ()

    # -- the invocation ----------------------------------------------------------------------
    def set_up(self) -> int:
        """Experiment and parent run; runs of dead invocations ended as KILLED (their number is
        returned). Raises TrackingError (one line)."""
        self.experiment_id = tracking.study_experiment(self.uri, self.study, self.description)
        if self.resume_parent_run_id:
            tracking.take_over_run(self.uri, self.resume_parent_run_id)
            self.parent_run_id = self.resume_parent_run_id
        else:
            self.parent_run_id = tracking.start_parent_run(
                self.uri, self.experiment_id, self.parent_name, self.study, self.parent_params,
                {**self.parent_tags, tracking.NOTE_TAG: self.description}, spec_text=self.spec_text)
        self._last_beat = time.time()
        return len(tracking.close_stale_runs(self.uri, self.experiment_id, exclude={self.parent_run_id}))

    def end(self, status: str) -> None:
        """Log the per-cell summary to the parent run and end it with ``status``."""
        self._writer.drain()  # everything the trials' hooks handed over is written first
        self._beats.drain()
        if self.parent_run_id is None:
            return
        try:
            self._log_cell_summary()
            tracking.end_run(self.uri, self.parent_run_id, status)
        except TrackingError as err:
            self.parent_error = self.parent_error or str(err)

    def log_report(self, paths: list[str], artifact_path: str) -> str | None:
        """Log the study report's files to the parent run; the error line, if any."""
        if self.parent_run_id is None:
            return "MLflow tracking: no parent run"
        try:
            tracking.log_artifacts(self.uri, self.parent_run_id, paths, artifact_path=artifact_path)
        except TrackingError as err:
            return str(err)
        return None

    def errors(self) -> list[TrackingProblem]:
        """The failures: each trial's first, those of background jobs outside a trial's MLflow
        calls, and the parent run's first."""
        self._writer.drain()
        out = [TrackingProblem(Scope.TRIAL, h, e) for h, e in self.trial_errors.items()]
        out += [TrackingProblem(Scope.WRITER, "", line) for line in self._writer.failures]
        if self.parent_error:
            out.append(TrackingProblem(Scope.PARENT, str(self.parent_run_id), self.parent_error))
        return out

    def _log_cell_summary(self) -> None:
        """Mean and 95% CI half-width over seeds of robust_acc_at_eps_train and clean_acc per cell
        (the trial's factors without seed), as metrics of the parent run named ``<metric>/<cell>``, e.g.
        robust_acc_at_eps_train/ssl_weight:0.5 and robust_acc_at_eps_train_ci95/ssl_weight:0.5."""
        from mlflow.entities import Metric

        from .report.statistics import mean_ci

        cells: dict[str, dict[str, list[float]]] = {}
        for name, summary in self._cell_results.items():
            cell = " ".join(p for p in name.split(" ") if not p.startswith("seed=")) or "all"
            for key in ("robust_acc_at_eps_train", "clean_acc"):
                if summary.get(key) == summary.get(key):
                    cells.setdefault(cell, {}).setdefault(key, []).append(float(summary[key]))
        now = int(time.time() * 1000)
        batch = []
        for cell, values in cells.items():
            cell = re.sub(r"[^\w.\- :]", "_", cell.replace("=", ":"))  # "=" is not allowed in a metric name
            for key, xs in values.items():
                mean, half, n = mean_ci(xs)
                batch.append(Metric(f"{key}/{cell}", float(mean), now, 0))
                if half == half:
                    batch.append(Metric(f"{key}_ci95/{cell}", float(half), now, 0))
        if batch:
            tracking.driver_call(self.uri, "log the parent run's summary", lambda: tracking.client(self.uri).log_batch(
                self.parent_run_id, metrics=batch, synchronous=True))

    # -- Tune's hooks --------------------------------------------------------------------------
    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.keep_alive()

    def keep_alive(self) -> None:
        """Renew the parent run's heartbeat when it is due (also while the driver waits outside
        Tune, e.g. on SSL pre-training), so another invocation never takes this one for dead."""
        if self.parent_run_id is None or time.time() - self._last_beat < liveness.HEARTBEAT_EVERY_S:
            return
        self._last_beat = time.time()
        if not self._beats.pending():  # one at a time: a slow server gets no queue of them
            self._beats.submit(self._heartbeat, "renew the heartbeat")

    def _heartbeat(self) -> None:
        try:  # what tells another invocation (on another host) that this one is alive
            with tracking.bounded_mlflow_http():
                tracking.client(self.uri).set_tag(self.parent_run_id, tracking.HEARTBEAT_TAG, str(int(time.time())))
        except Exception as exc:  # noqa: BLE001 - reported with the parent run's end, if it fails too
            self.parent_error = self.parent_error or f"heartbeat failed ({reason(exc)})"

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        run = self._runs.get(trial.trial_id)
        if run is not None:  # Tune retries the trial: after the writes of its last attempt
            self._submit(run, "start the trial run", lambda c: self._start(c, run), needs_run=False)
            return
        from .spec import config_hash
        from .trainable import trial_config

        config = trial_config(trial.config, self.context)
        chash = config_hash(config)
        if chash in results.completed_hashes(self.storage, self.study):
            return  # the trial reuses an existing result: nothing to track
        factors = trial.config.get("cell") or {k: v for k, v in trial.config.items() if k != "cell"}
        names = [k for k in self.varying if k in factors] or list(factors)
        run = self._runs[trial.trial_id] = _TrialRun(config, chash, run_name({k: factors[k] for k in names}))
        # On the loop, not the writer: the trial reads its run id (run_id_file) before it writes its
        # rows, and a new run has no earlier writes to wait for.
        self._call(run, "start the trial run", lambda c: self._start(c, run), needs_run=False)
        if run.run_id is not None:
            try:
                run_id_file.write(self.storage, self.invocation, trial.trial_id, run.run_id)
            except OSError as err:
                self.warnings.append(f"trial {trial.trial_id}: {err}; its rows have no mlflow_run_id")

    def _start(self, c, run: _TrialRun) -> None:
        from mlflow.entities import Param

        from trainables.config import applicable

        if run.run_id is None:  # a child this parent already has for the cell (--resume) is reused
            found = c.search_runs(
                [self.experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
                filter_string=f"tags.`{tracking.HASH_TAG}` = '{tracking.quote(run.config_hash)}' and "
                              f"tags.`{tracking.PARENT_TAG}` = '{tracking.quote(self.parent_run_id)}'")
            if found:
                run.run_id = found[0].info.run_id
                attempt = found[0].data.tags.get(tracking.ATTEMPT_TAG, "1")
            else:
                tags = {**(self.context.provenance or {}), tracking.PARENT_TAG: self.parent_run_id,
                        tracking.RUN_NAME_TAG: run.name, tracking.HASH_TAG: run.config_hash,
                        tracking.ROLE_TAG: "trial", tracking.STUDY_TAG: self.study, tracking.ATTEMPT_TAG: "1",
                        tracking.NOTE_TAG: f"{self.study}, cell {run.name}; config hash {run.config_hash}"}
                created = c.create_run(self.experiment_id, tags=tracking.tag_dict(tags), run_name=run.name)
                run.run_id = created.info.run_id
                params = tracking.flatten_params(applicable(run.config))
                c.log_batch(run.run_id, params=[Param(k, v) for k, v in params.items()], synchronous=True)
                return
        else:  # Tune retries the trial (its worker died): the same run, one attempt more
            attempt = c.get_run(run.run_id).data.tags.get(tracking.ATTEMPT_TAG, "1")
        c.update_run(run.run_id, status="RUNNING")
        c.set_tag(run.run_id, tracking.ATTEMPT_TAG, str(int(attempt) + 1 if attempt.isdigit() else 2))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run = self._runs.get(trial.trial_id)
        if run is None or run.run_id is None:
            return
        if "epoch" in result:
            from mlflow.entities import Metric

            now, step = int(time.time() * 1000), int(result["epoch"])
            batch = [Metric(tracking.clean_name(k), float(v), now, step) for k, v in result.items()
                     if k not in _NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool)]
            if batch and run.epochs.get(step) != len(batch):  # the final report repeats the last epoch
                run.epochs[step] = len(batch)
                self._submit(run, f"log epoch {step}",
                             lambda c: c.log_batch(run.run_id, metrics=batch, synchronous=True))
        if result.get("reused_result"):  # another invocation trained this cell meanwhile: not ours
            def delete(c):
                c.delete_run(run.run_id)
                run.run_id = None

            self._submit(run, "delete the run of a cell trained elsewhere", delete)
        elif result.get("parquet") and not run.logged_result:
            run.logged_result = True
            self._writer.submit(lambda: self._log_result(run), f"log the results of trial '{run.name}'")

    def _log_result(self, run: _TrialRun) -> None:
        """(In the writer.) The trial's Parquet rows as metrics and tags, the file and its figure."""
        from mlflow.entities import Metric

        from .trial_figure import trial_curve_png

        try:
            table = results.trial_table(self.storage, self.study, run.config_hash)
        except Exception as exc:  # noqa: BLE001 - the trial's tracking fails (its run is left for the backfill)
            error = exc

            def unreadable(c):
                raise error

            self._call(run, "log the trial's results", unreadable)
            return
        records = table.astype(object).where(table.notna(), None).to_dict("records")
        self._cell_results[run.name] = summary_metrics(run.config, records)  # the parent's summary

        def log(c):  # (what fails in here, reading included, is the trial's tracking failure)
            now = int(time.time() * 1000)
            metrics = [Metric(n, v, now, s) for n, v, s in trial_metrics(run.config, records)]
            fs, path = storage_mod.filesystem_and_path(
                f"{results.study_dir(self.storage, self.study)}/{run.config_hash}.parquet")
            tags = masking_tags(records)  # gradient-masking checks that fired, as run tags
            if len(table) and isinstance(table["node_id"].iloc[0], str):  # where it ran (known once it reports)
                tags["sslrobust.node_id"] = table["node_id"].iloc[0]
            for key, value in tags.items():
                c.set_tag(run.run_id, key, value)
            for i in range(0, len(metrics), _METRICS_PER_BATCH):
                c.log_batch(run.run_id, metrics=metrics[i:i + _METRICS_PER_BATCH], synchronous=True)
            with tempfile.TemporaryDirectory() as folder:
                with fs.open_input_stream(path) as src, open(os.path.join(folder, f"{run.config_hash}.parquet"), "wb") as f:
                    f.write(src.read())
                with open(os.path.join(folder, "robust_accuracy_curve.png"), "wb") as f:
                    f.write(trial_curve_png(records, run.config, f"{self.study}: {run.name}"))
                for name in sorted(os.listdir(folder)):
                    c.log_artifact(run.run_id, os.path.join(folder, name))
            with tempfile.TemporaryDirectory() as folder:  # the kept model (orchestrator.models_store)
                for name in models_store.file_names(run.config_hash):
                    model_fs, model_path = storage_mod.filesystem_and_path(
                        f"{models_store.models_dir(self.storage, self.study)}/{name}")
                    if model_fs.get_file_info(model_path).type == pafs.FileType.File:
                        with model_fs.open_input_stream(model_path) as src, open(os.path.join(folder, name), "wb") as f:
                            f.write(src.read())
                        c.log_artifact(run.run_id, os.path.join(folder, name), "model")

        self._call(run, "log the trial's results", log)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        run = self._runs.get(trial.trial_id)
        if run is not None:
            self._submit(run, f"end the run as {status}", lambda c: c.set_terminated(run.run_id, status))

    def on_experiment_end(self, trials: list, **info) -> None:
        self._writer.drain()

    # -- plumbing ------------------------------------------------------------------------------
    def _submit(self, run: _TrialRun, what: str, fn, needs_run: bool = True) -> None:
        """`_call` in the background writer, after every write handed over before it."""
        self._writer.submit(lambda: self._call(run, what, fn, needs_run), f"{what} for trial '{run.name}'")

    def _call(self, run: _TrialRun, what: str, fn, needs_run: bool = True) -> None:
        """fn(client) unless the trial's tracking failed before (or, with needs_run, it has no run);
        its first failure is kept."""
        if run.error is not None or self.parent_run_id is None or (needs_run and run.run_id is None):
            return
        try:
            with tracking.bounded_mlflow_http():
                fn(tracking.client(self.uri))
        except Exception as exc:  # noqa: BLE001 - tracking never stops the science
            run.error = (f"MLflow tracking at {self.uri} failed to {what} for trial '{run.name}' "
                         f"({reason(exc)}); tracking for this trial is off from here on")
            self.trial_errors.setdefault(run.config_hash, run.error)
            print(f"WARNING: {one_line(run.error)}", flush=True)
