"""The local Ray the study command starts: its workers import what a trial imports as they boot
(orchestrator.preflight.connect_ray), without leaving the setting in the driver's environment."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.preflight import trial_modules

ROOT = Path(__file__).resolve().parent.parent


def test_the_trial_modules_are_importable_and_include_the_trial_code():
    modules = trial_modules()
    # a name Ray cannot import prints a traceback from every worker to the console
    assert all(importlib.util.find_spec(name) is not None for name in modules), modules
    assert {"torch", "orchestrator.trainable"} <= set(modules)  # the project is installed in the venv


WORKER_CHECK = r"""
import os, sys
import ray
from orchestrator.preflight import connect_ray

connect_ray(None)
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
def test_an_actor_on_the_local_ray_starts_with_the_trial_modules_imported():
    done = subprocess.run([sys.executable, "-c", WORKER_CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['orchestrator.trainable', 'ray.tune', 'torch']", done.stdout
    assert "Failed to preload" not in done.stdout + done.stderr
