#!/usr/bin/env bash
# Regenerate requirements/lock-cuda.txt and lock-cpu.txt: the whole dependency set of a cluster node
# (the project with its test extra, ray[default] for the dashboard and job server, boto3 for the AWS
# autoscaler and MLflow's S3 artifact store, torchattacks), every package at one exact version.
#
#   bash requirements/compile.sh [CONSTRAINTS]
#
# It resolves in a fresh, empty venv of the pinned interpreter (PYTHON, default python3.11; it
# must be $LOCK_PYTHON), with `pip install --dry-run --ignore-installed --report`, so nothing is
# installed anywhere.  CONSTRAINTS (default: the current lock-cuda.txt) keeps every version the
# project was tested with; delete a line from it (or pass /dev/null) to let that package move.
# Then run the tests against a venv made from the new lock (scripts/setup.sh installs with it).
# pip-compile is not used: pip's own resolver and report need nothing beyond pip.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK_PYTHON=3.11.7
PYTHON=${PYTHON:-python3.11}
CONSTRAINTS=${1:-requirements/lock-cuda.txt}
found=$("$PYTHON" -c 'import platform; print(platform.python_version())')
if [ "$found" != "$LOCK_PYTHON" ]; then
  echo "compile.sh: $PYTHON is Python $found; the lock is for $LOCK_PYTHON (set PYTHON=...)" >&2; exit 2
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
# pip resolves torchattacks without its deps (it pins an old requests), as every install does.
"$work/venv/bin/python" -m pip install -q --dry-run --ignore-installed --report "$work/main.json" \
  -c "$CONSTRAINTS" ".[test]" "ray[default]==2.60.0" "boto3>=1.34"
"$work/venv/bin/python" -m pip install -q --dry-run --ignore-installed --no-deps --report "$work/extra.json" \
  -c "$CONSTRAINTS" "torchattacks==3.5.1"
"$work/venv/bin/python" requirements/lockfile.py write "$work/main.json" "$work/extra.json"
