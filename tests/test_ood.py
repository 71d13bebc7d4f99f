"""OOD detection: the measures against hand-computed values, the OOD sets, the rotation score on a
real (short) training run, and an OOD + label-noise study end to end (local Ray, sqlite MLflow,
real Parquet files)."""
from __future__ import annotations

import datetime as dt
import io
import json
import math

import numpy as np
import pytest
import torch

from orchestrator import results, metrics as metrics_mod
from orchestrator.report.build import build_report
from orchestrator.report.ood import ood_table
from orchestrator.report.statistics import OOD_EVAL_COLUMNS, aggregate, prepare
from orchestrator.results import ResultsError
from trainables import ood
from trainables.config import ConfigError, resolve
from trainables.data import DatasetUnavailable, dataset_info

from tests.rows import result_row

FASHION = dataset_info("fashion_mnist")


# ---------------------------------------------------------------------------------------------
# measures


def test_measures_match_hand_computed_values():
    pos, neg = [0.9, 0.8, 0.4], [0.7, 0.3]
    # 5 of the 6 (pos, neg) pairs are ordered correctly (0.4 < 0.7)
    assert ood.auroc(pos, neg) == pytest.approx(5 / 6)
    # descending: 0.9+ 0.8+ 0.7- 0.4+ 0.3-: precision 1, 1, 3/4 at recall 1/3, 2/3, 1
    assert ood.aupr(pos, neg) == pytest.approx((1 + 1 + 3 / 4) / 3)
    # 95% of 3 positives needs all 3: threshold 0.4 accepts 0.7 too -> FPR 1/2
    assert ood.fpr_at_tpr(pos, neg) == pytest.approx(0.5)
    assert ood.fpr_at_tpr(pos, neg, level=0.6) == pytest.approx(0.0)  # 2 of 3 at threshold 0.8


def test_measures_handle_ties():
    pos, neg = [1, 1, 0], [1, 0, 0, 0]
    # 12 pairs: 6 wins (1 vs 0), 2 ties (1 vs 1) and 3 ties (0 vs 0) count one half each
    assert ood.auroc(pos, neg) == pytest.approx((6 + 0.5 * 5) / 12)
    # tied scores form one threshold: (tp, fp) = (2, 1) at score 1, then (3, 4) at score 0
    assert ood.aupr(pos, neg) == pytest.approx((2 / 3) * (2 / 3) + (1 / 3) * (3 / 7))
    assert ood.fpr_at_tpr(pos, neg) == pytest.approx(1.0)
    assert ood.fpr_at_tpr(pos, neg, level=0.6) == pytest.approx(0.25)
    # all scores equal: chance AUROC, precision = base rate
    assert ood.auroc([2, 2], [2, 2, 2]) == pytest.approx(0.5)
    assert ood.aupr([2, 2], [2, 2, 2]) == pytest.approx(0.4)
    assert ood.fpr_at_tpr([2, 2], [2, 2, 2]) == pytest.approx(1.0)


def test_perfect_and_reversed_separation():
    assert ood.auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert ood.aupr([3, 4, 5], [0, 1, 2]) == 1.0
    assert ood.fpr_at_tpr([3, 4, 5], [0, 1, 2]) == 0.0
    assert ood.auroc([0, 1, 2], [3, 4, 5]) == 0.0
    assert ood.fpr_at_tpr([0, 1, 2], [3, 4, 5]) == 1.0


def test_detection_measures_take_anomaly_scores_with_in_distribution_positive():
    in_anomaly, out_anomaly = [-0.9, -0.8, -0.4], [-0.7, -0.3]  # the first test, negated
    m = ood.detection_measures(in_anomaly, out_anomaly)
    assert m == pytest.approx({"auroc": 5 / 6, "aupr": 11 / 12, "fpr95": 0.5})
    # AUPR depends on which class is positive: OOD-as-positive ("AUPR-Out") differs here
    assert ood.aupr([-0.7, -0.3], [-0.9, -0.8, -0.4]) != pytest.approx(m["aupr"])
    with pytest.raises(ValueError, match="finite"):
        ood.detection_measures([0.1, float("nan")], [0.2])
    with pytest.raises(ValueError, match="at least one"):
        ood.auroc([], [1.0])


def test_measures_agree_with_sklearn_on_random_tied_scores():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_pos, n_neg = rng.integers(1, 40, 2)
        pos, neg = rng.integers(0, 6, n_pos).astype(float), rng.integers(-1, 5, n_neg).astype(float)
        y, s = np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg]
        assert ood.auroc(pos, neg) == pytest.approx(metrics.roc_auc_score(y, s))
        assert ood.aupr(pos, neg) == pytest.approx(metrics.average_precision_score(y, s))
        fpr, tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
        assert ood.fpr_at_tpr(pos, neg) == pytest.approx(fpr[np.argmax(tpr >= 0.95 - 1e-12)])


# ---------------------------------------------------------------------------------------------
# OOD sets and config


def test_ood_sets_shapes_ranges_and_determinism():
    cifar = dataset_info("cifar10")
    for name in ("gaussian", "rademacher", "blobs"):
        x = ood.ood_images(name, 16, FASHION, seed=3)
        assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.equal(x, ood.ood_images(name, 16, FASHION, seed=3))
        assert not torch.equal(x, ood.ood_images(name, 16, FASHION, seed=4))
        assert ood.ood_images(name, 4, cifar).shape == (4, 3, 32, 32)
    assert set(ood.ood_images("rademacher", 8, FASHION).unique().tolist()) == {0.0, 1.0}
    blobs = ood.ood_images("blobs", 8, FASHION)
    assert ((blobs == 0) | (blobs >= 0.75)).all() and (blobs > 0).any() and (blobs == 0).any()
    gauss = ood.ood_images("gaussian", 64, FASHION)
    assert float(gauss.mean()) == pytest.approx(0.5, abs=0.01)


def test_mnist_ood_set_fails_with_a_one_line_message_when_absent(tmp_path):
    with pytest.raises(DatasetUnavailable) as err:
        ood.ood_images("mnist", 10, FASHION, data_dir=str(tmp_path))
    message = str(err.value)
    assert "OOD set 'mnist' unavailable" in message and "ood_sets" in message and str(tmp_path) in message
    assert "\n" not in message


def test_mnist_ood_set_reads_idx_files_when_present(tmp_path):
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">4B3I", 0, 0, 8, 3, 20, 28, 28) + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">4BI", 0, 0, 8, 1, 20) + bytes(range(10)) * 2)
    x = ood.ood_images("mnist", 8, FASHION, data_dir=str(tmp_path))
    assert x.shape == (8, 1, 28, 28) and float(x.max()) <= 1.0
    assert ood.ood_images("mnist", 8, dataset_info("cifar10"), data_dir=str(tmp_path)).shape == (8, 3, 32, 32)


def test_ood_config_keys():
    full = resolve({"ood_sets": ["gaussian", "gaussian", "blobs"]})
    assert full["ood_sets"] == ["gaussian", "blobs"] and full["ood_scores"] == ["msp", "rotation"]
    assert resolve({})["ood_sets"] == []
    with pytest.raises(ConfigError, match="unknown ood_sets 'gausian'.*did you mean gaussian"):
        resolve({"ood_sets": ["gausian"]})
    with pytest.raises(ConfigError, match="rotation head.*ood_scores: \\[msp\\]"):
        resolve({"ood_sets": ["gaussian"], "ssl_task": "none"})
    assert resolve({"ood_sets": ["gaussian"], "ssl_task": "none", "ood_scores": ["msp"]})["ood_scores"] == ["msp"]
    with pytest.raises(ConfigError, match="training dataset itself"):
        resolve({"dataset": "mnist", "ood_sets": ["mnist"]})


# ---------------------------------------------------------------------------------------------
# results schema, tracking names, report


FINISHED = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)


def _rows(h="h0", seed=0, lam=0.5, noise=0.0, auroc=0.9, ood_sets=("gaussian", "blobs")):
    cfg = {"ssl_weight": lam, "eps_train": 0.0, "seed": seed, "label_noise": noise, "ood_sets": list(ood_sets)}
    clean = 0.8 - noise / 2 + 0.01 * seed

    def row(**columns):
        return result_row(cfg, config_hash=h, trial_id=f"t{h}", finished_at=FINISHED, clean_acc=clean, **columns)

    rows = [row(eps_test=0.0, attack="none", robust_acc=clean)]
    for s in ood_sets:
        for score, bonus in (("msp", 0.0), ("rotation", 0.05 * lam)):
            for measure, value in (("auroc", auroc + bonus + 0.01 * seed), ("aupr", 0.8), ("fpr95", 0.3)):
                rows.append(row(ood_set=s, score=score, measure=measure, value=value))
    return rows


def test_ood_rows_round_trip_and_are_validated(tmp_path):
    storage = str(tmp_path)
    results.write_trial(storage, "s", "h0", _rows())
    df = results.load("s", storage)
    assert len(df) == 1 + 2 * 2 * 3
    assert not df.duplicated(list(results.KEY_COLUMNS)).any()
    measures = df[df["ood_set"].notna()]
    assert measures["robust_acc"].isna().all() and measures["norm"].isna().all()
    assert set(measures["measure"]) == {"auroc", "aupr", "fpr95"}
    assert (df["label_noise"] == 0.0).all()
    rows = _rows()
    with pytest.raises(ResultsError, match="duplicate"):
        results.write_trial(storage, "s", "h1", [dict(r, config_hash="h1") for r in rows + rows[-1:]])
    with pytest.raises(ResultsError, match="needs 'value'"):
        results.write_trial(storage, "s", "h0", [dict(rows[1], value=None)])
    with pytest.raises(ResultsError, match="needs 'measure'"):
        results.write_trial(storage, "s", "h0", [dict(rows[1], measure=None)])
    with pytest.raises(ResultsError, match="'robust_acc'"):  # only measure rows may leave it empty
        results.write_trial(storage, "s", "h0", [dict(rows[0], robust_acc=None)])


def test_files_written_before_the_new_columns_still_load(tmp_path):
    import pyarrow.parquet as pq

    results.write_trial(str(tmp_path), "s", "h0", _rows(ood_sets=()))
    path = f"{tmp_path}/results/s/h0.parquet"
    old = pq.read_table(path).drop_columns(["label_noise", "ood_set", "score", "measure", "value"])
    pq.write_table(old, path)
    df = results.load("s", str(tmp_path))
    assert len(df) == 1 and df["ood_set"].isna().all() and df["label_noise"].isna().all()


def test_tracking_names_for_ood_rows():
    assert metrics_mod.ood_metric_name("gaussian", "rotation", "auroc") == "ood/gaussian/rotation/auroc"
    with pytest.raises(ValueError):
        metrics_mod.ood_metric_name("gaussian", None, "auroc")
    metrics = metrics_mod.scalar_metrics(_rows())
    assert metrics["ood/blobs/rotation/auroc"] == pytest.approx(0.925)
    assert metrics["robust_acc/linf/0"] == pytest.approx(0.8) and metrics["clean_acc"] == pytest.approx(0.8)

    from orchestrator.metrics import scalar_metrics as result_metrics, summary_metrics

    records = [{k: r.get(k) for k in ("norm", "eps_test", "corruption", "severity", "robust_acc", "clean_acc",
                                      "ood_set", "score", "measure", "value")} for r in _rows()]
    assert result_metrics(records)["ood/gaussian/msp/fpr95"] == 0.3
    config = {"norm_train": "linf", "eps_train": 0.0}
    assert summary_metrics(config, records[::-1]) == summary_metrics(config, records[:1])  # OOD rows ignored


def test_report_gets_ood_and_label_noise_tables_and_figures(tmp_path):
    storage = str(tmp_path)
    n = 0
    for seed in (0, 1):
        for lam in (0.0, 0.5):
            for noise in (0.0, 0.4):
                results.write_trial(storage, "s", f"h{n}", [dict(r, study="s") for r in _rows(f"h{n}", seed, lam, noise)])
                n += 1
    files = build_report("s", storage, out_dir=str(tmp_path / "out"))
    names = {p.rsplit("/", 1)[-1] for p in files.figures + files.tables}
    assert {"ood_auroc.png", "ood.md", "ood.csv", "label_noise.png", "label_noise.md", "label_noise.csv"} <= names
    data = prepare(results.load("s", storage))
    assert data.adv["norm"].notna().all() and len(data.adv) == 8  # OOD rows are not robustness results
    keys = data.train_keys + list(OOD_EVAL_COLUMNS)
    table = ood_table(aggregate(data.ood, keys, value="value"), data.train_keys)
    rot = table[(table["score"] == "rotation") & (table["ssl_weight"] == 0.5) & (table["ood_set"] == "gaussian")]
    assert len(rot) == 2  # one per label-noise value
    assert rot["auroc_mean"].tolist() == pytest.approx([0.9 + 0.025 + 0.005] * 2)
    assert (rot["n_seeds"] == 2).all() and rot["auroc_ci95"].notna().all()
    md = (tmp_path / "out" / "ood.md").read_text()
    assert "AUROC" in md and "±" in md and "rotation" in md
    noise = (tmp_path / "out" / "label_noise.csv").read_text()
    assert "delta_vs_p0" in noise
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Out-of-distribution detection" in html and "Label corruption" in html
    import pandas as pd

    assert pd.read_csv(tmp_path / "out" / "aggregate.csv")["norm"].notna().all()


# ---------------------------------------------------------------------------------------------
# a short real run


@pytest.mark.slow
def test_rotation_score_separates_gaussian_noise_from_test_images():
    from trainables.train import Trainer

    # ~3 s of CPU; the rotation AUROC is 0.96-0.97 for seeds 0-2 at this size
    trainer = Trainer(dict(train_subset=384, test_subset=150, epochs=2, batch_size=64, eps_train=0.0,
                           ssl_weight=0.5, rotations="one", eval_eps_linf=[0.0], ood_sets=["gaussian"],
                           ood_examples=150), device="cpu")
    list(trainer.epochs())
    records = trainer.evaluate()
    clean = [r for r in records if r["ood_set"] is None]
    assert len(clean) == 1 and clean[0]["clean_acc"] > 0.5
    got = {(r["score"], r["measure"]): r["value"] for r in records if r["ood_set"] == "gaussian"}
    assert set(got) == {(s, m) for s in ("msp", "rotation") for m in ("auroc", "aupr", "fpr95")}
    assert got["rotation", "auroc"] > 0.9, got
    assert got["rotation", "fpr95"] < 0.5, got
    assert all(math.isfinite(v) for v in got.values())


# ---------------------------------------------------------------------------------------------
# end to end through the study runner (fixture pattern of tests/test_study.py)

TINY = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=128, test_subset=32, epochs=1, batch_size=64,
    ssl_task="rotation", rotations="one", ssl_weight=0.5, eps_train=0.0, eval_eps_linf=[0.0],
    ood_sets=["gaussian", "blobs"], ood_scores=["msp", "rotation"], ood_examples=32,
)



def test_ood_and_label_noise_study_end_to_end(ray_cluster, workspace):
    from mlflow.tracking import MlflowClient

    from orchestrator.runner import run_study
    from orchestrator.spec import load_study

    studies, options = workspace
    body = {"description": "ood + label noise", "seeds": [0], "fixed": TINY,
            "factors": {"label_noise": [0.0, 0.25]}, "resources": {"cpu": 1, "gpu": 0}}
    (studies / "oodtiny.yaml").write_text(json.dumps(body))
    spec = load_study("oodtiny")
    out = io.StringIO()
    outcome = run_study(spec, options, out=out)
    assert outcome.ran == 2 and not outcome.failed
    assert "OOD detection AUROC" in out.getvalue() and "gaussian/rotation" in out.getvalue()

    table = results.load("oodtiny", options.storage)
    assert not table.duplicated(list(results.KEY_COLUMNS)).any()
    measures = table[table["ood_set"].notna()]
    assert len(measures) == 2 * 2 * 2 * 3  # trials × sets × scores × measures
    assert measures["value"].between(0, 1).all() and measures["robust_acc"].isna().all()
    assert sorted(table.groupby("config_hash")["label_noise"].first()) == [0.0, 0.25]
    assert len(table[table["ood_set"].isna()]) == 2  # the clean-accuracy row of each trial

    client = MlflowClient(options.tracking_uri)
    experiment = client.get_experiment_by_name("oodtiny")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        chash = child.data.tags["sslrobust.config_hash"]
        row = measures[(measures.config_hash == chash) & (measures.ood_set == "gaussian")
                       & (measures.score == "rotation") & (measures.measure == "auroc")]
        assert child.data.metrics["ood/gaussian/rotation/auroc"] == pytest.approx(row["value"].iloc[0])
        assert "ood/blobs/msp/fpr95" in child.data.metrics
        assert "clean_acc" in child.data.metrics and "robust_acc/linf/0" in child.data.metrics
        if float(child.data.params["label_noise"]) > 0:
            assert child.data.metrics["label_noise_flipped"] == 32  # 0.25 × 128
    report_dir = options_storage(options) / "reports" / "oodtiny"
    assert (report_dir / "ood.md").is_file() and (report_dir / "ood_auroc.png").is_file()
    assert (report_dir / "label_noise.csv").is_file()


def options_storage(options):
    from pathlib import Path

    return Path(options.storage)
