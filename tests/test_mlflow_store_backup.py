"""scripts/mlflow_store.py: a consistent backup of a live MLflow SQLite store, restored on a new head.

A real MLflow store (sqlite) with a run; a backup taken while another connection holds a write
transaction open (as the server may at any moment) holds the last committed state; restoring it
where no store exists gives MLflow back its runs, and restoring never overwrites an existing store.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "mlflow_store.py"


def store(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_backup_of_a_live_store_restores_on_a_new_head(tmp_path):
    """20-35 s on a busy 2-core machine (MLflow creates its tables)."""
    from mlflow.tracking import MlflowClient

    head_db = tmp_path / "old-head" / "mlflow.db"
    head_db.parent.mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{head_db}")
    experiment = client.create_experiment("weight_sweep")
    run = client.create_run(experiment, run_name="lambda-0.5")
    client.log_metric(run.info.run_id, "robust_acc", 0.42)
    client.set_terminated(run.info.run_id)

    # A writer in the middle of a transaction: its uncommitted row must not reach the backup.
    writer = sqlite3.connect(head_db, timeout=30)
    writer.execute("BEGIN")
    writer.execute("UPDATE experiments SET name = 'half-written' WHERE experiment_id = ?", (experiment,))
    bucket = tmp_path / "bucket" / "mlflow-backup" / "mlflow.db"
    done = store("backup", head_db, bucket)
    writer.rollback()
    writer.close()
    assert done.returncode == 0, done.stderr
    assert bucket.is_file() and not [p for p in bucket.parent.iterdir() if p != bucket]  # no partial upload

    new_db = tmp_path / "new-head" / "mlflow.db"
    restored = store("restore", new_db, bucket)
    assert restored.returncode == 0 and "restored" in restored.stdout, restored.stderr
    again = MlflowClient(tracking_uri=f"sqlite:///{new_db}")
    found = again.get_experiment_by_name("weight_sweep")
    assert found is not None
    runs = again.search_runs([found.experiment_id])
    assert [r.data.metrics["robust_acc"] for r in runs] == [0.42]
    assert runs[0].info.status == "FINISHED"

    # A head that kept its store is never overwritten by the backup.
    new_run = again.create_run(found.experiment_id, run_name="after-restore")
    kept = store("restore", new_db, bucket)
    assert kept.returncode == 0 and "not restoring" in kept.stdout
    assert {r.info.run_id for r in MlflowClient(tracking_uri=f"sqlite:///{new_db}").search_runs(
        [found.experiment_id])} == {runs[0].info.run_id, new_run.info.run_id}


def test_restore_without_a_backup_starts_empty_and_a_missing_store_is_one_line(tmp_path):
    out = store("restore", tmp_path / "head" / "mlflow.db", tmp_path / "bucket" / "mlflow.db")
    assert out.returncode == 0 and "no backup" in out.stdout
    assert not (tmp_path / "head" / "mlflow.db").exists()
    out = store("backup", tmp_path / "nothing.db", tmp_path / "bucket" / "mlflow.db")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: MLflow store backup") and "Traceback" not in out.stderr
    assert not (tmp_path / "bucket").exists()
