"""The study command end to end: a real local Ray, a real MLflow sqlite store, real Parquet files."""
from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import results
from orchestrator.runner import RunOptions, run_study
from orchestrator.spec import load_study

TINY = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=192, test_subset=48, epochs=2, batch_size=64,
    ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1, train_attack_steps=1,
    eval_attack_steps=2, eval_eps_linf=[0.0, 0.05, 0.1], pretrain_epochs=1,
)


def write_study(folder, name, factors, seeds=(0,), search=None, **fixed):
    body = {"description": f"test study {name}", "seeds": list(seeds), "fixed": {**TINY, **fixed},
            "resources": {"cpu": 1, "gpu": 0}}
    if factors:
        body["factors"] = factors
    if search:
        body["search"] = search
    (folder / f"{name}.yaml").write_text(json.dumps(body))



def run(name, options, sets=None, **changes):
    spec = load_study(name, "default", sets or [])
    out = io.StringIO()
    outcome = run_study(spec, RunOptions(**{**options.__dict__, **changes}), out=out)
    return spec, outcome, out.getvalue()


def child_runs(tracking_uri, study):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sslrobust.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_grid_study_end_to_end_then_rerun_and_extend(ray_cluster, workspace):
    studies, options = workspace
    write_study(studies, "grid", {"ssl_weight": [0.0, 0.5]}, seeds=[0, 1])

    spec, outcome, text = run("grid", options)
    trials = spec.trials()
    assert outcome.ran == 4 and not outcome.failed and outcome.skipped == 0
    assert "robust accuracy against ε_test" in text and "report:" in text

    table = results.load("grid", options.storage)
    # a row per trial × ε_test (3 points), no corruption rows in this study
    assert len(table) == 4 * 3
    assert not table.duplicated(list(results.KEY_COLUMNS)).any()
    assert set(table["config_hash"]) == {t.config_hash for t in trials}
    assert (table.groupby("config_hash")["eps_test"].apply(lambda e: sorted(e)) .map(len) == 3).all()
    for _, rows in table.groupby("config_hash"):
        curve = rows.sort_values("eps_test")["robust_acc"].tolist()
        assert curve == sorted(curve, reverse=True)  # ascending-ε evaluation is monotone
    assert table["node_id"].notna().all() and table["mlflow_run_id"].notna().all()

    client, parents, children = child_runs(options.tracking_uri, "grid")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        chash = child.data.tags["sslrobust.config_hash"]
        config = next(t.config for t in trials if t.config_hash == chash)
        assert float(child.data.params["ssl_weight"]) == config["ssl_weight"]
        assert child.data.metrics["robust_acc/linf/0.1"] == pytest.approx(
            table[(table.config_hash == chash) & (table.eps_test == 0.1)]["robust_acc"].iloc[0])
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 2  # one per epoch
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "robust_accuracy_curve.png" in artifacts and f"{chash}.parquet" in artifacts
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/report.html" in parent_artifacts
    # Tune's own result files are there for each trial; its TensorBoard files are not (runner.tune_loggers).
    tune_files = [p for p in Path(options.storage, "tune").rglob("*") if p.is_file()]
    assert sum(p.name == "result.json" for p in tune_files) == 4
    assert sum(p.name == "progress.csv" for p in tune_files) == 4
    assert not [p for p in tune_files if p.name.startswith("events.out.tfevents")]

    # Re-running runs nothing and changes nothing.
    _, again, text = run("grid", options)
    assert again.ran == 0 and again.skipped == 4
    assert "nothing to run" in text
    assert len(results.load("grid", options.storage)) == 12

    # Extending a factor runs only the new cells, and --dry-run counts agree beforehand.
    sets = ["ssl_weight=[0.0, 0.5, 1.0]"]
    _, dry, text = run("grid", options, sets=sets, dry_run=True)
    assert "6 trials, 4 already done, 2 to run" in text and dry.ran == 0
    assert len(results.load("grid", options.storage)) == 12
    _, extended, _ = run("grid", options, sets=sets)
    assert extended.ran == 2 and extended.skipped == 4
    table = results.load("grid", options.storage)
    assert len(table) == 18 and not table.duplicated(list(results.KEY_COLUMNS)).any()
    _, _, children = child_runs(options.tracking_uri, "grid")
    assert len(children) == 6


def test_ssl_pretraining_is_trained_once_and_shared(ray_cluster, workspace):
    studies, options = workspace
    write_study(studies, "pre", {"ssl_weight": [0.0, 0.5, 1.0]}, init="ssl_pretrained")
    _, outcome, _ = run("pre", options)
    assert outcome.ran == 3 and not outcome.failed
    assert outcome.pretrainings == 1  # three trials started together, one trained it
    files = list((options_path(options) / "pretrained").glob("*.pt"))
    assert len(files) == 1
    # A later study with the same pre-training settings reuses it.
    write_study(studies, "pre2", {"ssl_weight": [2.0]}, init="ssl_pretrained")
    _, later, _ = run("pre2", options)
    assert later.ran == 1 and later.pretrainings == 0
    assert len(list((options_path(options) / "pretrained").glob("*.pt"))) == 1


def options_path(options):
    from pathlib import Path

    return Path(options.storage)


def test_optuna_search_runs_and_records_like_a_grid(ray_cluster, workspace):
    studies, options = workspace
    search = {"space": {"ssl_weight": {"low": 0.0, "high": 2.0}},
              "objectives": ["clean_acc", "robust_acc_above_eps_train"], "num_samples": 3, "max_concurrent": 2}
    write_study(studies, "search", None, search=search)
    _, outcome, _ = run("search", options)
    assert outcome.ran == 3 and not outcome.failed
    table = results.load("search", options.storage)
    assert table["config_hash"].nunique() == 3
    weights = sorted(table.groupby("config_hash")["ssl_weight"].first())
    assert all(0.0 <= w <= 2.0 for w in weights) and len(set(weights)) == 3
    _, parents, children = child_runs(options.tracking_uri, "search")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert all("robust_acc_above_eps_train" in c.data.metrics for c in children)

    # A second invocation warm-starts Optuna with the three results and samples only what is left.
    write_study(studies, "search", None, search={**search, "num_samples": 4})
    _, more, text = run("search", options)
    assert "3 earlier results as warm start, 1 new trials" in text
    assert more.ran == 1
    assert results.load("search", options.storage)["config_hash"].nunique() == 4


def test_study_file_validation_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(tmp_path))
    (tmp_path / "typo.yaml").write_text(textwrap.dedent("""
        factor: {ssl_weight: [0, 1]}
    """))
    (tmp_path / "neg.yaml").write_text('{"factors": {"ssl_weight": [0, -1]}}')
    (tmp_path / "empty.yaml").write_text('{"factors": {"ssl_weight": []}}')
    (tmp_path / "variant.yaml").write_text('{"factors": {"attack_variant": [ce, jont]}}')
    (tmp_path / "valid.yaml").write_text('{"factors": {"ssl_weight": [0, 1]}}')
    from orchestrator.errors import UserError

    cases = {
        "typo": "unknown field 'factor' (did you mean factors?)",
        "neg": "'ssl_weight' must be >= 0",
        "empty": "the list is empty",
        "variant": "unknown attack_variant 'jont' (did you mean joint?)",
    }
    for name, expected in cases.items():
        with pytest.raises(UserError) as err:
            load_study(name)
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert name in str(err.value)  # names the file
    with pytest.raises(UserError, match="unknown study 'tpyo'.*did you mean typo"):
        load_study("tpyo")
    with pytest.raises(UserError, match="--set: unknown setting 'ssl_wieght'.*ssl_weight"):
        load_study("valid", overrides=["ssl_wieght=1"])


def test_reused_worker_leaks_no_state_between_trials(ray_cluster, workspace):
    """Trials share worker processes (reuse_actors); a trial's result must not depend on that."""
    studies, options = workspace
    write_study(studies, "iso", {"ssl_weight": [0.5]}, seeds=[0, 1])
    write_study(studies, "iso_alone", {"ssl_weight": [0.5]}, seeds=[1])
    _, shared, _ = run("iso", options, max_concurrent=1)
    assert shared.ran == 2
    pids = {m["pid"] for m in shared.trial_metrics}
    assert len(pids) == 1  # both trials ran in one reused worker, one after the other
    _, alone, _ = run("iso_alone", options)
    assert alone.ran == 1
    columns = ["config_hash", "eps_test", "clean_acc", "robust_acc"]
    after_other = results.load("iso", options.storage)
    after_other = after_other[after_other.seed == 1][columns].sort_values("eps_test").reset_index(drop=True)
    fresh = results.load("iso_alone", options.storage)[columns].sort_values("eps_test").reset_index(drop=True)
    assert after_other.equals(fresh)


def test_a_study_whose_mlflow_setup_fails_stops_with_one_line_and_writes_nothing(ray_cluster, workspace):
    # The tracking callback sets the study up before any trial starts; a deleted experiment fails it.
    studies, options = workspace
    write_study(studies, "nosetup", {"ssl_weight": [0.0, 0.5]}, epochs=1)
    client = MlflowClient(options.tracking_uri)
    client.delete_experiment(client.create_experiment("nosetup"))

    from orchestrator.tracking import TrackingError

    with pytest.raises(TrackingError) as failure:
        run("nosetup", options)
    message = str(failure.value)
    assert "was deleted" in message and "mlflow experiments restore" in message and "\n" not in message
    assert len(results.load("nosetup", options.storage)) == 0
    tune_dir = Path(options.storage) / "tune"
    assert not tune_dir.exists() or not any(p.name.startswith("nosetup") for p in tune_dir.iterdir())
