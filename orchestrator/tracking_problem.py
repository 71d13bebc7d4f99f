"""A failure of MLflow tracking during a study, as the end-of-study summary lists it."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Scope(enum.Enum):
    TRIAL = "trial"  # one trial's run: its tracking stopped at this failure
    PARENT = "parent"  # the study's parent run
    WRITER = "writer"  # a job of the background writer that failed outside a trial's MLflow calls


@dataclass(frozen=True)
class TrackingProblem:
    scope: Scope
    subject: str  # the trial's config hash, the parent run's id, or "" (WRITER)
    message: str  # one line

    def __str__(self) -> str:
        if self.scope is Scope.TRIAL:
            return f"{self.subject}: {self.message}"
        if self.scope is Scope.PARENT:
            return f"parent run {self.subject}: {self.message}"
        return self.message
