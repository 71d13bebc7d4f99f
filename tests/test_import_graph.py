"""The modules of trainables/ and orchestrator/ import one another without a cycle (issue 19): a
module never depends, directly or through others, on a module that depends on it. Imports inside
functions count too, since they are how cycles hide. And the study command's driver imports no
torch before its trials start, and does its later imports while its local Ray starts."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainables", "orchestrator")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules an import statement names (a package's own `__init__` excluded when a
    submodule is named: `from . import results` depends on orchestrator.results)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] + [base]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, path.name == "__init__.py", known)
        # A package's __init__ runs before its submodules: only real dependencies count.
        graph[module] = {e for e in edges if not (module.startswith(e + ".") and e in PACKAGES)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_through_others():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_function_level_imports_are_edges():
    graph = import_graph()
    assert "trainables.attacks" in graph["trainables.evaluate"]  # from .attacks import ... (module level)
    assert "orchestrator.results" in graph["orchestrator.summary"]  # from . import results


def test_no_import_cycle_in_the_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# What the study command's driver imports at module level before its first trial starts: it
# hands `run_trial` to Ray and sets up MLflow, and never runs a model, so torch (~2.5 s of CPU on
# this 2-core machine, taken from the trial workers that import it at the same time) stays out.
DRIVER_MODULES = ("orchestrator.study", "orchestrator.runner", "orchestrator.preflight",
                  "orchestrator.mlflow_callback", "orchestrator.trainable", "orchestrator.trial_setup",
                  "orchestrator.summary", "orchestrator.progress", "orchestrator.search")


@pytest.mark.slow  # a fresh interpreter importing Ray Tune, MLflow and pandas: seconds
def test_the_driver_imports_no_torch_before_its_trials():
    code = ("import importlib, sys\n"
            f"for name in {DRIVER_MODULES!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout[:500]


@pytest.mark.slow  # a fresh interpreter starting a local Ray: seconds
def test_a_local_ray_starts_while_the_driver_imports_and_prestarts_no_idle_workers(tmp_path):
    """The study's start (orchestrator.runner.start): the driver's later imports happen while the
    local Ray starts, and that Ray prestarts no workers, which Tune's trial actors (each with a
    runtime_env) would never use."""
    from tests.cluster_helpers import ProcessScope, tail

    code = ("import sys, time\n"
            "from orchestrator import preflight, runner\n"
            "with runner._importing_meanwhile(runner._driver_modules('sqlite:////nonexistent/mlflow.db')):\n"
            "    preflight.connect_ray(None)\n"
            "print('imported', all(m in sys.modules for m in ('ray.tune', 'mlflow.store.tracking.sqlalchemy_store',"
            " 'orchestrator.mlflow_callback')), 'torch' in sys.modules, flush=True)\n"
            "time.sleep(3)\n"  # prestarted workers would be up by now (they start as the driver registers)
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    log = tmp_path / "driver.log"
    with ProcessScope("driver-start") as scope:  # the driver and the Ray it starts, all stopped after
        driver = scope.popen([sys.executable, "-c", code], log, cwd=ROOT, env={"RAY_ADDRESS": None})
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "ready" in log.read_text(), tail(log)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in scope.pids() if pid != driver.pid]
        assert len(commands) >= 2, tail(log)  # the GCS and the raylet at least: the scope sees Ray's processes
        assert not [c for c in commands if c.startswith(b"ray::IDLE")], commands
        assert "imported True False" in log.read_text(), tail(log)


def test_a_failed_import_meanwhile_is_left_to_the_drivers_own_import():
    from orchestrator import runner

    ran = []
    with runner._importing_meanwhile(["orchestrator.no_such_module", "json"]):
        ran.append(True)
    assert ran == [True]
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("orchestrator.no_such_module")


def test_without_address_a_driver_joins_the_cluster_that_RAY_ADDRESS_names(ray_cluster):
    """Inside a Ray job (`ray job submit` sets RAY_ADDRESS) the study without --address joins that
    cluster: the local Ray's start options (no prestarted workers) are not passed to it, which Ray
    would refuse."""
    import ray

    code = ("from orchestrator import preflight\n"
            "preflight.connect_ray(None)\n"
            "import ray\n"
            "print(ray.get_runtime_context().gcs_address)\n")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == env["RAY_ADDRESS"], done.stdout
