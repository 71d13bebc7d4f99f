"""A study on a real two-node Ray cluster on this machine (issue 5).

Two `ray start` nodes (separate raylets, object stores and workers; token authentication), a
shared storage directory, a real `mlflow server`, and the study CLI as a subprocess connecting
with --address: the trials must land on both nodes and every result must be in Parquet and
MLflow exactly once. tests/cluster_helpers.py starts the processes and always stops them.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from orchestrator import results
from orchestrator.spec import load_study
from orchestrator.metrics import result_metric_name
from tests.cluster_helpers import LocalRayCluster, MlflowServer, ProcessScope, tail

REPO = Path(__file__).resolve().parents[1]  # the nodes' workers import this checkout's code
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="cluster_helpers reads /proc (Linux)")

STUDY, SCALE = "smoke", "smoke"
# smoke has two cells; two seeds make four 1-CPU trials on two 1-CPU nodes. Two trials alone could
# both run on one node: Tune hands a finished trial's cached actor to a trial whose own actor is
# still starting. With four, node b would have to stay unused through three trials in a row.
# SSL pre-trained: the driver's stage trains the two pre-trainings (one per seed) as Ray tasks on
# the nodes into the shared storage before the trials start, which then load them on either node.
SETS = ["seeds=[0, 1]", "init=ssl_pretrained", "pretrain_epochs=1"]

# Variables of the caller's shell that would redirect the driver; the test passes everything explicitly.
CLEAN_ENV = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "SSLROBUST_STORAGE": None,
             "SSLROBUST_STUDIES_DIR": None, "SSLROBUST_DATA_DIR": None}


def study_command(*args) -> list[str]:
    return [sys.executable, "-m", "orchestrator.study", STUDY, "--scale", SCALE, *args]


def rows_per_trial(config: dict) -> int:
    """A result row per (norm, ε_test), per (corruption, severity) and per OOD (set, score,
    measure); see orchestrator.results."""
    rows = sum(len(config[f"eval_eps_{norm}"]) for norm in config["eval_norms"])
    rows += len(config["corruptions"]) * len(config["corruption_severities"])
    if config.get("ood_sets"):
        from trainables.ood import MEASURES

        rows += len(config["ood_sets"]) * len(config["ood_scores"]) * len(MEASURES)
    return rows


@pytest.mark.slow
def test_study_runs_on_two_ray_nodes_with_mlflow_server(tmp_path):
    """~12 s for the nodes (the MLflow server starts meanwhile), the rest for the study: its two
    SSL pre-training tasks, then the four trials (187 s in all on this 2-core machine at load 10)."""
    spec = load_study(STUDY, SCALE, SETS)
    trials = spec.trials()
    assert len(trials) == 4 and spec.resources == {"cpu": 1, "gpu": 0}
    shared = tmp_path / "shared"  # the storage every node writes to
    workdir = tmp_path / "driver"
    workdir.mkdir()
    driver_log, driver_err = tmp_path / "driver.log", tmp_path / "driver.err"

    with ProcessScope("multinode") as scope, \
            MlflowServer(scope, tmp_path / "mlflow") as server, \
            LocalRayCluster(scope, node_env={"PYTHONPATH": str(REPO)}) as cluster:
        # The server comes up while the nodes start.
        cluster.start_head(num_cpus=1, resources={"node_a": 1}, name="node_a")
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, name="node_b")
        nodes = cluster.nodes(wait_for=2)
        alive = {n["node_id"] for n in nodes if n["alive"]}
        node_ids = {cluster.nodes_by_name["node_a"].node_id, cluster.nodes_by_name["node_b"].node_id}
        assert len(alive) == 2 and node_ids == alive, nodes
        assert not any(n["resources"].get("GPU") for n in nodes)  # no GPU anywhere; the study asks none
        server.wait_ready()

        code = scope.run(
            study_command(*(arg for setting in SETS for arg in ("--set", setting)), "--address", cluster.address, "--storage", shared,
                          "--tracking-uri", server.uri),
            driver_log, stderr_log=driver_err, timeout=300, tag="driver", cwd=workdir,
            env={**CLEAN_ENV, **cluster.env()},
        )
        output = f"--- stdout\n{tail(driver_log)}\n--- stderr\n{tail(driver_err)}"
        assert code == 0, output  # 1 if any trial failed
        assert len(list((shared / "pretrained").glob("*.pt"))) == 2, output
        assert driver_log.read_text().count(" done in ") == 2, output  # [smoke] SSL pre-training ... done in N s

        # Parquet: every trial × evaluation point once, on both nodes.
        table = results.load(STUDY, str(shared))
        assert len(table) == sum(rows_per_trial(t.config) for t in trials), table
        assert not table.duplicated(list(results.KEY_COLUMNS)).any()
        assert set(table["config_hash"]) == {t.config_hash for t in trials}
        assert set(table["node_id"]) == node_ids, table.groupby("node_id")["config_hash"].unique()
        assert (table.groupby("config_hash")["node_id"].nunique() == 1).all()  # a trial runs on one node

        # MLflow (asked while the server is up): one finished parent, one finished child per trial.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name(STUDY)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("sslrobust.role") == "parent"]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.info for r in parents]
        assert len(children) == len(trials) == len(runs) - 1
        by_hash = {t.config_hash: t for t in trials}
        seen = set()
        for child in children:
            assert child.info.status == "FINISHED"
            assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            chash = child.data.tags["sslrobust.config_hash"]
            seen.add(chash)
            config = by_hash[chash].config
            assert float(child.data.params["ssl_weight"]) == config["ssl_weight"]
            assert int(child.data.params["seed"]) == config["seed"]
            rows = table[table.config_hash == chash]
            assert set(rows["mlflow_run_id"]) == {child.info.run_id}
            assert child.data.tags["sslrobust.node_id"] == rows["node_id"].iloc[0]
            for _, row in rows[rows["robust_acc"].notna()].iterrows():
                name = result_metric_name(row["norm"], row["eps_test"], row["corruption"], row["severity"])
                assert child.data.metrics[name] == pytest.approx(row["robust_acc"]), name
        assert seen == set(by_hash)

    assert not scope.pids(), "processes of the test survived its end"


def test_dead_ray_address_is_one_line_and_exit_2(tmp_path):
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    started = time.monotonic()
    with ProcessScope("dead-address") as scope:
        code = scope.run(
            study_command("--address", "127.0.0.1:1", "--storage", tmp_path / "runs",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"),
            out, stderr_log=err, timeout=120, tag="driver", cwd=tmp_path, env=CLEAN_ENV,
        )
    stderr = err.read_text()
    assert code == 2, f"{tail(out)}\n{stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "127.0.0.1:1" in lines[0] and "Traceback" not in stderr + out.read_text()
    assert time.monotonic() - started < 60
