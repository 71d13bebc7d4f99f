"""Tests for orchestrator.tracking against real MLflow: sqlite stores in tmp_path and real
`mlflow server` subprocesses (started by fixtures, always stopped)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import tracking as tr
from orchestrator.errors import UserError
from orchestrator.tracking import TrackingError, TrialTracker

mlflow_client = pytest.importorskip("mlflow.tracking")


# ------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.db = workdir / "mlflow.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Server":
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        """Stop the server's process group (the server, uvicorn and its job runner)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        # uvicorn children may outlive the leader for a moment: kill what is left of the group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(_module_server):
    """One live server per module (starting one takes 10-20 s); a test that kills it (the last one
    in this file) leaves it to be restarted by whichever test needs it next."""
    if _module_server.proc is None or _module_server.proc.poll() is not None:
        _module_server.stop()
        _module_server.start()
    return _module_server


@pytest.fixture(scope="module")
def _store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("store")  # one sqlite db (schema creation costs seconds)


@pytest.fixture
def sqlite_uri(_store_dir, tmp_path, monkeypatch):
    # Run from an unrelated directory: nothing may be written to ./mlruns there.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tr.default_tracking_uri(_store_dir)


@pytest.fixture(autouse=True)
def _no_leaked_env():
    before = {k: os.environ.get(k) for k in tr.HTTP_BOUNDS}
    yield
    assert {k: os.environ.get(k) for k in tr.HTTP_BOUNDS} == before


def client(uri):
    return mlflow_client.MlflowClient(tracking_uri=uri)


def children(uri, experiment_id, parent_id):
    return client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


CONFIG = {"dataset": "fashion_mnist", "eps_train": 0.1, "eval_norms": ["linf"], "train_subset": None,
          "corruptions": []}


# ------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------

def test_resolve_tracking_uri_rules(tmp_path):
    assert tr.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tr.resolve_tracking_uri(None, tmp_path) == tr.default_tracking_uri(tmp_path)
    assert tr.resolve_tracking_uri("", tmp_path) == tr.default_tracking_uri(tmp_path)
    assert tr.resolve_tracking_uri("runs/x.db", tmp_path) == f"sqlite:///{tmp_path}/runs/x.db"
    assert tr.resolve_tracking_uri("/abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    # relative sqlite URIs are made absolute so workers with another CWD agree
    assert tr.resolve_tracking_uri("sqlite:///m.db", tmp_path) == f"sqlite:///{tmp_path}/m.db"
    assert tr.resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.com", "postgresql://u@h/db",
                "mysql+pymysql://u@h/db", "databricks"):
        assert tr.resolve_tracking_uri(uri, tmp_path) == uri
    for bad in ("./mlruns", "mlruns", "/data/mlruns", "file:///tmp/mlruns", "file:./mlruns"):
        with pytest.raises(TrackingError) as err:
            tr.resolve_tracking_uri(bad, tmp_path)
        msg = str(err.value)
        assert "\n" not in msg and "MLflow 3 needs a database or a server" in msg
        assert "sqlite:///mlflow.db" in msg and isinstance(err.value, UserError)


def test_flatten_params_and_metric_names():
    flat = tr.flatten_params({
        "eval_eps_linf": [0.0, 0.1], "train_subset": None, "corruptions": [], "nested": [[1, 2]],
        "names": ["a,b"], "augment": True, "lr": 0.05, "big": "x" * 10_000, "bad key!": 1,
    })
    assert flat["eval_eps_linf"] == "0.0,0.1"
    assert flat["train_subset"] == "None"
    assert flat["corruptions"] == "[]"
    assert flat["nested"] == "[[1, 2]]" and flat["names"] == '["a,b"]'
    assert flat["augment"] == "True" and flat["lr"] == "0.05"
    assert len(flat["big"]) == tr.MAX_PARAM_VALUE_LENGTH and "truncated, 10000 chars" in flat["big"]
    assert flat["bad key_"] == "1"
    assert all(isinstance(v, str) for v in flat.values())

    assert tr.result_metric_name("linf", 0.1, None, None) == "robust_acc/linf/0.1"
    assert tr.result_metric_name("linf", 8 / 255, None, None) == "robust_acc/linf/0.0314"
    assert tr.result_metric_name("linf", 0.025, None, None) == "robust_acc/linf/0.025"
    assert tr.result_metric_name("l2", 1.0, None, None) == "robust_acc/l2/1"
    assert tr.result_metric_name("linf", 0.0, None, None) == "robust_acc/linf/0"
    assert tr.result_metric_name(None, None, "gaussian_noise", 3) == "corruption_acc/gaussian_noise/3"
    assert tr.result_metric_name(None, None, None, None) == "clean_acc"
    eps = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255]
    assert len({tr.result_metric_name("linf", e, None, None) for e in eps}) == len(eps)

    tags = tr.provenance_tags()
    assert tags["sslrobust.git_sha"]
    assert set(f"sslrobust.version.{p}" for p in tr.PROVENANCE_PACKAGES) <= set(tags)
    assert tags["sslrobust.version.mlflow"].startswith("3.")


def test_provenance_git_sha_fallback(monkeypatch):
    monkeypatch.setattr(tr, "_provenance_cache", None)
    monkeypatch.setattr(tr, "_git_sha", lambda: None)
    monkeypatch.setenv("SSLROBUST_GIT_SHA", "abc123")
    assert tr.provenance_tags()["sslrobust.git_sha"] == "abc123"
    monkeypatch.setattr(tr, "_provenance_cache", None)
    monkeypatch.delenv("SSLROBUST_GIT_SHA")
    assert tr.provenance_tags()["sslrobust.git_sha"] == "unknown"
    monkeypatch.setattr(tr, "_provenance_cache", None)


def test_check_reachable_closed_port_is_fast_and_one_line():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tr.check_reachable(uri, timeout=2)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"MLflow tracking server {uri} is not reachable (connection refused)")
    assert "mlflow server --host 127.0.0.1 --port 5000" in msg and "--tracking-uri sqlite:///mlflow.db" in msg


def test_check_reachable_sqlite(tmp_path):
    tr.check_reachable(tr.default_tracking_uri(tmp_path))  # directory exists: fine
    missing = tmp_path / "nope"
    with pytest.raises(TrackingError, match="nope") as err:
        tr.check_reachable(tr.default_tracking_uri(missing))
    assert "\n" not in str(err.value)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(TrackingError, match="not writable"):
            tr.check_reachable(tr.default_tracking_uri(ro))


def test_driver_calls_against_dead_server_raise_fast():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tr.study_experiment(uri, "s")
    assert time.monotonic() - t0 < 10
    assert "\n" not in str(err.value) and "connection refused" in str(err.value)


# ------------------------------------------------------------------------------------------
# real stores
# ------------------------------------------------------------------------------------------

def run_study(uri, tmp_path, study="study-a"):
    exp = tr.study_experiment(uri, study)
    assert tr.study_experiment(uri, study) == exp
    parent = tr.start_parent_run(uri, exp, study, {"trials": 2, "grid": [1, 2]}, {"sslrobust.note": "x"})
    trackers = []
    for i, h in enumerate(["hash0", "hash1"]):
        t = TrialTracker(uri, exp, parent, h, f"trial_{i}")
        rid = t.start({**CONFIG, "seed": i}, {"sslrobust.trial_id": str(i)})
        assert rid and t.ok and not t.reused, t.error
        for step in range(3):
            t.log_metrics({"loss": 1.0 / (step + 1), "train_acc": 0.5 + 0.1 * step}, step=step)
        t.log_result_metrics({
            tr.result_metric_name("linf", 0.1, None, None): 0.4 + i / 10,
            tr.result_metric_name("linf", 8 / 255, None, None): 0.6,
            tr.result_metric_name(None, None, "gaussian_noise", 3): 0.7,
        })
        art = tmp_path / f"curve{i}.json"
        art.write_text("{}")
        t.log_artifact(str(art), "plots")
        t.set_tags({"sslrobust.done": True})
        t.finish()
        assert t.ok and not t.warnings, (t.error, t.warnings)
        trackers.append(t)
    tr.end_run(uri, parent)
    return exp, parent, trackers


@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_parent_and_two_trials(backend, request, tmp_path):
    if backend == "server":
        uri = request.getfixturevalue("server").uri
        tr.check_reachable(uri)
    else:
        uri = request.getfixturevalue("sqlite_uri")
        tr.check_reachable(uri)
    exp, parent, trackers = run_study(uri, tmp_path)
    c = client(uri)
    p = c.get_run(parent)
    assert p.info.status == "FINISHED"
    assert p.data.tags["sslrobust.role"] == "parent" and p.data.tags["sslrobust.study"] == "study-a"
    assert p.data.tags["sslrobust.note"] == "x" and "sslrobust.git_sha" in p.data.tags
    assert p.data.params == {"trials": "2", "grid": "1,2"}
    assert p.info.run_name.startswith("study-a ")
    kids = children(uri, exp, parent)
    assert sorted(r.data.tags["sslrobust.config_hash"] for r in kids) == ["hash0", "hash1"]
    for r in kids:
        i = int(r.data.tags["sslrobust.trial_id"])
        assert r.info.status == "FINISHED" and r.info.end_time
        assert r.info.run_name == f"trial_{i}"
        assert r.data.tags["sslrobust.role"] == "trial" and r.data.tags["sslrobust.done"] == "True"
        assert r.data.params["seed"] == str(i) and r.data.params["eval_norms"] == "linf"
        assert r.data.params["train_subset"] == "None"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "loss")] == [0, 1, 2]
        assert r.data.metrics["robust_acc/linf/0.1"] == pytest.approx(0.4 + i / 10)
        assert r.data.metrics["robust_acc/linf/0.0314"] == pytest.approx(0.6)
        assert r.data.metrics["corruption_acc/gaussian_noise/3"] == pytest.approx(0.7)
        assert [f.path for f in c.list_artifacts(r.info.run_id, "plots")] == [f"plots/curve{i}.json"]
    if backend == "sqlite":
        # artifacts live next to the database, never in ./mlruns of the current directory
        assert not Path("mlruns").exists()
        assert (Path(tr._sqlite_path(uri)).parent / "mlartifacts").is_dir()


def test_retried_trial_reuses_its_run(sqlite_uri):
    uri = sqlite_uri
    exp = tr.study_experiment(uri, "retry")
    parent = tr.start_parent_run(uri, exp, "retry", {}, {})
    first = TrialTracker(uri, exp, parent, "h", "trial_0")
    rid = first.start(CONFIG, {})
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish("FAILED")  # the attempt crashed

    # retry that restored a checkpoint holding the run id
    second = TrialTracker(uri, exp, parent, "h", "trial_0")
    assert second.start(CONFIG, {}, existing_run_id=rid) == rid and second.reused
    assert client(uri).get_run(rid).info.status == "RUNNING"
    second.log_metrics({"loss": 0.5}, step=1)
    # retry that crashed before its first checkpoint: found by (parent, hash)
    third = TrialTracker(uri, exp, parent, "h", "trial_0")
    assert third.start({**CONFIG, "eps_train": 0.2}, {}) == rid and third.reused
    assert any("eps_train" in w for w in third.warnings)  # params are immutable in MLflow
    # a stale/unknown run id from a checkpoint does not break the invariant either
    fourth = TrialTracker(uri, exp, parent, "h", "trial_0")
    assert fourth.start(CONFIG, {}, existing_run_id="0" * 32) == rid
    fourth.finish()
    assert all(t.ok for t in (first, second, third, fourth))

    kids = children(uri, exp, parent)
    assert [r.info.run_id for r in kids] == [rid]
    run = kids[0]
    assert run.info.status == "FINISHED" and run.data.tags["sslrobust.attempt"] == "4"
    assert run.data.params["eps_train"] == "0.1"
    assert [m.step for m in client(uri).get_metric_history(rid, "loss")] == [0, 1]

    # a checkpoint from an earlier invocation (other parent) -> a new child of the new parent
    parent2 = tr.start_parent_run(uri, exp, "retry", {}, {})
    fifth = TrialTracker(uri, exp, parent2, "h", "trial_0")
    rid2 = fifth.start(CONFIG, {}, existing_run_id=rid)
    assert rid2 and rid2 != rid and not fifth.reused
    assert [r.info.run_id for r in children(uri, exp, parent2)] == [rid2]


def test_close_stale_runs(sqlite_uri):
    uri = sqlite_uri
    exp = tr.study_experiment(uri, "stale")
    old_parent = tr.start_parent_run(uri, exp, "stale", {}, {})
    t = TrialTracker(uri, exp, old_parent, "h", "trial_0")
    old_child = t.start(CONFIG, {})
    done = TrialTracker(uri, exp, old_parent, "h2", "trial_1")
    done.start(CONFIG, {})
    done.finish()
    # the driver died: old_parent and old_child stay RUNNING. A new invocation starts:
    new_parent = tr.start_parent_run(uri, exp, "stale", {}, {})
    closed = tr.close_stale_runs(uri, exp, exclude={new_parent})
    assert sorted(closed) == sorted([old_parent, old_child])
    c = client(uri)
    for rid in closed:
        info = c.get_run(rid).info
        assert info.status == "KILLED" and info.end_time
    assert c.get_run(new_parent).info.status == "RUNNING"
    assert c.get_run(done.run_id).info.status == "FINISHED"
    assert tr.close_stale_runs(uri, exp, exclude={new_parent}) == []


def test_study_experiment_concurrent_creation(sqlite_uri, monkeypatch):
    uri = sqlite_uri
    exp = tr.study_experiment(uri, "race")
    # Another process created the experiment between our lookup and our create call.
    real = mlflow_client.MlflowClient.get_experiment_by_name
    calls = []

    def racy(self, name):
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(mlflow_client.MlflowClient, "get_experiment_by_name", racy)
    assert tr.study_experiment(uri, "race") == exp
    assert len(calls) == 2


def test_reopen_run_and_log_artifacts(sqlite_uri, tmp_path):
    uri = sqlite_uri
    exp = tr.study_experiment(uri, "reopen")
    parent = tr.start_parent_run(uri, exp, "reopen", {}, {})
    tr.end_run(uri, parent, "KILLED")
    tr.reopen_run(uri, parent)  # a resumed invocation continues its parent run
    assert client(uri).get_run(parent).info.status == "RUNNING"
    files = [tmp_path / "report.html", tmp_path / "fig.png"]
    for f in files:
        f.write_text("x")
    tr.log_artifacts(uri, parent, files, artifact_path="report")
    assert sorted(f.path for f in client(uri).list_artifacts(parent, "report")) == ["report/fig.png", "report/report.html"]
    with pytest.raises(TrackingError, match="missing.html"):
        tr.log_artifacts(uri, parent, [tmp_path / "missing.html"])
    tr.end_run(uri, parent)
    assert client(uri).get_run(parent).info.status == "FINISHED"


def test_metrics_from_parquet_like_rows():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame([
        {"norm": "linf", "eps_test": 0.1, "corruption": None, "severity": None, "robust_acc": 0.5, "clean_acc": 0.9},
        {"norm": "linf", "eps_test": 0.0, "corruption": None, "severity": None, "robust_acc": 0.9, "clean_acc": 0.9},
        {"norm": None, "eps_test": None, "corruption": "jpeg", "severity": 3, "robust_acc": 0.7, "clean_acc": 0.9},
    ]).convert_dtypes()  # pd.NA for missing cells, as results.load returns
    assert tr.metrics_from_rows(df.to_dict("records")) == {
        "robust_acc/linf/0.1": 0.5, "robust_acc/linf/0": 0.9, "corruption_acc/jpeg/3": 0.7, "clean_acc": 0.9,
    }


def test_tracker_before_start_and_bad_artifact(sqlite_uri):
    t = TrialTracker(sqlite_uri, "0", "p", "h", "t")
    t.log_metrics({"a": 1.0}, step=0)  # never raises
    assert not t.ok and "before the trial run was started" in t.error


def test_server_killed_mid_trial_then_backfill(server, tmp_path):
    uri = server.uri
    tr.check_reachable(uri)
    study = "killed"
    exp = tr.study_experiment(uri, study)
    parent = tr.start_parent_run(uri, exp, study, {}, {})
    t = TrialTracker(uri, exp, parent, "hash-run", "trial_0")
    rid = t.start(CONFIG, {})
    t.log_metrics({"loss": 1.0}, step=0)
    assert t.ok, t.error

    server.stop(signal.SIGKILL)  # the server dies mid-trial (restarted if needed later)

    t0 = time.monotonic()
    t.log_metrics({"loss": 0.5}, step=1)  # first failure: bounded retries
    first = time.monotonic() - t0
    assert first < 10, first
    assert not t.ok and "connection refused" in t.error and "\n" not in t.error
    art = tmp_path / "a.txt"
    art.write_text("x")
    for call in (
        lambda: t.log_metrics({"loss": 0.1}, step=2),
        lambda: t.log_result_metrics({"robust_acc/linf/0.1": 0.5}),
        lambda: t.log_artifact(str(art)),
        lambda: t.set_tags({"a": 1}),
        lambda: t.finish(),
    ):
        t0 = time.monotonic()
        call()
        assert time.monotonic() - t0 < 0.5
    assert t.skipped == 5
    # a tracker that starts after the server died also fails fast without raising
    late = TrialTracker(uri, exp, parent, "hash-none", "trial_1")
    t0 = time.monotonic()
    assert late.start(CONFIG, {}) is None
    assert time.monotonic() - t0 < 10 and not late.ok
    late.finish()

    # Parquet results exist for both trials; backfill (here straight into the server's sqlite db)
    db_uri = f"sqlite:///{server.db}"
    def row(h, norm=None, eps=None, corruption=None, severity=None, acc=0.0):
        return {"study": study, "trial_id": f"t-{h}", "config_hash": h, "norm": norm, "eps_test": eps,
                "corruption": corruption, "severity": severity, "robust_acc": acc, "clean_acc": 0.9,
                "attack": "pgd" if norm else "none", "node_id": "node-1", "git_sha": "abc123",
                "mlflow_run_id": None}

    rows = {
        "hash-run": [row("hash-run", "linf", 0.1, acc=0.5), row("hash-run", corruption="contrast", severity=2, acc=0.8)],
        "hash-none": [row("hash-none", "linf", 8 / 255, acc=0.3)],
    }
    configs = {"hash-run": CONFIG, "hash-none": {**CONFIG, "seed": 1}}

    def summary(config, result_rows):  # same shape as orchestrator.trainable.summary_metrics
        assert all(r["corruption"] is None for r in result_rows if r["norm"] is not None)
        return {"robust_acc_at_eps_train": max(r["robust_acc"] for r in result_rows), "bad": "x"}

    assert tr.backfill_from_results(db_uri, study, rows, configs, summary_metrics=summary) == 2
    assert tr.backfill_from_results(db_uri, study, rows, configs) == 0  # idempotent

    c = client(db_uri)
    runs = c.search_runs([exp], filter_string="tags.`sslrobust.role` = 'trial'")
    by_hash = {r.data.tags["sslrobust.config_hash"]: r for r in runs}
    assert sorted(by_hash) == ["hash-none", "hash-run"] and len(runs) == 2
    done = by_hash["hash-run"]
    assert done.info.run_id == rid and done.info.status == "FINISHED"  # completed, not duplicated
    assert done.data.metrics["robust_acc/linf/0.1"] == 0.5
    assert done.data.metrics["corruption_acc/contrast/2"] == 0.8
    assert done.data.metrics["clean_acc"] == 0.9 and done.data.metrics["robust_acc_at_eps_train"] == 0.8
    assert "bad" not in done.data.metrics
    assert done.data.tags["mlflow.parentRunId"] == parent and done.data.tags["sslrobust.backfilled"] == "true"
    new = by_hash["hash-none"]
    assert new.info.status == "FINISHED" and new.data.metrics["robust_acc/linf/0.0314"] == 0.3
    assert new.data.params["seed"] == "1" and new.data.tags["sslrobust.backfilled"] == "true"
    assert new.info.run_name == f"{study}-hash-non" and new.data.tags["sslrobust.git_sha"] == "abc123"
    bf = c.get_run(new.data.tags["mlflow.parentRunId"])
    assert bf.data.tags["sslrobust.role"] == "backfill" and bf.info.status == "FINISHED"
    backfill_parents = c.search_runs([exp], filter_string="tags.`sslrobust.role` = 'backfill'")
    assert len(backfill_parents) == 1


@pytest.fixture
def hung_server():
    """A port that accepts TCP connections (kernel backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_hung_server_times_out(hung_server, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"not reachable \(no answer within 1 s\)"):
        tr.check_reachable(hung_server, timeout=1)
    assert time.monotonic() - t0 < 5
    # a user's own MLflow HTTP settings win over the built-in bounds
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    t = TrialTracker(hung_server, "1", "p", "h", "trial_0")
    t0 = time.monotonic()
    assert t.start(CONFIG, {}) is None
    assert time.monotonic() - t0 < 15  # 3 attempts x 1 s + backoff
    assert "timed out" in t.error and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"
    t0 = time.monotonic()
    t.finish()
    assert time.monotonic() - t0 < 0.5
