"""The lock files (requirements/lock-*.txt): exact pins that satisfy pyproject.toml, form a
consistent set, and are the environment these tests run in.

Why no install here: resolving the 150 locked packages against the registry in a fresh venv
(`pip install --dry-run --ignore-installed --report`, what requirements/compile.sh does when it writes
the lock) takes 4-6 minutes on this machine, mostly fetching metadata; a real install downloads
several GB. Instead, offline and in about a second, the locked set is checked the way `pip check`
checks an environment: every requirement of every locked package that is installed in this venv
(the tested environment), walked from the project's roots with markers and extras evaluated for this
interpreter, names a locked package at a version inside its specifier, and the venv holds exactly
the locked versions. The packages only cluster nodes install (ray[default]'s extras, boto3) are not
in this venv; their own requirements were checked by pip's resolver when the lock was generated.
"""
from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from requirements import lockfile

REPO = Path(__file__).resolve().parents[1]
# Installed with --no-deps everywhere (its requests~=2.25.1 pin clashes with MLflow's; README).
NO_DEPS = {"torchattacks"}
# What a node installs besides the project (scripts/install_locked.sh, requirements/compile.sh).
ROOTS = [("sslrobust", {"test"}), ("ray", {"default", "tune"}), ("boto3", set()), ("torchattacks", set())]


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return reqs


@pytest.mark.parametrize("variant", sorted(lockfile.LOCKS))
def test_lock_pins_every_pyproject_dependency_inside_its_specifier(variant):
    pins = lockfile.read(lockfile.LOCKS[variant])  # raises on anything but exact pins
    for req in pyproject_requirements():
        name = lockfile.canonical(req.name)
        assert name in pins, f"{req} is not in {variant} lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{variant} lock: {name}=={pins[name]} vs {req}"
    assert "sslrobust" not in pins, "the project itself is installed from the checkout"


def test_cpu_lock_is_the_cuda_lock_with_cpu_builds():
    cuda, cpu = (lockfile.read(lockfile.LOCKS[v]) for v in ("cuda", "cpu"))
    assert lockfile.LOCKS["cpu"].read_text() == lockfile.render(cuda, "cpu"), "run requirements/compile.sh"
    assert f"--extra-index-url {lockfile.CPU_INDEX}" in lockfile.LOCKS["cpu"].read_text().splitlines()
    assert {cpu["torch"], cpu["torchvision"]} == {f"{cuda['torch']}+cpu", f"{cuda['torchvision']}+cpu"}
    dropped = set(cuda) - set(cpu)
    assert dropped and all(lockfile.CUDA_ONLY.match(n) for n in dropped)
    assert any(n.startswith("nvidia-") for n in dropped) and "triton" in dropped


def test_locked_set_is_consistent_and_is_the_tested_environment():
    pins = lockfile.read(lockfile.LOCKS["cuda"])
    seen: set[tuple[str, frozenset]] = set()
    not_here: set[str] = set()
    queue = [(name, frozenset(extras)) for name, extras in ROOTS]
    checked = 0
    while queue:
        name, extras = queue.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            not_here.add(name)
            continue
        if name != "sslrobust":
            assert dist.version == pins[name], f"this venv has {name} {dist.version}, the lock {pins[name]}"
        if name in NO_DEPS:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                    req.marker.evaluate({**default_environment(), "extra": e}) for e in (extras or {""})):
                continue
            dep = lockfile.canonical(req.name)
            assert dep in pins, f"{name} needs {req}, which the lock lacks"
            assert req.specifier.contains(pins[dep], prereleases=True), f"{name} needs {req}; lock: {pins[dep]}"
            checked += 1
            queue.append((dep, frozenset(req.extras)))
    assert checked > 100
    # Only cluster-side packages may be missing from this venv, and each of them is locked.
    assert not_here <= set(pins) and "boto3" in not_here and len(not_here) < 30, sorted(not_here)


def test_tests_run_on_the_locked_python_and_a_fresh_venv_gets_it(tmp_path):
    """The lock's interpreter is this one's minor version (the exact patch is pinned on the cluster's
    nodes, where Ray refuses a mismatch; a developer's 3.11.x runs the tests as well)."""
    minor = ".".join(lockfile.PYTHON_VERSION.split(".")[:2])
    assert ".".join(platform.python_version().split(".")[:2]) == minor
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "fresh")], check=True)
    out = subprocess.run([str(tmp_path / "fresh" / "bin" / "python"), "-c",
                          "import platform; print(platform.python_version())"], capture_output=True, text=True)
    assert out.stdout.strip() == platform.python_version()
    for config in ("cluster.yaml", "cluster-local.yaml", "Dockerfile"):
        text = (REPO / config).read_text()
        assert "install_locked.sh" in text, config
    assert f"Python {lockfile.PYTHON_VERSION}" in (REPO / "cluster.yaml").read_text()
