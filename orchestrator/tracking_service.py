"""The study's one MLflow writer: a Ray actor on the driver's node that records every trial's child run.

Trials do not talk to MLflow themselves. Importing MLflow and opening its store cost each worker
~1.3 s before its first trial, several workers writing one sqlite file contend for its lock, and a
sqlite file on the head node is out of reach of trials on other nodes. The trial holds a
`RemoteTrialTracker`, which forwards its calls to the study's `TrackingService`; only starting the
run and finishing it wait for an answer, so logging never holds up training. The service keeps
`TrialTracker`'s failure model: a tracking failure is reported, never raised into the science.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import ray

from .tracking import TrialTracker, child_run_hashes


class TrackingService:
    """One per study invocation (see `start_tracking_service`). Calls from one trial run in the
    order the trial made them: Ray runs an actor's calls from one caller in submission order."""

    def __init__(self, uri: str):
        import mlflow  # noqa: F401 - the slow part: done while the driver creates the parent run

        self.uri = uri
        self._parent: tuple[str, str] | None = None  # (experiment id, parent run id)
        self._known_children: set[str] | None = None
        self._trackers: dict[str, TrialTracker] = {}

    def open(self, experiment_id: str, parent_run_id: str) -> None:
        """List the parent's existing child runs (a resumed invocation has some) once, so a new
        trial's run is created without searching for it. Without that list (it failed) each trial
        searches for its own run."""
        if self._parent == (str(experiment_id), parent_run_id):
            return
        self._parent = (str(experiment_id), parent_run_id)
        try:
            self._known_children = child_run_hashes(self.uri, *self._parent)
        except Exception:  # noqa: BLE001 - a real problem shows again in the trial's own calls
            self._known_children = None

    def start(self, attempt: str, experiment_id: str, parent_run_id: str, config_hash: str, run_name: str,
              params: dict, tags: dict, existing_run_id: str | None) -> tuple[str | None, str | None]:
        """Start (or reuse) the trial's child run: (run id, error)."""
        self.open(experiment_id, parent_run_id)
        tracker = TrialTracker(self.uri, experiment_id, parent_run_id, config_hash, run_name)
        self._trackers[attempt] = tracker
        known = self._known_children
        tracker.start(params=params, tags=tags, existing_run_id=existing_run_id,
                      search_existing=known is None or config_hash in known)
        if tracker.run_id is None:
            self._trackers.pop(attempt)
        elif known is not None:
            known.add(config_hash)
        return tracker.run_id, tracker.error

    def log_metrics(self, attempt: str, metrics: dict[str, float], step: int) -> None:
        if attempt in self._trackers:
            self._trackers[attempt].log_metrics(metrics, step)

    def finish(self, attempt: str, result_metrics: dict[str, float], artifacts: dict[str, bytes],
               status: str) -> tuple[str | None, list[str]]:
        """Log the final metrics and the artifacts (file name -> content), end the run with
        ``status``: (error, warnings)."""
        tracker = self._trackers.pop(attempt, None)
        if tracker is None:
            return "MLflow tracking: the trial's run was never started", []
        if result_metrics:
            tracker.log_result_metrics(result_metrics)
        with tempfile.TemporaryDirectory() as folder:
            for name, content in artifacts.items():
                path = os.path.join(folder, os.path.basename(name))
                with open(path, "wb") as f:
                    f.write(content)
                tracker.log_artifact(path)
        tracker.finish(status)
        return tracker.error, tracker.warnings


def start_tracking_service(uri: str):
    """Start the study's TrackingService on this (the driver's) node, where a sqlite file or a
    127.0.0.1 tracking URI means what it means here. It reserves no CPU: trials keep theirs."""
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
    if not ray.util.client.ray.is_connected():  # under Ray Client the driver is not on a node
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(TrackingService).options(**options).remote(uri)


class RemoteTrialTracker:
    """The trial's side of the TrackingService, with `TrialTracker`'s interface: ``run_id``,
    ``ok``, ``error``, ``warnings``. Never raises: a dead service turns tracking off for the trial."""

    def __init__(self, service, experiment_id: str, parent_run_id: str, config_hash: str, run_name: str,
                 attempt: str):
        self._service, self._parent = service, (experiment_id, parent_run_id)
        self.config_hash, self.run_name, self._attempt = config_hash, run_name, attempt
        self._started = None  # ObjectRef of (run id, error): fetched when the run id is needed
        self._run_id: str | None = None
        self.error: str | None = None
        self.warnings: list[str] = []
        self._result_metrics: dict[str, float] = {}
        self._artifacts: dict[str, bytes] = {}

    @property
    def ok(self) -> bool:
        return self.error is None

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.error is None:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            self.error = (f"MLflow tracking service failed to {what} for trial '{self.run_name}' "
                          f"({type(exc).__name__}: {reason}); tracking for this trial is off from here on")

    def start(self, params: dict, tags: dict, existing_run_id: str | None = None) -> None:
        """Ask for the run; the answer is awaited only when ``run_id`` is first read."""
        try:
            self._started = self._service.start.remote(self._attempt, *self._parent, self.config_hash,
                                                       self.run_name, params, tags, existing_run_id)
        except Exception as exc:  # noqa: BLE001
            self._fail("start the trial run", exc)

    @property
    def run_id(self) -> str | None:
        if self._started is not None:
            ref, self._started = self._started, None
            try:
                self._run_id, error = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - e.g. the service's process died
                self._fail("start the trial run", exc)
            else:
                self.error = self.error or error
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.error is None:
            try:
                self._service.log_metrics.remote(self._attempt, metrics, step)
            except Exception as exc:  # noqa: BLE001
                self._fail(f"log metrics at step {step}", exc)

    def log_result_metrics(self, metrics: dict[str, float]) -> None:
        self._result_metrics.update(metrics)  # sent with finish(): one call for the trial's end

    def log_artifact(self, local_path: str) -> None:
        try:
            with open(local_path, "rb") as f:
                self._artifacts[os.path.basename(local_path)] = f.read()
        except OSError as exc:
            self.warnings.append(f"artifact {local_path} is unreadable ({exc}); not logged")

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is None or self.error is not None:
            return
        try:
            error, warnings = ray.get(self._service.finish.remote(
                self._attempt, self._result_metrics, self._artifacts, status))
        except Exception as exc:  # noqa: BLE001
            self._fail(f"end the run as {status}", exc)
        else:
            self.error = error
            self.warnings.extend(warnings)
        self._artifacts.clear()
