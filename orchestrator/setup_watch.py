"""The driver's watch on the TrackingService's set-up of the study's MLflow experiment and parent run."""
from __future__ import annotations

from typing import Callable

import ray
from ray.tune import Stopper

from .tracking import _one_line

# The metric a trial reports instead of results when its set-up failed (one line for the user).
SETUP_ERROR = "setup_error"


class SetupWatch(Stopper):
    """The driver's side of the service's set-up, checked at every step of the Tune loop without
    waiting. Once it is done, ``on_ready(setup)`` runs; if it failed, every trial is stopped (a
    trial writes nothing before it knows its run) and the driver reports the one-line error.
    A Stopper, not a Callback: Tune's usage statistics on RunConfig callbacks import every logging
    integration Ray ships, MLflow's among them (0.9 s of the driver's CPU as the trials start)."""

    def __init__(self, setup_ref, on_ready: Callable[[dict], None]):
        self._ref, self._on_ready = setup_ref, on_ready
        self._setup: dict | None = None
        self.trial_setup_error: str | None = None  # e.g. a dataset a node could not fetch

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get(SETUP_ERROR) and self.trial_setup_error is None:
            self.trial_setup_error = str(result[SETUP_ERROR])
        return False

    def stop_all(self) -> bool:
        if self.trial_setup_error is not None:
            return True
        if self._setup is None and not ray.wait([self._ref], timeout=0)[0]:
            return False
        return "error" in self.wait()

    def wait(self) -> dict:
        """The set-up's result (waits for it)."""
        if self._setup is None:
            try:
                self._setup = ray.get(self._ref)
            except Exception as exc:  # noqa: BLE001 - e.g. the service's process died
                self._setup = {"error": f"the MLflow tracking service failed before setting up the study "
                                        f"({type(exc).__name__}: {_one_line(str(exc), 200)})"}
            if "error" not in self._setup:
                self._on_ready(self._setup)
        return self._setup
