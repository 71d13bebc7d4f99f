"""Data staged once per node: eight processes (eight trials starting together on one node) ask for
the same missing dataset at once; it is copied once from the mirror, every process reads it, and no
partial file is left (trainables.datafiles.stage)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_data import write_cifar10
from trainables import datafiles

REPO = Path(__file__).resolve().parents[1]

# Each process waits for a common start time, notes whether the dataset was there, then loads it.
# The mirror copy is the real one, wrapped to log each call and to take a second (a slow bucket), so
# that every process arrives while the first copy is running.
CHILD = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from trainables import datafiles

root, log, start_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
real = datafiles._fetch_from_mirror

def logged(*args, **kwargs):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    return real(*args, **kwargs)

datafiles._fetch_from_mirror = logged
time.sleep(max(0.0, start_at - time.time()))
missing = datafiles._source("cifar10", True, root).locate() is None
images, labels = datafiles.load_arrays("cifar10", True, root, download=True)
test_images, _ = datafiles.load_arrays("cifar10", False, root, download=True)
print(json.dumps({"missing_at_start": missing, "n": len(labels), "test_n": len(test_images),
                  "digest": hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()}))
"""


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if ".partial" in p.name or p.name.startswith(".staging-")]


@pytest.mark.slow
def test_eight_concurrent_trials_stage_a_dataset_once(tmp_path):
    """~7 s on a busy 2-core machine."""
    mirror, root, log = tmp_path / "mirror", tmp_path / "node-data", tmp_path / "fetches.log"
    arrays = write_cifar10(mirror, per_batch=20, n_test=30)
    env = {**os.environ, datafiles.MIRROR_ENV: str(mirror), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SSLROBUST_DATA_DIR", None)
    start_at = time.time() + 4.0  # all eight have imported numpy by then
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(log), str(start_at)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(8)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    assert len(log.read_text().splitlines()) == 1, "one fetch for the node"
    assert sum(r["missing_at_start"] for r in reports) >= 2, "the processes did race for the dataset"
    train_images, train_labels = arrays["train"]
    expected = __import__("hashlib").sha256(train_images.tobytes() + train_labels.astype(np.int64).tobytes()).hexdigest()
    assert {r["digest"] for r in reports} == {expected}
    assert {(r["n"], r["test_n"]) for r in reports} == {(100, 30)}
    for rel in [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/test_batch"]:
        assert (root / rel).read_bytes() == (mirror / rel).read_bytes(), rel
    assert leftovers(root) == []


def test_a_failed_fetch_is_one_line_and_leaves_no_partial_files(tmp_path, monkeypatch):
    mirror, root = tmp_path / "mirror", tmp_path / "node-data"
    write_cifar10(mirror, per_batch=4, n_test=6)
    (mirror / "cifar-10-batches-py" / "test_batch").unlink()  # an incomplete mirror
    monkeypatch.setenv(datafiles.MIRROR_ENV, str(mirror))
    with pytest.raises(datafiles.DatasetUnavailable) as err:
        datafiles.load_arrays("cifar10", True, root, download=True)
    message = str(err.value)
    assert "\n" not in message and f"copy from the mirror {mirror} failed" in message
    assert "test_batch" in message and err.value.__suppress_context__
    # the train files copied before the failure are complete, and nothing half-written remains
    assert leftovers(root) == []
    for i in range(1, 6):
        rel = f"cifar-10-batches-py/data_batch_{i}"
        assert (root / rel).read_bytes() == (mirror / rel).read_bytes()
    # the train split is usable, so a second call does not fetch again
    images, labels = datafiles.load_arrays("cifar10", True, root, download=False)
    assert images.shape == (20, 3, 32, 32) and len(labels) == 20


def test_a_mirror_is_used_even_where_downloads_are_not(tmp_path, monkeypatch):
    """OOD sets are never downloaded (download=False), but a node copies them from the user's mirror."""
    mirror, root = tmp_path / "mirror", tmp_path / "node-data"
    arrays = write_cifar10(mirror, per_batch=4, n_test=6)
    (root / ".staging-cifar10-0123").mkdir(parents=True)  # a fetch killed half-way, long ago
    (root / ".staging-cifar10-0123" / "cifar-10-python.tar.gz").write_bytes(b"half")
    with pytest.raises(datafiles.DatasetUnavailable, match="not found and download=False"):
        datafiles.load_arrays("cifar10", False, root, download=False)
    monkeypatch.setenv(datafiles.MIRROR_ENV, str(mirror))
    images, labels = datafiles.load_arrays("cifar10", False, root, download=False)
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    assert leftovers(root) == []
