"""Tests for the MLflow store layer (orchestrator.tracking, tracking_uri, metrics, liveness) and the
driver-side tracking callback, against real sqlite stores in tmp_path."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from orchestrator import tracking as tr
from orchestrator.errors import UserError
from orchestrator.tracking import TrackingError
from tests.rows import record

mlflow_client = pytest.importorskip("mlflow.tracking")


# ------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_take_over_run_and_log_artifacts(sqlite_uri, tmp_path):
    uri = sqlite_uri
    exp = tr.study_experiment(uri, "reopen")
    parent = tr.start_parent_run(uri, exp, "reopen 1", "reopen", {}, {})
    tr.end_run(uri, parent, "KILLED")
    tr.take_over_run(uri, parent)  # a resumed invocation continues its parent run
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
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="timed out"):
        tr.study_experiment(hung_server, "s")
    assert time.monotonic() - t0 < 15  # 3 attempts x 1 s + backoff
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"


# ------------------------------------------------------------------------------------------
# metric names and curves (orchestrator.metrics), one row-kind rule (trainables.records)
# ------------------------------------------------------------------------------------------

def _record(norm=None, eps=None, acc=None, **extra):
    """A record (tests/rows.py) at (norm, ε) with robust accuracy `acc`, clean 0.9 over 1000 examples."""
    return record(**{"norm": norm, "eps_test": eps, "robust_acc": acc, "attack": "pgd" if eps else "none",
                     "clean_acc": 0.9, "n_examples": 1000, **extra})


def test_distinct_eps_never_share_a_metric_and_curves_step_on_the_eps_scale():
    from orchestrator.metrics import EPS_STEP_SCALE, record_metrics, result_metric_name

    eps = [0.0, 0.1, 0.10025, 1 / 255, 2 / 255, 8 / 255, 0.031, 0.0314]
    names = {result_metric_name("linf", e, None, None) for e in eps}
    assert len(names) == len(eps)
    assert result_metric_name("linf", 0.1, None, None) == "robust_acc/linf/0.1"
    assert result_metric_name("l2", 1.0, None, None) == "robust_acc/l2/1"
    records = [_record("linf", e, 1 - e) for e in eps]
    metrics = record_metrics(records)
    curve = sorted((s, v) for n, v, s in metrics if n == "acc_vs_eps/robust_acc_linf")
    assert curve == sorted((int(round(e * EPS_STEP_SCALE)), 1 - e) for e in eps)
    assert (1000, 0.9) in curve  # ε = 0.1 at step 1000
    scalars = {n: v for n, v, s in metrics if s == 0}
    assert scalars["robust_acc/linf/0.10025"] == 1 - 0.10025 and scalars["robust_acc/linf/0.1"] == 0.9


def test_the_curves_come_first_in_mlflows_chart_view():
    """MLflow 3's chart view puts a metric ``a/b`` in section ``a``, orders the sections by name (by
    code unit when it first lays them out, by localeCompare, here case-insensitively, when runs
    bring new ones) and puts the names without ``/`` last: every curve's section must come before
    every other section a trial or the parent run has."""
    from orchestrator.metrics import is_curve, record_metrics

    records = [_record("linf", 0.0, 0.9), _record("linf", 0.1, 0.5), _record("l2", 0.5, 0.6),
               _record("linf", 0.1, 0.4, attack="pgd_adaptive", defence="ssl_reverse"),
               _record(corruption="gaussian_noise", severity=1, acc=0.8),
               _record(corruption="gaussian_noise", severity=3, acc=0.7),
               _record(attack="none", measure="certified_acc", value=0.4, radius=0.25, robust_acc=None),
               _record(attack="none", measure="certified_acc", value=0.3, radius=0.5, robust_acc=None),
               _record(attack="none", ood_set="gaussian", score="rotation", measure="auroc", value=0.7,
                       robust_acc=None)]
    names = {n for n, _, _ in record_metrics(records)}
    names |= {"robust_acc_at_eps_train/ssl_weight:0.5", "clean_acc_ci95/ssl_weight:0.5",  # the parent's
              "reeval/0123abcd/acc_vs_eps/robust_acc_linf"}
    sections = {n.rsplit("/", 1)[0] for n in names if "/" in n}
    curves = {n.rsplit("/", 1)[0] for n in names if is_curve(n)}
    assert curves == {"acc_vs_eps", "acc_vs_radius", "acc_vs_severity"}
    for order in (sorted(sections), sorted(sections, key=lambda x: (x.casefold(), x))):
        assert set(order[:len(curves)]) == curves, order


def test_row_kind_decides_every_kind_once():
    from trainables.records import CORRUPTION, DEFENDED, LABEL_FREE, OOD, ROBUSTNESS, row_kind

    nan = float("nan")
    assert row_kind(_record("linf", 0.1, 0.5, defence=nan)) == ROBUSTNESS
    assert row_kind(_record("linf", 0.1, 0.5, defence="none")) == ROBUSTNESS
    assert row_kind(_record("linf", 0.1, 0.5, defence="ssl_reverse", attack="pgd_adaptive")) == DEFENDED
    assert row_kind(_record(corruption="jpeg", severity=3, acc=0.7)) == CORRUPTION
    assert row_kind(_record(ood_set="gaussian", score="msp", measure="auroc", value=0.8)) == OOD
    assert row_kind(_record(measure="certified_acc", value=0.4, radius=0.25)) == LABEL_FREE


def test_accuracy_is_an_exact_count_over_n():
    import torch

    from trainables.evaluate import fraction, robust_accuracy_curve

    correct = torch.zeros(1000, dtype=torch.bool)
    correct[:734] = True
    assert fraction(correct) == 0.734 and type(fraction(correct)) is float
    assert correct.float().mean().item() != 0.734  # what float32 gave before
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(7, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for r in robust_accuracy_curve(model, x, y, "linf", [0.0, 0.3], steps=2, batch_size=7):
        k = round(r["robust_acc"] * 7)
        assert r["robust_acc"] == k / 7 and r["clean_acc"] == round(r["clean_acc"] * 7) / 7


# ------------------------------------------------------------------------------------------
# liveness: stale runs are runs of dead drivers, not merely RUNNING ones
# ------------------------------------------------------------------------------------------

def test_close_stale_runs_ends_only_runs_of_dead_drivers(sqlite_uri, monkeypatch):
    import subprocess
    import sys

    from orchestrator import liveness

    uri = sqlite_uri
    exp = tr.study_experiment(uri, "stale")
    dead = subprocess.run([sys.executable, "-c", "from orchestrator import liveness; print(liveness.this_owner())"],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout.strip()
    assert liveness.is_alive(liveness.this_owner(), None) and not liveness.is_alive(dead, None)
    assert liveness.is_alive("otherhost:1:1", time.time()) and not liveness.is_alive("otherhost:1:1", time.time() - 3600)
    c = client(uri)
    live = tr.start_parent_run(uri, exp, "live", "stale", {}, {})  # owned by this (live) process
    live_child = c.create_run(exp, tags={tr.PARENT_TAG: live, tr.ROLE_TAG: "trial"}).info.run_id
    gone = tr.start_parent_run(uri, exp, "gone", "stale", {}, {})
    c.set_tag(gone, tr.OWNER_TAG, dead)  # its driver exited without ending it
    gone_child = c.create_run(exp, tags={tr.PARENT_TAG: gone, tr.ROLE_TAG: "trial"}).info.run_id
    closed = tr.close_stale_runs(uri, exp)
    assert sorted(closed) == sorted([gone, gone_child])
    assert c.get_run(live).info.status == "RUNNING" and c.get_run(live_child).info.status == "RUNNING"
    assert c.get_run(gone).info.status == "KILLED" and c.get_run(gone_child).info.end_time
    assert tr.close_stale_runs(uri, exp) == []


@pytest.mark.slow
def test_a_new_sqlite_store_set_up_by_two_processes_at_once(tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = "import sys; from orchestrator import tracking; print(tracking.study_experiment(sys.argv[1], 'both'))"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].strip() == outs[1][0].strip() != ""


# ------------------------------------------------------------------------------------------
# the live callback and --backfill-tracking log the same metrics (a defended trial)
# ------------------------------------------------------------------------------------------

def test_backfill_of_a_defended_trial_logs_exactly_what_the_live_callback_logs(sqlite_uri, tmp_path):
    from types import SimpleNamespace

    from orchestrator import backfill, results
    from orchestrator.mlflow_callback import StudyTracking
    from orchestrator.spec import config_hash
    from orchestrator.trainable import StudyContext, trial_config, trial_rows

    uri, storage = sqlite_uri, str(tmp_path / "runs")
    fixed = {"eval_eps_linf": [0.0, 0.1], "defence": "ssl_reverse", "ssl_task": "rotation"}
    context = StudyContext(study="defended", storage=storage, tracking_uri=uri, fixed=fixed, cpus_per_trial=1,
                           invocation="defended-1")
    trial = SimpleNamespace(trial_id="t0001", config={"cell": {"ssl_weight": 0.5, "seed": 0}}, status="RUNNING")
    config = trial_config(trial.config, context)
    chash = config_hash(config)
    records = [_record("linf", 0.0, 0.9), _record("linf", 0.1, 0.5)] + [
        _record("linf", e, a, attack=att, defence="ssl_reverse")
        for e, att, a in ((0.0, "none", 0.88), (0.1, "pgd", 0.7), (0.1, "pgd_adaptive", 0.4))]
    live = StudyTracking(uri, "defended", storage=storage, invocation="defended-1", context=context,
                         varying=["ssl_weight"], description="a defended study", spec_text="factors: {}",
                         parent_name="defended live", parent_params={}, parent_tags={})
    live.set_up()
    live.on_trial_start(0, [], trial)
    path = results.write_trial(storage, "defended", chash, trial_rows(context, config, chash, "t0001", records,
                                                                         "node", None))
    live.on_trial_result(1, [], trial, {"epoch": 1, "train_loss": 0.5, "parquet": path})
    live.on_trial_complete(1, [], trial)
    live.end("FINISHED")
    assert live.errors() == []

    rows = results.load("defended", storage)
    rows = {chash: rows.astype(object).where(rows.notna(), None).to_dict("records")}
    other = tr.study_experiment(uri, "defended-backfill")
    assert backfill.backfill_rows(uri, other, "defended-backfill", rows, {chash: "ssl_weight=0.5"}) == 1

    c = client(uri)
    [live_run] = c.search_runs([live.experiment_id], "tags.`sslrobust.role` = 'trial'")
    [filled] = c.search_runs([other], "tags.`sslrobust.role` = 'trial'")
    assert live_run.info.run_name == filled.info.run_name == "ssl_weight=0.5"
    assert live_run.data.tags["sslrobust.config_hash"] == filled.data.tags["sslrobust.config_hash"] == chash

    def histories(run):
        return {name: sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, name))
                for name in run.data.metrics if name != "train_loss"}

    assert histories(live_run) == histories(filled)
    assert live_run.data.params == filled.data.params and "depth" not in filled.data.params
    names = set(live_run.data.metrics)
    assert {"defended_acc/ssl_reverse/pgd_adaptive/linf/0.1", "robust_acc/linf/0.1", "acc_vs_eps/robust_acc_linf",
            "acc_vs_eps/defended_acc_ssl_reverse_pgd_adaptive_linf"} <= names
    assert live_run.data.metrics["robust_acc/linf/0.1"] == 0.5  # not the defended 0.4 or 0.7
    parent = c.get_run(live.parent_run_id)  # a summary per cell (one seed here: no CI half-width)
    assert parent.info.status == "FINISHED" and parent.data.metrics["robust_acc_at_eps_train/ssl_weight:0.5"] == 0.5
    assert [a.path for a in c.list_artifacts(live.parent_run_id)] == ["study.yaml"]


def test_the_background_writer_keeps_the_order_and_reports_a_failing_job(capsys):
    from orchestrator.mlflow_writer import BackgroundWriter

    writer, seen = BackgroundWriter(), []
    for i in range(200):
        writer.submit(lambda i=i: seen.append(i))
    writer.submit(lambda: 1 / 0, "divide by zero")
    writer.submit(lambda: seen.append("after"))
    writer.drain()
    assert seen == [*range(200), "after"]  # in order; a failing job does not stop the ones after it
    assert len(writer.failures) == 1 and "divide by zero failed (ZeroDivisionError" in writer.failures[0]
    assert "WARNING: MLflow writer: divide by zero failed" in capsys.readouterr().out


def test_a_trial_whose_results_cannot_be_read_is_reported_by_the_callback(sqlite_uri, tmp_path):
    """The writer reads the trial's Parquet file off Tune's loop; when that fails the failure is in
    the callback's errors (the end-of-study summary, which names --backfill-tracking) and the
    trial's tracking stops there: its run is left for the backfill to complete."""
    from types import SimpleNamespace

    from orchestrator.mlflow_callback import StudyTracking
    from orchestrator.spec import config_hash
    from orchestrator.tracking_problem import Scope
    from orchestrator.trainable import StudyContext, trial_config

    storage = str(tmp_path / "runs")
    context = StudyContext(study="unread", storage=storage, tracking_uri=sqlite_uri,
                           fixed={"eval_eps_linf": [0.0, 0.1]}, cpus_per_trial=1, invocation="unread-1")
    trial = SimpleNamespace(trial_id="t0001", config={"cell": {"ssl_weight": 0.5, "seed": 0}}, status="RUNNING")
    chash = config_hash(trial_config(trial.config, context))
    live = StudyTracking(sqlite_uri, "unread", storage=storage, invocation="unread-1", context=context,
                         varying=["ssl_weight"], description="d", spec_text="factors: {}",
                         parent_name="unread live", parent_params={}, parent_tags={})
    live.set_up()
    live.on_trial_start(0, [], trial)
    live.on_trial_result(1, [], trial, {"epoch": 1, "train_loss": 0.5, "parquet": "/nonexistent.parquet"})
    live.on_trial_complete(1, [], trial)
    live.end("FINISHED")
    errors = live.errors()
    assert len(errors) == 1 and errors[0].scope is Scope.TRIAL and errors[0].subject == chash, errors
    assert "failed to log the trial's results for trial 'ssl_weight=0.5'" in errors[0].message
    assert "No such file" in errors[0].message
    assert str(errors[0]) == f"{chash}: {errors[0].message}"  # as the end-of-study summary lists it
    [run] = client(sqlite_uri).search_runs([live.experiment_id], "tags.`sslrobust.role` = 'trial'")
    assert run.info.status == "RUNNING" and run.data.metrics == {"train_loss": 0.5}


def test_the_end_of_study_lists_tracking_problems_by_scope():
    from orchestrator.summary import tracking_problem_lines
    from orchestrator.tracking_problem import Scope, TrackingProblem

    trial = TrackingProblem(Scope.TRIAL, "2124492ebe949aec", "MLflow tracking at U failed to log epoch 2")
    parent = TrackingProblem(Scope.PARENT, "abc123", "heartbeat failed (connection refused)")
    lines = tracking_problem_lines([trial, parent], "mlgone", "/runs", "http://127.0.0.1:5000")
    assert lines == [
        "MLflow tracking failed for 1 trial(s) and the study's parent run; their results are in Parquet. "
        "Log them to MLflow once the server is back with:",
        "  python -m orchestrator.study mlgone --backfill-tracking --storage /runs --tracking-uri http://127.0.0.1:5000",
        "  2124492ebe949aec: MLflow tracking at U failed to log epoch 2",
        "  parent run abc123: heartbeat failed (connection refused)"]
    writer = TrackingProblem(Scope.WRITER, "", "MLflow writer: a job failed (ValueError: x)")
    assert tracking_problem_lines([writer], "s", "/r", "u")[0].startswith("MLflow tracking failed for 1 trial(s);")
    assert tracking_problem_lines([], "s", "/r", "u") == []


def test_progress_line_counts_the_trial_that_ends_and_shows_its_cell():
    import io
    from types import SimpleNamespace

    from orchestrator.progress import ProgressLine

    out = io.StringIO()
    progress = ProgressLine("s", ["ssl_weight"], out)
    progress.started -= 600  # ten minutes in
    trials = [SimpleNamespace(status=s, config={"cell": {"ssl_weight": w, "seed": 0}})
              for s, w in (("RUNNING", 0.5), ("TERMINATED", 0.0), ("PENDING", 1.0))]
    progress.on_trial_result(0, trials, trials[0], {"robust_acc_at_eps_train": 0.61})
    progress.on_trial_complete(0, trials, trials[0])  # Tune marks it TERMINATED only afterwards
    import re

    assert re.fullmatch(r"\[s\] 2/3 done, 0 running, 1 pending, ETA 5m0[01]s, 10m0[0-2]s elapsed \| "
                        r"ssl_weight=0.5: robust 0.610 at ε_train", out.getvalue().strip()), out.getvalue()


def test_progress_eta_shares_the_mean_trial_time_among_the_slots_that_ran_side_by_side():
    # When the first of two side-by-side trials ends, the elapsed time per finished trial would
    # give ~2x the time left; the mean trial time over the two slots does not.
    import io
    from types import SimpleNamespace

    from orchestrator.progress import ProgressLine
    from orchestrator.trainable import TRAIN_SECONDS

    out = io.StringIO()
    progress = ProgressLine("s", ["seed"], out)
    progress.started -= 70  # 10 s of start, then a 60 s trial
    trials = [SimpleNamespace(status=s, config={"cell": {"seed": i}})
              for i, s in enumerate(["RUNNING", "RUNNING"] + ["PENDING"] * 10)]
    progress.on_trial_result(0, trials, trials[0], {TRAIN_SECONDS: 20.0, "time_total_s": 60.0})
    progress.on_trial_result(0, trials, trials[1], {"time_total_s": 50.0})  # not finished: no train_seconds yet
    progress.on_trial_complete(0, trials, trials[0])
    # (10 pending + half of the 1 running) x 60 s / 2 slots = 315 s; the old estimate was 70 x 11 = 770 s
    assert ", ETA 5m15s, 1m1" in out.getvalue(), out.getvalue()
    # a cell that already had results reports no train_seconds and does not pull the mean down
    trials[0].status, trials[1].status = "TERMINATED", "RUNNING"
    trials[2].status = "RUNNING"
    progress.on_trial_result(0, trials, trials[2], {"reused_result": 1, "time_total_s": 0.5})
    progress.on_trial_complete(0, trials, trials[2])
    assert out.getvalue().splitlines()[-1].startswith("[s] 2/12 done, 1 running, 9 pending, ETA 4m45s"), out.getvalue()
