"""Per-example correctness (`correct`, trainables.correct_bits) from the evaluation through the real
Parquet writer and reader, and the intervals over seeds and test examples that the end-of-run table
and the report build from it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import results
from orchestrator.spec import load_study
from trainables.correct_bits import pack_correct, unpack_correct

from tests.rows import result_row


def test_bits_round_trip_and_refuse_another_length():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 200, 1000):
        mask = rng.random(n) < 0.4
        data = pack_correct(torch.from_numpy(mask))
        assert len(data) == (n + 7) // 8
        assert np.array_equal(unpack_correct(data, n), mask)
    assert pack_correct(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], bool)) == bytes([0b1, 0b1])  # bit i of byte i // 8
    with pytest.raises(ValueError, match="expected 2"):
        unpack_correct(bytes(3), 9)
    with pytest.raises(ValueError, match="past the last example"):
        unpack_correct(bytes([0, 0b10]), 9)


@pytest.fixture(scope="module")
def study(tmp_path_factory, fmnist_standard_cnn, fmnist_adversarial_cnn, fmnist_test_batch):
    """A study of 2 λ × 2 seeds evaluated with the real PGD curve on 128 test images: λ = 0 is the
    session's standard CNN, λ = 1 its adversarially trained one (the seed changes the attack's
    random starts), written with the real results writer. Returns (spec, storage, masks) with
    masks[(config_hash, eps)] the still-robust mask the evaluation computed."""
    from orchestrator.trainable import StudyContext, trial_rows
    from trainables.evaluate import predictions, robust_accuracy_curve

    tmp = tmp_path_factory.mktemp("intervals")
    studies = tmp / "studies"
    studies.mkdir()
    (studies / "iv.yaml").write_text(json.dumps({
        "description": "intervals", "factors": {"ssl_weight": [0.0, 1.0]}, "seeds": [0, 1],
        "fixed": {"ssl_task": "rotation", "eps_train": 0.1}}))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(studies))
        spec = load_study("iv")
    models = {0.0: fmnist_standard_cnn, 1.0: fmnist_adversarial_cnn}
    x, y = (t[:128] for t in fmnist_test_batch)
    storage = str(tmp / "runs")
    context = StudyContext(study="iv", storage=storage, tracking_uri="", fixed={}, cpus_per_trial=1)
    masks = {}
    for trial in spec.trials():
        config = trial.config
        robust: dict = {}
        records = robust_accuracy_curve(models[config["ssl_weight"]], x, y, "linf", [0.0, 0.1], steps=5,
                                        seed=config["seed"], robust_masks=robust)
        robust[0.0] = predictions(models[config["ssl_weight"]], x) == y
        masks.update({(trial.config_hash, eps): m.numpy() for eps, m in robust.items()})
        results.write_trial(storage, "iv", trial.config_hash,
                            trial_rows(context, config, trial.config_hash, "t", records, "node", None))
    return spec, storage, masks


@pytest.mark.slow
def test_the_stored_bits_are_the_evaluations_per_example_correctness(study):
    spec, storage, masks = study
    table = results.load("iv", storage)
    assert len(table) == 4 * 2 and table["correct"].notna().all()
    for row in table.itertuples():
        stored = unpack_correct(row.correct, row.n_examples)
        assert np.array_equal(stored, masks[(row.config_hash, row.eps_test)])
        assert stored.sum() / row.n_examples == row.robust_acc


@pytest.mark.slow
def test_apgd_rows_carry_the_bits_too(fmnist_adversarial_cnn, fmnist_test_batch):
    from trainables.evaluate import robust_accuracy_curve

    x, y = (t[:64] for t in fmnist_test_batch)
    robust: dict = {}
    records = robust_accuracy_curve(fmnist_adversarial_cnn, x, y, "linf", [0.0, 0.1], attack="apgd", apgd_steps=5,
                                    target_classes=2, robust_masks=robust)
    assert np.array_equal(unpack_correct(records[1]["correct"], 64), robust[0.1].numpy())
    assert unpack_correct(records[1]["correct"], 64).mean() == records[1]["robust_acc"]


@pytest.mark.slow
def test_table_and_report_give_intervals_over_seeds_and_examples(study, tmp_path):
    from orchestrator.intervals import crossed_bootstrap, paired_difference
    from orchestrator.report.build import build_report
    from orchestrator.summary import paired_difference_text, robustness_table

    spec, storage, masks = study
    table = results.load("iv", storage)
    text = robustness_table(spec, table)
    assert "95% interval over seeds and test examples (two-way bootstrap" in text.splitlines()[-1]
    # the λ = 1 line at ε = 0.1 is the crossed bootstrap of its seeds × examples matrix
    adv = {t.factors["seed"]: masks[(t.config_hash, 0.1)] for t in spec.trials() if t.config["ssl_weight"] == 1.0}
    std = {t.factors["seed"]: masks[(t.config_hash, 0.1)] for t in spec.trials() if t.config["ssl_weight"] == 0.0}
    expected = crossed_bootstrap(np.stack([adv[0], adv[1]]).astype(float))
    line = next(line for line in text.splitlines() if line.split()[:2] == ["1.0", "2"])
    assert line.endswith(f"{expected.mean:.3f} [{expected.low:.3f}, {expected.high:.3f}]")
    assert expected.low < expected.mean < expected.high

    differences = paired_difference_text(spec, table)
    assert "paired over seeds and examples" in differences
    diff = paired_difference(adv, std)
    assert diff.excludes_zero() and diff.mean > 0  # adversarial training is more robust at ε_train
    assert f"λ=1 vs 0 at ε=0.1: higher, {diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]" in differences

    files = build_report("iv", storage, out_dir=str(tmp_path / "report"), table=table)
    page = open(files.html, encoding="utf-8").read()
    assert "Robust accuracy with intervals over seeds and test examples" in page
    assert "Paired difference to λ = 0 over seeds and test examples" in page
    md = (tmp_path / "report" / "difference_intervals.md").read_text(encoding="utf-8")
    assert f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]" in md
    # the λ-effect table gives the same interval and verdict at ε_train (= 0.1 here)
    effect = (tmp_path / "report" / "lambda_effect.md").read_text(encoding="utf-8")
    assert f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]" in effect and "at: higher" in effect
    assert "over seeds and test examples (two-way bootstrap), paired over seeds and examples" in effect


@pytest.mark.slow
def test_files_without_the_column_read_it_empty_and_fall_back_to_seeds(study, tmp_path):
    from orchestrator.summary import robustness_table

    spec, storage, _ = study
    old = tmp_path / "runs"
    folder = old / "results" / "iv"
    folder.mkdir(parents=True)
    for f in Path(results.study_dir(storage, "iv")).glob("*.parquet"):  # as written before the column existed
        pq.write_table(pq.read_table(f).drop_columns(["correct"]), folder / f.name)
    table = results.load("iv", str(old))
    assert len(table) == 8 and table["correct"].isna().all()
    text = robustness_table(spec, table)
    assert "95% t-interval over seeds (no per-example results" in text.splitlines()[-1]
    from orchestrator.report.robustness import lambda_effect_table
    from orchestrator.report.statistics import prepare

    effect = lambda_effect_table(prepare(table))
    assert list(effect["interval_at"]) == ["seeds"] and effect["low_at"].iloc[0] < effect["delta_at"].iloc[0]
    # a study half old, half new: the t-interval cells are marked
    mixed = results.load("iv", storage)
    mixed.loc[mixed["ssl_weight"] == 0.0, "correct"] = None
    legend = robustness_table(spec, mixed).splitlines()[-1]
    assert "two-way bootstrap" in legend and "†: 95% t-interval over seeds" in legend


def test_bits_that_disagree_with_the_row_are_refused():
    row = result_row(config_hash="h", n_examples=9, clean_acc=0.5, robust_acc=2 / 9)
    good = pack_correct(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], bool))
    assert results.validate_rows([{**row, "correct": good}]).column("correct")[0].as_py() == good
    with pytest.raises(results.ResultsError, match="2 of 9 examples correct, but robust_acc is 0.5"):
        results.validate_rows([{**row, "robust_acc": 0.5, "correct": good}])
    with pytest.raises(results.ResultsError, match="expected 2"):
        results.validate_rows([{**row, "correct": bytes(1)}])
    with pytest.raises(results.ResultsError, match="only for robustness rows"):
        results.validate_rows([{**row, "corruption": "fog", "severity": 1, "correct": good}])
