"""The tracking callback's MLflow calls, run off Ray Tune's event loop.

Tune calls its callbacks on the driver's one event loop; every second spent there holds up every
trial's results (and Tune warns "process_trial_result took 0.64 s"). The callback therefore only
decides *what* to log and hands each write to one background thread, which runs them one at a
time in the order they were handed over (so a run's writes keep their order: created, metrics,
artifacts, ended). `drain()` waits for everything handed over so far; the callback drains at the
end of the experiment, on errors and before it reads what the writes left behind.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

from .tracking_uri import one_line


class BackgroundWriter:
    """A FIFO of zero-argument jobs run by a single daemon thread, started on the first `submit`.

    A job that raises does not stop the thread: its exception is kept in `failures` (one line each)
    and printed as a WARNING, so a bug in a job is reported, never swallowed."""

    def __init__(self, name: str = "mlflow-writer"):
        self.name = name
        self.failures: list[str] = []
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None], what: str = "") -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put((job, what))

    def pending(self) -> int:
        """Jobs handed over and not finished yet (approximate while the thread runs)."""
        return self._jobs.unfinished_tasks

    def drain(self) -> None:
        """Block until every job submitted so far has run."""
        if self._thread is not None:
            self._jobs.join()

    def _run(self) -> None:
        while True:
            job, what = self._jobs.get()
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - kept and reported; the writer goes on
                line = one_line(f"MLflow writer: {what or 'a job'} failed ({type(exc).__name__}: {exc})")
                self.failures.append(line)
                print(f"WARNING: {line}", flush=True)
            finally:
                self._jobs.task_done()
