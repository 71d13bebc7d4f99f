"""The study's TrackingService actor and the trials' RemoteTrialTracker, on a real local Ray and a
real MLflow sqlite store."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

from orchestrator import tracking as tr
from orchestrator.tracking_service import RemoteTrialTracker, start_tracking_service

CONFIG = {"ssl_weight": 0.5, "attack_variant": "joint", "eps_train": 0.1, "seed": 0}


class Study:
    def __init__(self, uri: str, resume_parent: str | None = None):
        self.uri = uri
        self.service, self.setup_ref = start_tracking_service(uri, "svc", resume_parent, {"scale": "smoke"},
                                                              {"t": "1"})
        self.setup = ray.get(self.setup_ref)

    def tracker(self, chash: str, attempt: str) -> RemoteTrialTracker:
        return RemoteTrialTracker(self.service, self.setup_ref, chash, run_name=f"svc-{chash}", attempt=attempt)

    def drain(self) -> list[str]:
        return ray.get(self.service.drain.remote())

    def close(self) -> None:
        ray.kill(self.service)


@pytest.fixture
def study(tmp_path, ray_cluster):
    s = Study(f"sqlite:///{tmp_path}/mlflow.db")
    assert "error" not in s.setup, s.setup
    yield s
    s.close()


def test_trial_run_is_recorded_through_the_service(study, tmp_path):
    t = study.tracker("h1", "a1")
    t.start(params=CONFIG, tags={"sslrobust.node_id": "n1"})
    t.log_metrics({"train_loss": 2.0}, step=1)
    t.log_metrics({"train_loss": 1.5}, step=2)
    assert not t.setup_failed()
    run_id = t.run_id
    t.log_result_metrics({"robust_acc/linf/0.1": 0.25})
    t.log_artifact_content("curve.svg", b"<svg/>")
    t.log_artifact_content("h1.parquet", b"PAR1")
    t.finish("FINISHED")
    assert t.ok, t.error
    assert study.drain() == []

    client = tr._client(study.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tr.PARENT_TAG] == study.setup["parent_run_id"] and run.data.tags[tr.HASH_TAG] == "h1"
    assert run.data.tags["sslrobust.node_id"] == "n1"
    assert run.data.params["ssl_weight"] == "0.5"
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [2.0, 1.5]
    assert run.data.metrics["robust_acc/linf/0.1"] == 0.25
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["curve.svg", "h1.parquet"]
    folder = client.download_artifacts(run_id, "", str(tmp_path / "downloaded"))
    assert (Path(folder) / "curve.svg").read_bytes() == b"<svg/>"
    assert (Path(folder) / "h1.parquet").read_bytes() == b"PAR1"


def test_a_retried_trial_reuses_its_run(study):
    first = study.tracker("h2", "attempt-1")
    first.start(params=CONFIG, tags={})
    run_id = first.run_id
    assert run_id is not None  # the attempt dies here: its run is never finished

    again = study.tracker("h2", "attempt-2")  # found by its hash under the parent
    again.start(params=CONFIG, tags={})
    again.finish("FINISHED")
    assert again.ok and study.drain() == []
    assert again.run_id == run_id
    run = tr._client(study.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tr.ATTEMPT_TAG] == "2"
    assert tr.child_run_hashes(study.uri, study.setup["experiment_id"], study.setup["parent_run_id"]) == {"h2"}


def test_a_new_service_finds_the_children_of_a_reopened_parent(study):
    first = study.tracker("h3", "a")
    first.start(params=CONFIG, tags={})
    first.finish("FINISHED")
    study.drain()
    # --resume: a later invocation reopens the parent run with a service of its own
    later = Study(study.uri, resume_parent=study.setup["parent_run_id"])
    try:
        assert later.setup["parent_run_id"] == study.setup["parent_run_id"] and later.setup["stale"] == 0
        again = later.tracker("h3", "b")
        again.start(params=CONFIG, tags={})
        again.finish("FINISHED")
        assert again.ok and later.drain() == []
        assert again.run_id == first.run_id
    finally:
        later.close()


def test_a_dead_service_turns_tracking_off_without_raising(study, tmp_path):
    t = study.tracker("h4", "a")
    t.start(params=CONFIG, tags={})
    assert t.run_id is not None
    study.close()
    t.log_metrics({"train_loss": 1.0}, step=1)
    t.log_artifact_content("x.svg", b"<svg/>")
    t.finish("FINISHED")
    assert not t.ok
    assert "tracking service failed" in t.error and "\n" not in t.error

    late = study.tracker("h5", "b")
    late.start(params=CONFIG, tags={})
    assert late.run_id is None and not late.ok
    assert not late.setup_failed()  # the set-up itself had worked
    late.finish("FINISHED")  # no raise


def test_tracking_failures_inside_the_service_reach_the_driver(study, tmp_path):
    t = study.tracker("h6", "a")
    t.start(params=CONFIG, tags={})
    t.log_metrics({"train_loss": "not a number"}, step=1)  # a warning inside the service: tracking goes on
    t.finish("FINISHED")
    assert t.ok
    assert study.drain() == []
    run = tr._client(study.uri).get_run(t.run_id)
    assert run.info.status == "FINISHED" and "train_loss" not in run.data.metrics

    # a run that is gone by the time the trial ends: the error comes back from drain()
    u = study.tracker("h7", "b")
    u.start(params=CONFIG, tags={})
    tr._client(study.uri).delete_run(u.run_id)
    u.finish("FINISHED")
    errors = study.drain()
    assert len(errors) == 1 and errors[0].startswith("h7: ") and "\n" not in errors[0]


def test_the_service_sets_up_the_study_and_ends_it(study, tmp_path):
    client = tr._client(study.uri)
    parent = study.setup["parent_run_id"]
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.info.experiment_id == study.setup["experiment_id"]
    assert run.data.tags[tr.ROLE_TAG] == "parent" and run.data.tags["t"] == "1"
    assert run.data.params["scale"] == "smoke"
    (tmp_path / "report.html").write_text("<html></html>")
    assert ray.get(study.service.log_report.remote([str(tmp_path / "report.html")], "report")) is None
    assert ray.get(study.service.log_report.remote([str(tmp_path / "gone.html")], "report")) is not None
    assert ray.get(study.service.end_parent.remote("FINISHED")) is None
    assert client.get_run(parent).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/report.html"]


def test_a_new_invocation_marks_runs_left_running_as_killed(study):
    t = study.tracker("h8", "a")
    t.start(params=CONFIG, tags={})
    assert t.run_id is not None  # this invocation dies with its parent and child RUNNING
    later = Study(study.uri)
    try:
        assert later.setup["stale"] == 2 and later.setup["parent_run_id"] != study.setup["parent_run_id"]
        assert tr._client(study.uri).get_run(t.run_id).info.status == "KILLED"
    finally:
        later.close()


def test_a_failed_setup_is_one_line_and_every_trial_knows(study):
    tr._client(study.uri).delete_experiment(study.setup["experiment_id"])
    later = Study(study.uri)
    try:
        assert "was deleted" in later.setup["error"] and "\n" not in later.setup["error"]
        t = later.tracker("h9", "a")
        t.start(params=CONFIG, tags={})
        assert t.setup_failed() and t.run_id is None
        t.finish("FINISHED")
        assert later.drain() == []
        assert ray.get(later.service.end_parent.remote("FINISHED")) is None  # there is no parent to end
    finally:
        later.close()
