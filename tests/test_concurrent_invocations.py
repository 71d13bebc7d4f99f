"""Two invocations of one study at once, on the same storage and a new sqlite tracking store: both
finish, each cell is trained once, and neither marks the other's runs KILLED."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.test_faults import Workspace, check_complete_results, mlflow_runs, trial_runs_by_hash


@pytest.mark.slow
def test_two_invocations_started_half_a_second_apart_both_finish_and_train_each_cell_once(tmp_path):
    ws = Workspace(tmp_path / "ws")
    other_ray = Workspace(tmp_path / "ws")  # the same folder, its own Ray temp dir: a second local Ray
    try:
        ws.write_study("twice", {"ssl_weight": [0.0, 0.5]}, epochs=2)
        first = ws.start("twice", "--max-concurrent", "1", log="first")
        time.sleep(0.5)
        second = other_ray.start("twice", "--max-concurrent", "1", log="second")
        rc1, out1, err1 = ws.finish(first, timeout=600)
        rc2, out2, err2 = other_ray.finish(second, timeout=600)
        assert rc1 == 0, ws.tail("first")
        assert rc2 == 0, ws.tail("second")
        assert "Traceback" not in out1 + out2

        hashes = set(ws.result_files("twice"))
        assert len(hashes) == 2
        check_complete_results(ws, "twice", hashes)
        # each cell was trained by one trial of one invocation (Tune's result.json of a trial that
        # trained holds its epochs); the other invocation's trial for it waited and reused the result
        trained = Counter()
        for path in ws.storage.glob("tune/twice-*/*/result.json"):
            reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            trained.update({r["config_hash"] for r in reports if "train_loss" in r})
        assert trained == {h: 1 for h in hashes}, trained
        assert len(set(ws.storage.glob("tune/twice-*"))) == 2
        assert "left RUNNING" not in out1 + out2  # neither took the other for a dead invocation

        _, runs = mlflow_runs(ws.tracking_uri, "twice")
        assert not [r for r in runs if r.info.status == "KILLED"]
        parents = [r for r in runs if r.data.tags.get("sslrobust.role") == "parent"]
        assert sorted(p.info.status for p in parents) == ["FINISHED", "FINISHED"]
        by_hash = trial_runs_by_hash(runs)
        assert {h: [r.info.status for r in rs] for h, rs in by_hash.items()} == {h: ["FINISHED"] for h in hashes}
    finally:
        ws.cleanup()
        other_ray.cleanup()
