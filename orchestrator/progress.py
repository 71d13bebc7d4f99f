"""The study's console: one compact line per event instead of Ray Tune's per-trial boxes.

    [weight_sweep] 3/8 done, 2 running, 3 pending, ETA 2m10s | ssl_weight=0.5 seed=1: robust 0.612 at ε_train

A line is printed when a trial finishes or fails, and otherwise at most every EVERY_S seconds.
`python -m orchestrator.study ... --tune-output` shows Tune's own output instead.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from ray.tune import Callback

from .mlflow_callback import run_name
from .trainable import TRAIN_SECONDS

EVERY_S = 60.0
_active: "ProgressLine | None" = None


def _active_progress():
    """What an unpickled ProgressLine becomes (Tune pickles its RunConfig): this invocation's."""
    return _active if _active is not None else Callback()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@contextlib.contextmanager
def quiet_tune():
    """Around `Tuner.fit` in the compact mode: no Tune start banner, no Tune summary lines.

    Ray 2.60's default console output prints its "Configuration for experiment" box and "View
    detailed results here" at every start whatever `RunConfig(verbose=...)` says
    (ray/tune/tune.py calls `experiment_started` on the reporter for verbose 0 too). Its other
    output engine, chosen with RAY_AIR_NEW_OUTPUT=0 (the switch Ray's own examples use for their
    own reporters), prints nothing at verbose 0. The "Wrote the latest version of all result
    files" info line of the `ray.tune` logger goes too; its warnings stay. A RAY_AIR_NEW_OUTPUT
    the user exported is left as it is."""
    added = "RAY_AIR_NEW_OUTPUT" not in os.environ
    if added:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        tune_logger.setLevel(level)
        if added:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


class ProgressLine(Callback):
    def __init__(self, study: str, varying: list[str], out=sys.stdout):
        global _active
        self.study, self.varying, self.out = study, list(varying), out
        self.started = time.time()
        self.latest: dict[str, str] = {}  # run name -> latest robust accuracy text
        self.seconds: dict[str, float] = {}  # run name -> its trial's time so far, trials that train only
        self.finished: list[float] = []  # the seconds of each trial that finished
        self.slots = 1  # the most trials seen running at once
        self._last = 0.0
        _active = self

    def __reduce__(self):
        return _active_progress, ()

    def _name(self, trial) -> str:
        factors = trial.config.get("cell") or {k: v for k, v in trial.config.items() if k != "cell"}
        return run_name({k: factors[k] for k in self.varying if k in factors} or factors)

    def line(self, trials: list, note: str = "", ending=None) -> str:
        """The progress line; ``ending``: a trial Tune is finishing (its status is not final yet)."""
        states = [("TERMINATED" if t is ending else t.status) for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in states)
        running, pending = states.count("RUNNING"), sum(s in ("PENDING", "PAUSED") for s in states)
        self.slots = max(self.slots, running + (ending is not None))
        text = f"[{self.study}] {done}/{len(trials)} done, {running} running, {pending} pending"
        if done and done < len(trials):
            text += f", ETA {_duration(self._remaining(done, len(trials), running, pending))}"
        elapsed = _duration(time.time() - self.started)
        return f"{text}, {elapsed} elapsed" + (f" | {note}" if note else "")

    def _remaining(self, done: int, total: int, running: int, pending: int) -> float:
        """Seconds left: the trials still to run times the mean finished trial's seconds, shared by
        the slots that ran side by side (a running trial counted half done). Without trial seconds,
        the elapsed time per finished trial, which overstates early on: when the first trial ends,
        the one beside it has nearly finished too."""
        if self.finished:
            return (pending + 0.5 * running) * sum(self.finished) / len(self.finished) / self.slots
        return (time.time() - self.started) / done * (total - done)

    def _print(self, trials, note: str = "", ending=None) -> None:
        self._last = time.time()
        print(self.line(trials, note, ending), file=self.out, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get("robust_acc_at_eps_train")
        if value is not None and value == value:
            self.latest[self._name(trial)] = f"robust {float(value):.3f} at ε_train"
        # a trial whose cell already had results reports at once: its seconds say nothing of the rest
        if TRAIN_SECONDS in result and result.get("time_total_s") is not None:
            self.seconds[self._name(trial)] = float(result["time_total_s"])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        name = self._name(trial)
        if name in self.seconds:
            self.finished.append(self.seconds[name])
        self._print(trials, f"{name}: {self.latest.get(name, 'done')}", ending=trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(trials, f"{self._name(trial)}: FAILED", ending=trial)

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.time() - self._last >= EVERY_S and trials:
            self._print(trials)
