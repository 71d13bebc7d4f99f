"""Configurations that define the same experiment are one cell (trainables.config.canonical): the
grid runs it once and the report and end-of-run table show it under every name."""
from __future__ import annotations

import json

from orchestrator import results
from orchestrator.spec import config_hash, load_study
from orchestrator.summary import grid_aliases, robustness_table
from trainables.config import canonical

from tests.rows import result_row


def test_moot_settings_hash_alike_and_others_do_not():
    base = dict(ssl_task="rotation", eps_train=0.1)
    same = config_hash({**base, "ssl_weight": 0.0, "attack_variant": "ce"})
    assert same == config_hash({**base, "ssl_weight": 0.0, "attack_variant": "joint"})  # no SSL: both CE
    assert config_hash({**base, "ssl_weight": 0.5, "attack_variant": "ce"}) != config_hash(
        {**base, "ssl_weight": 0.5, "attack_variant": "joint"})
    # a zero-weight SSL batch still goes through the network under 'ssl': not the same experiment
    assert config_hash({**base, "ssl_weight": 0.0, "attack_variant": "ssl"}) != same
    standard = dict(ssl_task="rotation", ssl_weight=0.5, eps_train=0.0)
    hashes = {config_hash({**standard, "attack_variant": v, "norm_train": n, "train_attack_steps": k})
              for v in ("ce", "joint", "ssl", "repr") for n in ("linf", "l2") for k in (1, 7)}
    assert len(hashes) == 1  # ε_train = 0 trains without an attack: its settings are moot
    # toward the defaults, so a configuration that was already canonical keeps its hash
    assert canonical({**base, "ssl_weight": 0.0, "attack_variant": "ce"})["attack_variant"] == "joint"


def _rows(chash, config, robust, study="g"):
    return [result_row(config, study=study, config_hash=chash, eps_test=eps, attack="pgd", attack_steps=3,
                       step_size=0.1, robust_acc=acc) for eps, acc in ((0.0, 0.8), (0.1, robust))]


def test_the_grid_runs_an_experiment_once_and_shows_it_under_every_name(tmp_path, monkeypatch):
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "g.yaml").write_text(json.dumps({
        "description": "aliases", "factors": {"ssl_weight": [0.0, 0.5], "attack_variant": ["ce", "joint"]},
        "seeds": [0], "fixed": {"ssl_task": "rotation", "eps_train": 0.1}}))
    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(studies))
    spec = load_study("g")
    trials = spec.trials()
    assert len(trials) == 3  # λ = 0 under ce and joint is one trial
    (shared,) = [t for t in trials if t.aliases]
    assert shared.config["ssl_weight"] == 0.0 and [a["attack_variant"] for a in shared.aliases] == ["joint"]
    storage = str(tmp_path / "runs")
    for i, t in enumerate(trials):
        results.write_trial(storage, "g", t.config_hash, _rows(t.config_hash, t.config, 0.5 + i / 10))
    table = results.load("g", storage)
    assert len(table) == 6  # stored once
    shown = results.with_aliases(table, grid_aliases(trials))
    assert len(shown) == 8
    by_variant = shown[(shown.ssl_weight == 0.0) & (shown.eps_test == 0.1)].set_index("attack_variant")["robust_acc"]
    assert by_variant["ce"] == by_variant["joint"]
    text = robustness_table(spec, shown)
    lines = [line.split() for line in text.splitlines()[2:-1]]  # the last line says which interval
    assert sorted((line[0], line[1]) for line in lines) == [("0.0", "ce"), ("0.0", "joint"), ("0.5", "ce"), ("0.5", "joint")]


def test_paired_differences_to_lambda_zero_say_which_exclude_zero(tmp_path, monkeypatch):
    from orchestrator.summary import paired_difference_text

    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "d.yaml").write_text(json.dumps({
        "description": "differences", "factors": {"ssl_weight": [0.0, 0.5, 2.0]}, "seeds": [0, 1, 2],
        "fixed": {"ssl_task": "rotation", "eps_train": 0.1}}))
    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(studies))
    spec = load_study("d")
    storage = str(tmp_path / "runs")
    noise = {0: 0.01, 1: -0.02, 2: 0.015}  # shared by the cells of a seed: pairing removes it
    for t in spec.trials():
        lam, seed = t.config["ssl_weight"], t.factors["seed"]
        drop = 0.04 if lam == 2.0 else 0.001 * (seed - 1)  # λ = 2 really lower; λ = 0.5 only noise
        results.write_trial(storage, "d", t.config_hash,
                            _rows(t.config_hash, t.config, 0.5 + noise[seed] - drop, "d"))
    text = paired_difference_text(spec, results.load("d", storage))
    assert "λ=2 vs 0 at ε=0.1: lower, -0.040 [" in text
    assert "λ=0.5 vs 0 at ε=0.1" not in text  # its interval straddles zero
