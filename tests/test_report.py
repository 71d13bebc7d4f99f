"""orchestrator.report on real Parquet files with known effects (no mocks)."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator import results
from orchestrator.report.build import build_report
from orchestrator.report.cli import main as report_main
from orchestrator.report.labels import NO_BASELINE, ONE_SEED
from orchestrator.report.robustness import (
    best_variant_table, clean_vs_robust_table, delta_table, lambda_effect_table, plot_clean_vs_robust,
    plot_delta_vs_lambda0, plot_robust_vs_eps, pretrain_vs_scratch_table,
)
from orchestrator.report.statistics import aggregate, diff_ci, mean_ci, prepare

from tests.rows import result_row

ROOT = Path(__file__).resolve().parents[1]
EPS = (0.0, 0.05, 0.1, 0.15, 0.2)
EPS_TRAIN = 0.1
LAMBDAS = (0.0, 0.5, 1.0, 2.0)
FINISHED = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)


def base_acc(eps: float) -> float:
    return 0.9 - 1.5 * eps


def effect(lam: float, eps: float, eps_train: float = EPS_TRAIN) -> float:
    """The planted SSL effect: +0.1·λ below ε_train, −0.2·λ above, 0 at ε_train."""
    if math.isclose(eps, eps_train):
        return 0.0
    return 0.1 * lam if eps < eps_train else -0.2 * lam


def noise(*key) -> float:
    """Small deterministic noise per (config, seed, eps)."""
    seed = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    return float(np.random.default_rng(seed).normal(0, 0.01))


def write_cell(storage, study, seed, lam, variant="joint", init="scratch", eps=EPS, eps_train=EPS_TRAIN,
               corruptions=(), extra_config=None, ssl_task="rotation"):
    cfg = {
        "dataset": "fashion_mnist", "arch": "small_cnn", "ssl_task": ssl_task, "ssl_weight": lam,
        "attack_variant": variant, "init": init, "norm_train": "linf", "eps_train": eps_train,
        "train_attack_steps": 3, "rotations": "one", "seed": seed, "epochs": 2, **(extra_config or {}),
    }
    text = json.dumps(cfg, sort_keys=True)
    lam = 0.0 if ssl_task == "none" else lam  # no SSL task: no SSL effect, whatever ssl_weight says
    h = hashlib.sha256(text.encode()).hexdigest()[:12]
    common = dict(study=study, trial_id=f"t_{h}", config_hash=h, n_examples=1000, node_id="n1",
                  clean_acc=0.95 - 0.01 * lam + noise(h, "clean"), finished_at=FINISHED, git_sha="abc1234")
    rows = [
        result_row(cfg, **common, eps_test=e, attack="pgd", step_size=0.25 * e,
                   robust_acc=base_acc(e) + effect(lam, e, eps_train) + noise(h, e))
        for e in eps
    ]
    rows += [
        result_row(cfg, **common, corruption=c, severity=s,
                   robust_acc=0.8 - 0.05 * s - 0.01 * lam + noise(h, c, s))
        for c in corruptions for s in (1, 3, 5)
    ]
    results.write_trial(storage, study, h, rows)
    return h, cfg


@pytest.fixture(scope="module")
def full_study(tmp_path_factory):
    """3 seeds × 4 λ × 2 variants, corruptions on: the planted effect must come back out."""
    storage = str(tmp_path_factory.mktemp("runs"))
    expected = {}
    for seed in range(3):
        for lam in LAMBDAS:
            for variant in ("joint", "ce"):
                h, cfg = write_cell(storage, "known", seed, lam, variant, corruptions=("contrast", "gaussian_noise"))
                expected[h] = cfg
    return storage, expected


def test_mean_ci_matches_scipy():
    x = [0.1, 0.3, 0.25, 0.2]
    m, ci, n = mean_ci(x)
    assert n == 4 and m == pytest.approx(np.mean(x))
    assert ci == pytest.approx(stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2)
    m, ci, n = mean_ci([0.4])
    assert (m, n) == (0.4, 1) and math.isnan(ci)
    m, ci, n, paired = diff_ci({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 3.0, 3: 9.0})
    assert paired and n == 3 and m == pytest.approx(np.mean([0.5, 1.0, 1.0]))


def test_summary_and_statistics_load_without_matplotlib():
    """The end-of-run tables need intervals, not plotting: matplotlib stays out of their import."""
    code = ("import sys, orchestrator.summary, orchestrator.report.statistics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_lambda_effect_recovers_planted_effect(full_study):
    storage, _ = full_study
    data = prepare(results.load("known", storage))
    table = lambda_effect_table(data)
    assert set(table["ssl_weight"]) == {0.5, 1.0, 2.0}
    assert len(table) == 3 * 2  # 3 λ > 0 × 2 variants
    raw = results.load("known", storage)
    for _, row in table.iterrows():
        lam = row["ssl_weight"]
        assert row["n_seeds"] == 3 and row["paired"]
        assert row["n_eps_below"] == 2 and row["n_eps_at"] == 1 and row["n_eps_above"] == 2
        # the planted effect lies within the 95% interval (noise sd 0.01, so the interval is tight)
        assert row["low_below"] <= 0.1 * lam <= row["high_below"]
        assert row["low_above"] <= -0.2 * lam <= row["high_above"]
        assert row["low_at"] <= 0 <= row["high_at"]
        assert row["high_below"] - row["low_below"] < 0.1 and row["high_above"] - row["low_above"] < 0.1
        assert row["claim"] == "consistent"
        # rows without per-example correctness: Student's t over the seeds' paired differences
        assert {row["interval_below"], row["interval_at"], row["interval_above"]} == {"seeds"}
        # CI by hand: per seed, average (λ − λ=0) over the ε_test below ε_train, then Student's t
        per_seed = []
        for seed in range(3):
            sel = raw[(raw["attack_variant"] == row["attack_variant"]) & (raw["seed"] == seed)
                      & raw["corruption"].isna() & (raw["eps_test"] < EPS_TRAIN)]
            a = sel[sel["ssl_weight"] == lam].sort_values("eps_test")["robust_acc"].to_numpy()
            b = sel[sel["ssl_weight"] == 0].sort_values("eps_test")["robust_acc"].to_numpy()
            per_seed.append(np.mean(a - b))
        assert row["delta_below"] == pytest.approx(np.mean(per_seed))
        hand_ci = stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / math.sqrt(3)
        assert row["low_below"] == pytest.approx(np.mean(per_seed) - hand_ci)
        assert row["high_below"] == pytest.approx(np.mean(per_seed) + hand_ci)


def test_robust_vs_eps_figure_has_one_curve_per_lambda(full_study):
    storage, _ = full_study
    data = prepare(results.load("known", storage))
    agg = aggregate(data.adv, data.train_keys + ["norm", "eps_test"])
    fig = plot_robust_vs_eps(agg, data.train_keys)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 2  # joint and ce (one init, one norm, one ε_train)
    for ax in panels:
        curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert len(curves) == len(LAMBDAS)
        assert all("3 seeds" in ln.get_label() for ln in curves)
        assert len(ax.collections) == len(LAMBDAS)  # one CI band per curve
        vlines = [ln for ln in ax.get_lines() if ln.get_label() == "_eps_train"]
        assert len(vlines) == 1 and vlines[0].get_xdata()[0] == EPS_TRAIN
    delta = delta_table(data)[0]
    fig2 = plot_delta_vs_lambda0(delta, agg, data.train_keys)
    for ax in [ax for ax in fig2.axes if ax.get_lines()]:
        assert len([ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]) == len(LAMBDAS) - 1


def test_best_variant_and_pretrain_tables(tmp_path):
    storage = str(tmp_path)
    for seed in range(2):
        for init in ("scratch", "ssl_pretrained"):
            write_cell(storage, "inits", seed, 0.5, "joint", init, eps=(0.0, 0.1))
    data = prepare(results.load("inits", storage))
    pvs = pretrain_vs_scratch_table(data)
    assert len(pvs) == 2 and pvs["paired"].all() and (pvs["n_seeds"] == 2).all()
    best = best_variant_table(aggregate(data.adv, data.train_keys + ["norm", "eps_test"]), data.train_keys)
    assert best.empty  # one variant only


def test_build_report_full(full_study, tmp_path):
    storage, expected = full_study
    files = build_report("known", storage, out_dir=str(tmp_path / "rep"), spec_text="name: known\nseeds: 3\n",
                                expected_hashes=expected)
    page = Path(files.html).read_text()
    assert page.count("data:image/png;base64,") == 4  # all four figures embedded
    for name in ("robust_vs_eps", "delta_vs_lambda0", "corruptions", "clean_vs_robust"):
        assert str(tmp_path / "rep" / f"{name}.png") in files.figures
        assert str(tmp_path / "rep" / f"{name}.svg") in files.figures
        assert os.path.getsize(tmp_path / "rep" / f"{name}.png") > 1000
    for name in ("lambda_effect", "best_variant"):
        assert str(tmp_path / "rep" / f"{name}.csv") in files.tables
        assert str(tmp_path / "rep" / f"{name}.md") in files.tables
    assert "seeds: 3" in page and "All 24 expected cells have results" in page
    for pkg in ("pyarrow", "pandas", "mlflow", "torch", "ray"):
        assert f"<th>{pkg}</th>" in page
    csv = pd.read_csv(tmp_path / "rep" / "lambda_effect.csv")
    assert len(csv) == 6
    best = pd.read_csv(tmp_path / "rep" / "best_variant.csv")
    assert len(best) == len(LAMBDAS) * len(EPS)  # every λ × ε_test has both variants
    md = (tmp_path / "rep" / "lambda_effect.md").read_text()
    assert md.count("\n|") >= 7


def test_partial_one_seed_study(tmp_path):
    storage = str(tmp_path / "runs")
    expected = {}
    # one seed; λ=0.5 has a λ=0 baseline in 'joint', but 'ce' only has λ=1 (no baseline)
    for lam, variant in ((0.0, "joint"), (0.5, "joint"), (1.0, "ce")):
        h, cfg = write_cell(storage, "part", 0, lam, variant)
        expected[h] = cfg
    # cells the study expects but that never ran
    for lam in (2.0, 4.0):
        cfg = dict(expected[h], ssl_weight=lam)
        expected[f"missing{int(lam)}"] = cfg
    files = build_report("part", storage, expected_hashes=expected)
    assert files.html == str(Path(storage) / "reports" / "part" / "report.html")
    page = Path(files.html).read_text()
    assert "1 seed" in page and "no confidence band" in page
    assert NO_BASELINE in page
    assert "2 of 5 expected cells are missing" in page
    assert "missing2" in page and "missing4" in page
    data = prepare(results.load("part", storage))
    agg = aggregate(data.adv, data.train_keys + ["norm", "eps_test"])
    fig = plot_robust_vs_eps(agg, data.train_keys)
    labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert len(labels) == 3 and all(ONE_SEED in lb for lb in labels)
    assert all(len(ax.collections) == 0 for ax in fig.axes)  # no bands with one seed
    effect_table = lambda_effect_table(data)
    assert set(effect_table["baseline"]) == {"λ=0", NO_BASELINE}
    assert effect_table["low_below"].isna().all() and effect_table["high_below"].isna().all()


def test_swept_config_key_is_a_factor_not_a_seed(tmp_path):
    storage = str(tmp_path)
    for epochs in (1, 2):
        for lam in (0.0, 1.0):
            write_cell(storage, "ep", 0, lam, extra_config={"epochs": epochs})
    data = prepare(results.load("ep", storage))
    assert data.extras == ["epochs"]
    agg = aggregate(data.adv, data.train_keys + ["norm", "eps_test"])
    assert (agg["n_seeds"] == 1).all()


def test_no_ssl_task_counts_as_lambda_zero(tmp_path):
    storage = str(tmp_path)
    for seed in range(2):
        write_cell(storage, "nossl", seed, 0.5, variant="ce", ssl_task="none")  # ssl_weight default ignored
        write_cell(storage, "nossl", seed, 1.0, variant="ce")
    data = prepare(results.load("nossl", storage))
    table = lambda_effect_table(data)
    assert len(table) == 1 and table["baseline"].iloc[0] == "no SSL task"
    assert table["delta_above"].iloc[0] == pytest.approx(-0.2, abs=0.05)


@pytest.mark.slow
def test_cli_missing_study_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.report", "nosuchstudy", "--storage", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuchstudy" in lines[0] and "Traceback" not in proc.stderr
    assert report_main(["bad/name", "--storage", str(tmp_path)]) == 2


def test_cli_success_prints_path(full_study, tmp_path, capsys):
    storage, _ = full_study
    assert report_main(["known", "--storage", storage, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "o" / "report.html") and os.path.isfile(out)


def test_bookkeeping_keys_in_config_json_do_not_split_seeds(tmp_path):
    storage = str(tmp_path)
    for seed in range(2):
        write_cell(storage, "bk", seed, 0.5, extra_config={"launched_by": f"user{seed}"})  # not a config setting
    data = prepare(results.load("bk", storage))
    assert data.extras == []
    agg = aggregate(data.adv, data.train_keys + ["norm", "eps_test"])
    assert (agg["n_seeds"] == 2).all()


def test_clean_vs_robust_uses_nearest_grid_point_above_eps_train(tmp_path):
    storage = str(tmp_path)
    for seed in range(2):
        write_cell(storage, "grid", seed, 0.5, eps=(0.0, 0.05, 0.15, 0.2), eps_train=0.1)
        write_cell(storage, "grid", seed, 0.5, eps=(0.0, 0.05, 0.15, 0.2), eps_train=0.05, variant="ce")
    table = clean_vs_robust_table(prepare(results.load("grid", storage)))
    chosen = dict(zip(table["eps_train"], table["eps_test"]))
    assert chosen == {0.1: 0.15, 0.05: 0.05}
    fig = plot_clean_vs_robust(table, prepare(results.load("grid", storage)).train_keys)
    assert any("nearest grid point" in ax.get_xlabel() for ax in fig.axes)


def test_report_names_the_attack_breaks_it_down_and_warns_about_masking(tmp_path):
    storage = str(tmp_path / "runs")
    hashes = []
    for seed in (0, 1):
        for lam in (0.0, 0.5):
            h, _ = write_cell(storage, "aa", seed, lam, eps=(0.0, 0.05, 0.1))
            frame = results.load("aa", storage)
            rows = frame[frame["config_hash"] == h].astype(object).where(frame.notna(), None).to_dict("records")
            for r in rows:
                if r["eps_test"]:
                    r.update(attack="autoattack", fooled_by=json.dumps({"apgd_ce": 30, "apgd_t": 2, "fab_t": 0, "square": 1}),
                             masking_flags="zero_gradient" if (seed, lam) == (1, 0.5) else "")
                else:
                    r["masking_flags"] = "zero_gradient" if (seed, lam) == (1, 0.5) else ""
            results.write_trial(storage, "aa", h, rows)
            hashes.append(h)
    files = build_report("aa", storage)
    page = Path(files.html).read_text()
    assert "AutoAttack, standard version" in page  # every robustness caption names it
    assert page.count("Robust accuracy under AutoAttack") >= 3
    assert f"gradient-masking checks fired for trial {hashes[3]}" in page
    assert sum(f"checks fired for trial {h}" in page for h in hashes) == 1
    out = Path(files.html).parent
    breakdown = pd.read_csv(out / "attack_breakdown.csv")
    assert set(breakdown["fooled_by_apgd_ce"]) == {60}  # summed over the two seeds
    bench = pd.read_csv(out / "robustbench.csv")
    assert list(bench["eps"]) == [EPS_TRAIN, EPS_TRAIN] and bench["autoattack_acc"].notna().all()
    assert {"clean_acc", "autoattack_acc", "threat_model", "architecture"} <= set(bench.columns)
