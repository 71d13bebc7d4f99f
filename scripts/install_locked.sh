#!/usr/bin/env bash
# Install one node's environment: the lock's exact interpreter, exactly the packages of
# requirements/lock-VARIANT.txt (nothing more, nothing less), then this project without dependencies.
# cluster.yaml, cluster-local.yaml and the Dockerfile all install through this script.
#
#   bash scripts/install_locked.sh [cuda|cpu] [VENV]      (defaults: cuda, ~/sslrobust-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:-cuda}
VENV=${2:-$HOME/sslrobust-venv}
LOCK=requirements/lock-$VARIANT.txt
UV_VERSION=0.13.9
PYTHON_VERSION=$(sed -n 's/^# for CPython \([0-9.]*\) .*/\1/p' "$LOCK")
[ -n "$PYTHON_VERSION" ] || { echo "install_locked.sh: no Python version in $LOCK" >&2; exit 2; }

export PATH=$HOME/.local/bin:$PATH
if [ "$(uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | env UV_NO_MODIFY_PATH=1 sh
fi
# Ray refuses a node whose Python differs from the head's at patch level, so a venv of any other
# interpreter (a head kept across `ray down`, an older image) is rebuilt rather than reused.
if [ -x "$VENV/bin/python" ] &&
   [ "$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')" != "$PYTHON_VERSION" ]; then
  rm -rf "$VENV"
fi
[ -x "$VENV/bin/python" ] || uv venv --python "$PYTHON_VERSION" "$VENV"
# The CPU lock names PyTorch's CPU index for torch and torchvision; the exact pins make taking each
# package from whichever index has that version safe (uv's default would look only at the first).
UV_INDEX_STRATEGY=unsafe-best-match uv pip sync --python "$VENV/bin/python" "$LOCK"
# setuptools is in the lock: build the project with it instead of fetching a newer one.
uv pip install --python "$VENV/bin/python" --no-deps --no-build-isolation .
"$VENV/bin/python" -c 'import sys, platform; v = platform.python_version(); sys.exit(0 if v == sys.argv[1] else f"Python {v}, lock wants {sys.argv[1]}")' "$PYTHON_VERSION"
