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
from orchestrator.spec import SEARCH_OBJECTIVES, load_study

from tests.rows import result_row

TINY = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=192, test_subset=48, epochs=2, batch_size=64,
    ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1, train_attack_steps=1,
    eval_attack_steps=2, eval_eps_linf=[0.0, 0.05, 0.1], pretrain_epochs=1,
)


def write_study(folder, name, factors, seeds=(0,), search=None, **fixed):
    body = {"description": f"test study {name}", "seeds": seeds if isinstance(seeds, dict) else list(seeds), "fixed": {**TINY, **fixed},
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
    # Tune's own result files are there for each trial, the last line with the trial's own work;
    # its TensorBoard files are not (runner.run_study).
    tune_files = [p for p in Path(options.storage, "tune").rglob("*") if p.is_file()]
    assert sum(p.name == "result.json" for p in tune_files) == 4
    assert sum(p.name == "progress.csv" for p in tune_files) == 4
    assert not [p for p in tune_files if p.name.startswith("events.out.tfevents")]
    for m in outcome.trial_metrics:
        assert m["train_seconds"] > 0 and m["eval_seconds"] > 0
        assert m["train_seconds"] + m["eval_seconds"] < m["time_total_s"]

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
    assert outcome.pretrainings == 1  # the driver's stage trained it once, before the three trials
    files = list((options_path(options) / "pretrained").glob("*.pt"))
    assert len(files) == 1
    # A later study with the same pre-training settings reuses it.
    write_study(studies, "pre2", {"ssl_weight": [2.0]}, init="ssl_pretrained")
    _, later, _ = run("pre2", options)
    assert later.ran == 1 and later.pretrainings == 0
    assert len(list((options_path(options) / "pretrained").glob("*.pt"))) == 1


def test_a_failed_ssl_pretraining_is_one_line_and_its_cells_are_not_run(ray_cluster, workspace):
    """The pre-training cannot be stored (a file where its folder should be): one line names it,
    the cell that needs it is listed as failed and missing, the scratch cell runs."""
    from orchestrator.pretrain import pretrained_path

    studies, options = workspace
    write_study(studies, "prefail", {"init": ["scratch", "ssl_pretrained"]}, epochs=1, eval_eps_linf=[0.0, 0.1])
    spec = load_study("prefail")
    needs = next(t for t in spec.trials() if t.config["init"] == "ssl_pretrained")
    path = pretrained_path(options.storage, needs.config)
    Path(options.storage).mkdir(parents=True)
    (Path(options.storage) / "pretrained").write_text("not a folder")
    _, outcome, text = run("prefail", options)
    assert outcome.ran == 1 and outcome.pretrainings == 0 and outcome.missing == [needs.config_hash]
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"[prefail] SSL pre-training {path} failed (")]
    assert line.endswith("; the 1 cell(s) that need it are not run")
    assert len(outcome.failed) == 1 and outcome.failed[0].startswith(f"{needs.config_hash}: not run: SSL pre-training {path} failed")
    assert f"  failed: {outcome.failed[0]}" in text
    assert set(results.load("prefail", options.storage)["init"]) == {"scratch"}


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


def test_checkpoint_selection_evaluates_the_best_robust_validation_epoch(ray_cluster, workspace):
    """Robust overfitting made quick: 80% of 256 training labels are noise, so robust validation
    accuracy peaks at epoch 4 of 5 (this setting on this data and seed; one thread per trial) and
    the trial is evaluated with epoch 4's weights."""
    studies, options = workspace
    write_study(studies, "selection", {}, seeds=[0], train_subset=256, batch_size=32, epochs=5,
                schedule="constant", lr=0.05, weight_decay=0.0, label_noise=0.8, val_subset=200,
                ssl_task="none", attack_variant="ce", checkpoint_selection="best_robust_val",
                test_subset=100)
    spec, outcome, _ = run("selection", options)
    assert outcome.ran == 1 and not outcome.failed
    table = results.load("selection", options.storage)
    client, _, children = child_runs(options.tracking_uri, "selection")
    history = client.get_metric_history(children[0].info.run_id, "val_robust_acc")
    by_epoch = {m.step: m.value for m in history}
    assert sorted(by_epoch) == [1, 2, 3, 4, 5]
    best = max(by_epoch, key=lambda e: (by_epoch[e], e))
    assert set(table["selected_epoch"]) == {best}
    assert best != 5  # the selected epoch is not the last, and the results say so


def cli(*args: str) -> tuple[int, str]:
    """`python -m orchestrator.study ...` in this process (its Ray is the module's ray_cluster): the
    exit status and what it printed."""
    import contextlib

    from orchestrator.study import main

    out = io.StringIO()  # (not capsys's stream: Tune pickles the run's stopper, which prints)
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    return status, out.getvalue()


def test_search_skips_nan_objectives_in_its_warm_start_and_continues(ray_cluster, workspace):
    """A result whose objective is undefined (evaluated at ε 0 only, below ε_train) is no sample for
    Optuna: the warm start skips it instead of failing; a result that defines both objectives is one,
    so num_samples 2 with it runs one new trial (a re-run with a higher num_samples continues)."""
    from orchestrator.spec import config_hash
    from trainables.config import resolve

    studies, options = workspace
    search = {"space": {"ssl_weight": {"low": 0.0, "high": 2.0}}, "objectives": list(SEARCH_OBJECTIVES),
              "num_samples": 2, "max_concurrent": 1}
    write_study(studies, "nans", None, search=search, epochs=1)
    spec = load_study("nans")

    def earlier_result(ssl_weight, eps_values):
        config = resolve({**spec.fixed, "ssl_weight": ssl_weight})
        chash = config_hash(config)
        rows = [result_row(config, study="nans", trial_id=chash, config_hash=chash, n_examples=48, clean_acc=0.5,
                           eps_test=e, robust_acc=0.5 - e) for e in eps_values]
        results.write_trial(options.storage, "nans", chash, rows)
        return chash

    earlier_result(0.7, [0.0])  # robust_acc_above_eps_train: NaN
    earlier_result(1.3, [0.0, 0.1])
    status, text = cli("nans", "--storage", options.storage, "--tracking-uri", options.tracking_uri)
    assert status == 0, text
    assert "Optuna search: 1 earlier results as warm start, 1 new trials" in text
    assert "trials run now: 1, skipped (results existed): 1, failed: 0" in text
    assert results.load("nans", options.storage)["config_hash"].nunique() == 3


def test_nan_objective_is_told_to_optuna_as_a_failed_trial():
    import optuna

    from orchestrator.search import MultiObjectiveOptunaSearch
    from ray import tune

    searcher = MultiObjectiveOptunaSearch(space={"ssl_weight": tune.uniform(0.0, 2.0)},
                                          metric=list(SEARCH_OBJECTIVES), mode=["max", "max"], seed=0)
    for trial_id, reward in (("a", [0.8, 0.4]), ("b", [0.7, float("nan")]), ("c", [0.6, None])):
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_complete(trial_id, {k: v for k, v in zip(SEARCH_OBJECTIVES, reward) if v is not None})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.FAIL]


def test_cells_without_a_result_are_listed_and_the_rebuilt_report_equals_the_end_of_study_one(
        ray_cluster, workspace):
    """One cell fails (its shared SSL pre-training file is corrupt): the summary lists it, the exit
    status is 1, and `python -m orchestrator.report` rebuilt from storage alone has the same
    missing-cells section (the whole report, but for when it was generated)."""
    import re

    from orchestrator.pretrain import pretrained_path
    from orchestrator.report.cli import main as report_main

    studies, options = workspace
    write_study(studies, "gap", {"init": ["scratch", "ssl_pretrained"]}, epochs=1)
    (studies / "gap.yaml").write_text(json.dumps({**json.loads((studies / "gap.yaml").read_text()),
                                                  "max_failures": 0}))
    spec = load_study("gap")
    broken = next(t for t in spec.trials() if t.config["init"] == "ssl_pretrained")
    corrupt = Path(pretrained_path(options.storage, broken.config))
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a checkpoint")
    status, text = cli("gap", "--storage", options.storage, "--tracking-uri", options.tracking_uri)
    assert status == 1, text
    assert f"cells of the grid without a result: 1 of 2" in text
    assert re.search(rf"^  {broken.config_hash}  init=ssl_pretrained$", text, re.M), text
    end_of_study = (Path(options.storage) / "reports" / "gap" / "report.html").read_text()
    assert "1 of 2 expected cells are missing" in end_of_study and broken.config_hash in end_of_study
    assert not list((Path(options.storage) / "results").rglob("*.json"))  # the grid is beside the results

    assert report_main(["gap", "--storage", options.storage, "--out", str(Path(options.storage) / "rebuilt")]) == 0
    rebuilt = (Path(options.storage) / "rebuilt" / "report.html").read_text()
    generated = re.compile(r"<tr><th>generated</th><td[^>]*>[^<]*</td></tr>")
    assert generated.sub("", rebuilt) == generated.sub("", end_of_study)


def test_adaptive_replication_adds_seeds_in_rounds_and_a_rerun_continues(ray_cluster, workspace):
    """`seeds: {min: 1, max: 2, until_ci: 0.001}`: round 1 runs seed 0 in both cells, round 2 seed 1
    (one seed has no interval), then max stops both; raising max runs seed 2 only, nothing again."""
    studies, options = workspace

    def write(maximum):
        write_study(studies, "adaptive", {"ssl_weight": [0.0, 0.5]}, seeds={"min": 1, "max": maximum, "until_ci": 0.001},
                    train_subset=128, test_subset=32, epochs=1, eval_eps_linf=[0.0, 0.1])

    write(2)
    status, text = cli("adaptive", "--storage", options.storage, "--tracking-uri", options.tracking_uri)
    assert status == 0, text
    assert "adaptive replication, round 2: one more seed for 2 of 2 cell(s)" in text
    table = results.load("adaptive", options.storage)
    assert sorted(table.groupby("ssl_weight")["seed"].apply(lambda s: sorted(set(s))).tolist()) == [[0, 1], [0, 1]]
    assert text.count("max seeds (2) reached") == 2
    grid = results.read_grid(options.storage, "adaptive")
    assert len(grid["replication"]) == 3 and len(grid["cells"]) == 4
    report = (Path(options.storage) / "reports" / "adaptive" / "report.html").read_text()
    assert "2 seed(s)" in report
    write(3)
    status, text = cli("adaptive", "--storage", options.storage, "--tracking-uri", options.tracking_uri)
    assert status == 0, text
    table = results.load("adaptive", options.storage)
    assert table.groupby("config_hash").ngroups == 6  # seed 2 in each cell; no seed run twice
    assert sorted(set(table["seed"])) == [0, 1, 2]
    assert text.count("max seeds (3) reached") == 2
