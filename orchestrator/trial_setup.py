"""A trial's set-up error (e.g. a dataset its node could not fetch) stops the whole study.

Retrying such a trial cannot help, and every other trial would meet the same error: the trial
reports `SETUP_ERROR` (one line for the user) instead of results and ends without raising, so
nothing counts against `max_failures`; `TrialSetupWatch`, a Tune Stopper in the driver, then stops
every trial and the driver exits with that line.
"""
from __future__ import annotations

from ray.tune import Stopper

# The metric a trial reports instead of results when its set-up failed.
SETUP_ERROR = "setup_error"


class TrialSetupWatch(Stopper):
    def __init__(self):
        self.error: str | None = None  # the first trial set-up error, one line

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get(SETUP_ERROR) and self.error is None:
            self.error = str(result[SETUP_ERROR])
        return False

    def stop_all(self) -> bool:
        return self.error is not None
