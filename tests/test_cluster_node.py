"""What a cluster node needs, on a real two-node Ray cluster on this machine (issue 21):

* a worker joins with cluster-local.yaml's own worker start commands while no MLflow runs anywhere
  (nothing tracking-related is on its start path);
* a dataset a node cannot fetch stops the study with one line (a set-up error), not a trial failure
  retried max_failures times.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import LocalRayCluster, ProcessScope, RayNode, free_ports, tail
from trainables.datafiles import MIRROR_ENV

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="cluster_helpers reads /proc (Linux)")

REPO = Path(__file__).resolve().parents[1]
CLEAN_ENV = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "SSLROBUST_STORAGE": None,
             "SSLROBUST_STUDIES_DIR": None, "SSLROBUST_DATA_DIR": None}

def join_with_the_configs_commands(cluster: LocalRayCluster, home: Path, name: str) -> RayNode:
    """Run cluster-local.yaml's worker_start_ray_commands (all but `ray stop`, which would stop every
    Ray on this machine) as the launcher would: a home with ~/.sslrobust/env.sh and the token file,
    $RAY_HEAD_IP set. Only what two raylets on one machine need is changed: the GCS port, and a
    temp dir and free ports instead of the fixed object manager port."""
    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    commands = [c for c in config["worker_start_ray_commands"] if c.strip() != ". ~/.sslrobust/env.sh && ray stop"]
    assert len(commands) == 1 and "ray start --address=$RAY_HEAD_IP:6379" in commands[0]
    host, port = cluster.address.rsplit(":", 1)
    temp_dir = cluster.root / name
    temp_dir.mkdir()
    cluster.scope.add_path(f"{temp_dir}/", tag=name)
    (agent_port,) = free_ports(1)
    node = RayNode(name=name, temp_dir=temp_dir, num_cpus=1, resources={name: 1}, log=cluster.root / f"{name}.log",
                   head=False)
    cluster.nodes_by_name[name] = node
    command = commands[0].replace("$RAY_HEAD_IP:6379", f"$RAY_HEAD_IP:{port}").replace(
        "--object-manager-port=8076",
        f"--num-cpus=1 --num-gpus=0 --resources='{json.dumps(node.resources)}' --temp-dir={temp_dir} "
        f"--object-store-memory={cluster.object_store_mb * 1024 * 1024} --dashboard-agent-listen-port={agent_port} "
        "--min-worker-port=0 --max-worker-port=0 --disable-usage-stats")
    (home / ".sslrobust").mkdir(parents=True)
    (home / ".sslrobust" / "env.sh").write_text(f"export PATH={Path(sys.executable).parent}:$PATH\n")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(cluster.env()["RAY_AUTH_TOKEN"] + "\n")
    env = {**cluster.node_env, "HOME": home, "RAY_HEAD_IP": host, "RAY_AUTH_TOKEN": None,
           "RAY_AUTH_MODE": None, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": None}
    code = cluster.scope.run(["bash", "-c", command], node.log, timeout=cluster.start_timeout, tag=name, env=env)
    assert code == 0, f"the worker did not join:\n{tail(node.log)}"
    return node


@pytest.mark.slow
def test_worker_joins_without_mlflow_and_a_dataset_failure_is_a_setup_error(tmp_path):
    """75-150 s on a busy 2-core machine (two nodes, then a study whose driver, MLflow tracking
    service and trials start before the set-up error stops it)."""
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    node_env = {MIRROR_ENV: str(empty_mirror), "PYTHONPATH": str(REPO)}
    with ProcessScope("cluster-node") as scope, LocalRayCluster(scope, node_env=node_env) as cluster:
        cluster.start_head(num_cpus=1, resources={"node_a": 1}, name="node_a")
        join_with_the_configs_commands(cluster, tmp_path / "worker-home", "node_b")
        nodes = cluster.nodes(wait_for=2)
        head_id, worker_id = (cluster.nodes_by_name[n].node_id for n in ("node_a", "node_b"))
        assert sum(n["alive"] for n in nodes) == 2 and head_id and worker_id and head_id != worker_id, nodes

        # A dataset neither node can fetch (the mirror is empty): exit 2, one line, nothing written.
        out, err = tmp_path / "driver.log", tmp_path / "driver.err"
        code = scope.run(
            [sys.executable, "-m", "orchestrator.study", "smoke", "--scale", "smoke", "--set", "dataset=cifar10",
             "--address", cluster.address, "--storage", tmp_path / "shared", "--data-dir", tmp_path / "no-data",
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
            out, stderr_log=err, timeout=300, tag="driver", cwd=tmp_path,
            env={**CLEAN_ENV, **cluster.env(), "PYTHONPATH": str(REPO)})
        stderr = err.read_text()
        assert code == 2, f"{tail(out)}\n{stderr}"
        # Ray's own INFO lines come first; lines its processes forward, "(raylet) ..." or
        # "(pid=...) ..." (after a colour code, even into a file), may come at any time and are not
        # ours: a full-disk warning, or the "Exception ignored ... SystemExit" traceback of a trial
        # worker whose SIGTERM (the study stopping) landed inside a weakref callback (Ray's handler).
        lines = [line for line in stderr.strip().splitlines()
                 if not re.sub(r"\x1b\[[0-9;]*m", "", line).startswith("(")]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and errors[0] == lines[-1], stderr
        assert errors[0].startswith("error: dataset cifar10 (train split) unavailable: ")
        assert f"copy from the mirror {empty_mirror} failed" in errors[0]
        assert f"put the dataset's files into {empty_mirror}" in errors[0]
        assert not any("Traceback" in line for line in lines), stderr
        assert not list((tmp_path / "shared").rglob("*.parquet"))
        assert not re.search(r"retry|Retrying", tail(out)), "no trial was retried"
    assert not scope.pids(), "processes of the test survived its end"
