#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian/Ubuntu machine, idempotently:
# a virtual environment in .venv with the project (editable) and its test tools, and the embedded
# default dataset (Fashion-MNIST from Debian's dataset-fashion-mnist package).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$FMNIST" ] && [ -z "${SSLROBUST_DATA_DIR:-}" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist (the embedded default dataset)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# torch's wheel brings its CUDA libraries: a new .venv takes ~6.5 GB. Without that much free disk
# pip fails midway with a bare OSError, so say it first and write nothing.
NEED_GB=${SSLROBUST_SETUP_FREE_GB:-7}
if ! compgen -G ".venv/lib/python3*/site-packages/torch/__init__.py" >/dev/null; then
  FREE_GB=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
  if [ "$FREE_GB" -lt "$NEED_GB" ]; then
    echo "setup: .venv needs about $NEED_GB GB of free disk (torch with its CUDA libraries) but $(pwd) has $FREE_GB GB free; free some space or clone the repository onto a larger disk" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
# Every version from the lock the cluster nodes install (requirements/lock-cuda.txt, for Python
# 3.11.7), so the tests run on exactly that environment (tests/test_lock.py checks it).
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/lock-cuda.txt -e ".[test]" 2> >(grep -v "^WARNING: Location" >&2)
# torchattacks (test-only reference for PGD) pins requests~=2.25.1, which clashes with MLflow: no deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "torchattacks==3.5.1" 2> >(grep -v "^WARNING: Location" >&2)
echo "setup: done (.venv/bin/python)"
