"""The study's TrackingService actor and the trials' RemoteTrialTracker, on a real local Ray and a
real MLflow sqlite store."""
from __future__ import annotations

import pytest
import ray

from orchestrator import tracking as tr
from orchestrator.tracking_service import RemoteTrialTracker, start_tracking_service

CONFIG = {"ssl_weight": 0.5, "attack_variant": "joint", "eps_train": 0.1, "seed": 0}


@pytest.fixture
def study_store(tmp_path, ray_cluster):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tr.study_experiment(uri, "svc")
    parent = tr.start_parent_run(uri, exp, "svc", {}, {})
    service = start_tracking_service(uri)
    service.open.remote(exp, parent)
    yield uri, exp, parent, service
    ray.kill(service)


def _tracker(service, exp, parent, chash, attempt):
    return RemoteTrialTracker(service, exp, parent, chash, run_name=f"svc-{chash}", attempt=attempt)


def test_trial_run_is_recorded_through_the_service(study_store, tmp_path):
    uri, exp, parent, service = study_store
    figure, table = tmp_path / "curve.svg", tmp_path / "h1.parquet"
    figure.write_text("<svg/>")
    table.write_bytes(b"PAR1")

    t = _tracker(service, exp, parent, "h1", "a1")
    t.start(params=CONFIG, tags={"sslrobust.node_id": "n1"})
    t.log_metrics({"train_loss": 2.0}, step=1)
    t.log_metrics({"train_loss": 1.5}, step=2)
    t.log_result_metrics({"robust_acc/linf/0.1": 0.25})
    t.log_artifact(str(figure))
    t.log_artifact(str(table))
    t.finish("FINISHED")
    assert t.ok, t.error
    assert t.warnings == []

    client = tr._client(uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tr.PARENT_TAG] == parent and run.data.tags[tr.HASH_TAG] == "h1"
    assert run.data.tags["sslrobust.node_id"] == "n1"
    assert run.data.params["ssl_weight"] == "0.5"
    assert [m.value for m in client.get_metric_history(t.run_id, "train_loss")] == [2.0, 1.5]
    assert run.data.metrics["robust_acc/linf/0.1"] == 0.25
    assert sorted(a.path for a in client.list_artifacts(t.run_id)) == ["curve.svg", "h1.parquet"]


def test_a_retried_trial_reuses_its_run(study_store):
    uri, exp, parent, service = study_store
    first = _tracker(service, exp, parent, "h2", "attempt-1")
    first.start(params=CONFIG, tags={})
    run_id = first.run_id
    assert run_id is not None  # the attempt dies here: its run is never finished

    again = _tracker(service, exp, parent, "h2", "attempt-2")  # no checkpoint: found by its hash
    again.start(params=CONFIG, tags={})
    again.finish("FINISHED")
    assert again.ok, again.error
    assert again.run_id == run_id
    run = tr._client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tr.ATTEMPT_TAG] == "2"
    children = tr.child_run_hashes(uri, exp, parent)
    assert children == {"h2"}


def test_a_new_service_finds_the_children_of_a_reopened_parent(study_store):
    uri, exp, parent, service = study_store
    first = _tracker(service, exp, parent, "h3", "a")
    first.start(params=CONFIG, tags={})
    first.finish("FINISHED")
    # --resume: a later invocation reopens the parent run with a service of its own
    later = start_tracking_service(uri)
    try:
        again = _tracker(later, exp, parent, "h3", "b")
        again.start(params=CONFIG, tags={})
        again.finish("FINISHED")
        assert again.ok, again.error
        assert again.run_id == first.run_id
    finally:
        ray.kill(later)


def test_a_dead_service_turns_tracking_off_without_raising(study_store, tmp_path):
    uri, exp, parent, service = study_store
    t = _tracker(service, exp, parent, "h4", "a")
    t.start(params=CONFIG, tags={})
    assert t.run_id is not None
    ray.kill(service)
    t.log_metrics({"train_loss": 1.0}, step=1)
    (tmp_path / "x.svg").write_text("<svg/>")
    t.log_artifact(str(tmp_path / "x.svg"))
    t.finish("FINISHED")
    assert not t.ok
    assert "tracking service failed" in t.error and "\n" not in t.error

    late = _tracker(service, exp, parent, "h5", "b")
    late.start(params=CONFIG, tags={})
    assert late.run_id is None and not late.ok
    late.finish("FINISHED")  # no raise


def test_tracking_failures_inside_the_service_come_back_with_finish(study_store, tmp_path):
    uri, exp, parent, service = study_store
    t = _tracker(service, exp, parent, "h6", "a")
    t.start(params=CONFIG, tags={})
    t.log_metrics({"train_loss": "not a number"}, step=1)
    t.log_artifact(str(tmp_path / "missing.svg"))
    t.finish("FINISHED")
    assert t.ok, t.error
    assert any("not a number" in w for w in t.warnings)
    assert any("missing.svg" in w for w in t.warnings)
