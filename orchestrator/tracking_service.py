"""The study's one MLflow writer: a Ray actor on the driver's node that sets up the study's
experiment and parent run and records every trial's child run.

Neither the driver nor the trials import MLflow. Importing it and opening its store cost ~1.5 s in
each process before its first trial, several processes writing one sqlite file contend for its
lock, and a sqlite file on the head node is out of reach of trials on other nodes. The service sets
the study up while the driver starts the trials (`setup_watch.SetupWatch` stops the study if that
fails). A trial holds a `RemoteTrialTracker`, which queues its calls in the service; it waits only
for its run id (before writing its Parquet rows) and until the service holds its run's end, so
logging never holds up training. `TrialTracker`'s failure model holds: a tracking failure is
reported, never raised into the science.
"""
from __future__ import annotations

import os
import queue
import tempfile
import threading
from typing import Any

import ray

from . import tracking
from .errors import UserError
from .tracking import TrialTracker


class TrackingService:
    """One per study invocation (see `start_tracking_service`).

    One writer thread makes every MLflow call, in the order the calls arrived; the actor's methods
    only queue work and return, so a trial never waits for MLflow except for its run id, which it
    needs for its Parquet rows (by then its run exists). The writer starts by setting up the
    study's experiment and parent run, so the driver never imports MLflow and goes on starting
    trials meanwhile. Ray runs the calls of one caller in the order it made them."""

    def __init__(self, uri: str, study: str, resume_parent_run_id: str | None, parent_params: dict,
                 parent_tags: dict):
        self.uri = uri
        self._setup: dict | None = None
        self._known_children: set[str] | None = None
        self._trials: dict[str, _TrialRun] = {}  # by attempt
        self._errors: list[str] = []  # "<config hash>: <error>" of trials whose tracking failed
        self._work: queue.Queue = queue.Queue()
        self._setup_done = threading.Event()
        self._work.put(lambda: self._set_up(study, resume_parent_run_id, parent_params, parent_tags))
        threading.Thread(target=self._write, name="mlflow-writer", daemon=True).start()

    def _write(self) -> None:
        while True:
            job = self._work.get()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - TrialTracker never raises; this is a bug guard
                self._errors.append(f"tracking service: {type(exc).__name__}: {exc}")
            finally:
                self._work.task_done()

    # -- the writer's jobs -----------------------------------------------------------------
    def _set_up(self, study, resume_parent, params, tags) -> None:
        try:
            experiment_id = tracking.study_experiment(self.uri, study)
            if resume_parent:
                tracking.reopen_run(self.uri, resume_parent)
                parent_run_id = resume_parent
            else:
                parent_run_id = tracking.start_parent_run(self.uri, experiment_id, study, params, tags)
            stale = tracking.close_stale_runs(self.uri, experiment_id, exclude={parent_run_id})
            self._setup = {"experiment_id": experiment_id, "parent_run_id": parent_run_id, "stale": len(stale)}
            try:  # a resumed invocation's parent has children: list them once, not per trial
                self._known_children = tracking.child_run_hashes(self.uri, experiment_id, parent_run_id)
            except UserError:
                self._known_children = None  # each trial then searches for its own run
        except UserError as err:
            self._setup = {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - one line for the driver, never a traceback
            self._setup = {"error": f"MLflow tracking at {self.uri} failed to set up study '{study}' "
                                    f"({tracking._reason(err)})"}
        finally:
            self._setup_done.set()

    def _start(self, trial: "_TrialRun", params, tags) -> None:
        setup = self._setup
        try:
            if "error" not in setup:
                tracker = trial.tracker = TrialTracker(self.uri, setup["experiment_id"], setup["parent_run_id"],
                                                       trial.config_hash, trial.run_name)
                known = self._known_children
                tracker.start(params=params, tags=tags, search_existing=known is None or trial.config_hash in known)
                if tracker.run_id is not None and known is not None:
                    known.add(trial.config_hash)
        finally:
            trial.started.set()  # run_id() waits for this

    def _finish(self, trial: "_TrialRun", result_metrics, artifacts, status, tags=None) -> None:
        tracker = trial.tracker
        if tracker is None:
            return
        if tags:
            tracker.set_tags(tags)
        if result_metrics:
            tracker.log_result_metrics(result_metrics)
        with tempfile.TemporaryDirectory() as folder:  # MLflow logs artifacts from files
            for name, content in artifacts.items():
                path = os.path.join(folder, os.path.basename(name))
                with open(path, "wb") as f:
                    f.write(content)
                tracker.log_artifact(path)
        tracker.finish(status)
        if tracker.error:
            self._errors.append(f"{trial.config_hash}: {tracker.error}")
        for warning in tracker.warnings:  # not failures (e.g. a non-numeric metric): the trial's log
            print(f"WARNING: MLflow run of trial '{trial.run_name}': {warning}", flush=True)

    # -- calls ------------------------------------------------------------------------------
    def setup(self) -> dict:
        """{"experiment_id", "parent_run_id", "stale"} (runs of dead invocations marked KILLED),
        or {"error": one line}. Waits for the set-up."""
        self._setup_done.wait()
        return self._setup

    def start(self, attempt: str, config_hash: str, run_name: str, params: dict, tags: dict) -> None:
        """Start the trial's child run, or reuse the one a failed attempt of it left under the parent."""
        trial = self._trials[attempt] = _TrialRun(config_hash, run_name)
        self._work.put(lambda: self._start(trial, params, tags))

    def run_id(self, attempt: str) -> tuple[str | None, str | None]:
        """(the trial's run id, the error that stopped its tracking); waits for the run."""
        trial = self._trials.get(attempt)
        if trial is None:
            return None, "MLflow tracking: the trial's run was never started"
        trial.started.wait()
        if trial.tracker is None:
            return None, self._setup.get("error", "MLflow tracking: the trial's run could not be started")
        return trial.tracker.run_id, trial.tracker.error

    def log_metrics(self, attempt: str, metrics: dict[str, float], step: int) -> None:
        trial = self._trials.get(attempt)
        if trial is not None:
            self._work.put(lambda: trial.tracker and trial.tracker.log_metrics(metrics, step))

    def finish(self, attempt: str, result_metrics: dict[str, float], artifacts: dict[str, bytes],
               status: str, tags: dict | None = None) -> None:
        """Log the final metrics, tags and the artifacts (file name -> content) and end the run
        with ``status``; failures are reported by `drain`."""
        trial = self._trials.pop(attempt, None)
        if trial is not None:
            self._work.put(lambda: self._finish(trial, result_metrics, artifacts, status, tags))

    def drain(self) -> list[str]:
        """Wait until everything queued is written; the trials' tracking errors."""
        self._work.join()
        return list(self._errors)

    def end_parent(self, status: str) -> str | None:
        """After everything queued: end the parent run with ``status``; the error line, if any."""
        return self._on_parent(lambda parent: tracking.end_run(self.uri, parent, status), without_parent_fails=False)

    def log_report(self, paths: list[str], artifact_path: str) -> str | None:
        """Log the study report's files (on this node: the driver's) to the parent run; the error
        line, if any."""
        return self._on_parent(
            lambda parent: tracking.log_artifacts(self.uri, parent, paths, artifact_path=artifact_path),
            without_parent_fails=True)

    def _on_parent(self, call, without_parent_fails: bool) -> str | None:
        """``call(parent run id)`` once everything queued is written; its error line. If the set-up
        failed there is no parent run: the set-up's error if ``without_parent_fails``, else None."""
        self.drain()
        if "error" in self._setup:
            return self._setup["error"] if without_parent_fails else None
        try:
            call(self._setup["parent_run_id"])
        except UserError as err:
            return str(err)
        return None


class _TrialRun:
    """One trial attempt's run, as the writer thread fills it in."""

    def __init__(self, config_hash: str, run_name: str):
        self.config_hash, self.run_name = config_hash, run_name
        self.tracker: TrialTracker | None = None
        self.started = threading.Event()


def start_tracking_service(uri: str, study: str, resume_parent_run_id: str | None, parent_params: dict,
                           parent_tags: dict):
    """Start the study's TrackingService on this (the driver's) node, where a sqlite file or a
    127.0.0.1 tracking URI means what it means here, and set it to work at once. It reserves no
    CPU: trials keep theirs. Returns (the actor, the ObjectRef of its `setup()`)."""
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
    if not ray.util.client.ray.is_connected():  # under Ray Client the driver is not on a node
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False)
    service = ray.remote(TrackingService).options(**options).remote(
        uri, study, resume_parent_run_id, parent_params, parent_tags)
    return service, service.setup.remote()


class RemoteTrialTracker:
    """The trial's side of the TrackingService: `TrialTracker`'s calls (artifacts as bytes), queued
    in the service. Never raises. Failures inside the service reach the driver
    (`TrackingService.drain`); ``error`` holds those of reaching the service (its process died),
    after which the trial's calls are skipped."""

    def __init__(self, service, setup_ref, config_hash: str, run_name: str, attempt: str):
        self._service, self._setup_ref = service, setup_ref
        self.config_hash, self.run_name, self._attempt = config_hash, run_name, attempt
        self._run_id: tuple[str | None, str | None] | None = None  # (run id, error) once asked
        self._setup_failed: bool | None = None
        self.error: str | None = None
        self._result_metrics: dict[str, float] = {}
        self._artifacts: dict[str, bytes] = {}
        self._tags: dict[str, str] = {}

    @property
    def ok(self) -> bool:
        return self.error is None

    def _call(self, what: str, method, *args, wait: bool = False):
        if self.error is not None:
            return None
        try:
            ref = method.remote(self._attempt, *args)
            return ray.get(ref) if wait else None
        except Exception as exc:  # noqa: BLE001 - e.g. the service's process died
            reason = tracking._one_line(str(exc)) or type(exc).__name__
            self.error = (f"MLflow tracking service failed to {what} for trial '{self.run_name}' "
                          f"({type(exc).__name__}: {reason}); tracking for this trial is off from here on")
            return None

    def setup_failed(self) -> bool:
        """Whether the study's MLflow set-up failed (the driver is then stopping the study). Waits
        for the set-up: ask before writing anything."""
        if self._setup_failed is None:
            try:
                self._setup_failed = "error" in ray.get(self._setup_ref)
            except Exception:  # noqa: BLE001 - a dead service is a tracking failure, not a set-up one
                self._setup_failed = False
        return self._setup_failed

    def start(self, params: dict, tags: dict) -> None:
        self._call("start the trial run", self._service.start, self.config_hash, self.run_name, params, tags)

    @property
    def run_id(self) -> str | None:
        """The trial's run id (waits for the service to have created the run); None if tracking failed."""
        if self._run_id is None:
            self._run_id = self._call("start the trial run", self._service.run_id, wait=True) or (None, None)
        return self._run_id[0]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call(f"log metrics at step {step}", self._service.log_metrics, metrics, step)

    def log_result_metrics(self, metrics: dict[str, float]) -> None:
        self._result_metrics.update(metrics)  # sent with finish(): one call for the trial's end

    def set_tags(self, tags: dict[str, str]) -> None:
        self._tags.update(tags)  # sent with finish(), like the result metrics

    def log_artifact_content(self, name: str, content: bytes) -> None:
        """An artifact file `name` with `content`, logged with the run's end (`finish`)."""
        self._artifacts[name] = content

    def finish(self, status: str = "FINISHED") -> None:
        """Hand the run's end to the service; waits only until the service has it, so a trial
        that ends (or a worker Tune stops) right after cannot lose it."""
        self.run_id  # noqa: B018 - kept readable after the service has let go of the trial
        self._call(f"end the run as {status}", self._service.finish, self._result_metrics, self._artifacts,
                   status, self._tags, wait=True)
        self._artifacts = {}
