"""The local Ray the study command starts: its workers import what a trial imports as they boot
when a trial will run on each of them (orchestrator.preflight), without leaving the setting in the
driver's environment."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.preflight import modules_to_preload

ROOT = Path(__file__).resolve().parent.parent
CPUS = os.cpu_count() or 1
CPU_TRIAL = {"cpu": 1, "gpu": 0}


def test_the_workers_preload_the_trial_code_when_a_trial_runs_on_each_and_nothing_otherwise():
    modules = modules_to_preload(CPU_TRIAL, trials_to_run=CPUS + 3, max_concurrent=None)
    assert {"torch", "ray.tune", "orchestrator.trainable"} <= set(modules)  # the project is installed here
    # a name Ray cannot import prints a traceback from every worker to the console
    assert all(importlib.util.find_spec(name) is not None for name in modules), modules
    assert modules_to_preload(CPU_TRIAL, trials_to_run=CPUS, max_concurrent=CPUS) == modules
    # an idle worker with torch loaded and no trial to run: GPU trials, fewer trials than CPUs
    assert modules_to_preload({"cpu": 1, "gpu": 0.5}, trials_to_run=CPUS + 3, max_concurrent=None) == []
    if CPUS > 1:
        assert modules_to_preload(CPU_TRIAL, trials_to_run=CPUS - 1, max_concurrent=None) == []
        assert modules_to_preload(CPU_TRIAL, trials_to_run=CPUS + 3, max_concurrent=CPUS - 1) == []
        assert modules_to_preload({"cpu": 2, "gpu": 0}, trials_to_run=CPUS + 3, max_concurrent=None) == []


WORKER_CHECK = r"""
import os, sys
import ray
from orchestrator.preflight import connect_ray

connect_ray(None, preload=["torch", "ray.tune", "orchestrator.trainable"])
assert "RAY_preload_python_modules" not in os.environ, "left in the driver's environment"

@ray.remote(num_cpus=1)
class Probe:
    def __init__(self):  # before this actor's own code imports anything
        self.loaded = sorted(m for m in ("torch", "ray.tune", "orchestrator.trainable") if m in sys.modules)

    def loaded_modules(self):
        return self.loaded

print(ray.get(Probe.remote().loaded_modules.remote()))
ray.shutdown()
"""


@pytest.mark.slow
def test_an_actor_on_the_local_ray_starts_with_the_preloaded_modules_imported():
    done = subprocess.run([sys.executable, "-c", WORKER_CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['orchestrator.trainable', 'ray.tune', 'torch']", done.stdout
    assert "Failed to preload" not in done.stdout + done.stderr
