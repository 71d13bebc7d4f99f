"""Adaptive replication's decisions (orchestrator.replication) on constructed results, and the
spec syntax. The rounds with real trials are in tests/test_study.py."""
from __future__ import annotations

import json

import pytest

from orchestrator import results
from orchestrator.errors import UserError
from orchestrator.replication import decide, describe, seeds_with_results
from orchestrator.spec import cell_key, load_study

from test_canonical import _rows


def _study(tmp_path, monkeypatch, seeds, name="rep"):
    studies = tmp_path / "studies"
    studies.mkdir(exist_ok=True)
    (studies / f"{name}.yaml").write_text(json.dumps({
        "description": "replication", "factors": {"ssl_weight": [0.0, 0.5]}, "seeds": seeds,
        "fixed": {"ssl_task": "rotation", "eps_train": 0.1}}))
    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(studies))
    return load_study(name)


def test_only_cells_whose_interval_is_too_wide_get_another_seed(tmp_path, monkeypatch):
    spec = _study(tmp_path, monkeypatch, {"min": 3, "max": 5, "until_ci": 0.05})
    assert spec.seeds == [0, 1, 2] and spec.replication.max == 5 and "seed" in spec.varying()
    storage = str(tmp_path / "runs")
    spread = {0.0: [0.50, 0.51, 0.50], 0.5: [0.40, 0.60, 0.50]}  # λ = 0 agrees across seeds, λ = 0.5 does not
    for t in spec.trials():
        robust = spread[t.config["ssl_weight"]][t.factors["seed"]]
        results.write_trial(storage, "rep", t.config_hash, _rows(t.config_hash, t.config, robust, "rep"))
    table = results.load("rep", storage)
    decisions = {json.loads(d.cell)["ssl_weight"]: d for d in decide(spec, table)}
    assert decisions[0.0].next_seed is None and "≤ until_ci" in decisions[0.0].reason
    assert decisions[0.5].next_seed == 3 and "> until_ci" in decisions[0.5].reason
    assert decisions[0.5].seeds == 3 and decisions[0.5].mean == pytest.approx(0.5)
    # the next round runs seed 3 in that cell only; a re-run finds it and never repeats a seed
    spec.extra_seeds[cell_key({"ssl_weight": 0.5})] = [3]
    new = [t for t in spec.trials() if t.factors["seed"] == 3]
    assert [t.config["ssl_weight"] for t in new] == [0.5]
    results.write_trial(storage, "rep", new[0].config_hash, _rows(new[0].config_hash, new[0].config, 0.5, "rep"))
    again = _study(tmp_path, monkeypatch, {"min": 3, "max": 5, "until_ci": 0.05})
    assert seeds_with_results(again, storage) == {cell_key({"ssl_weight": 0.5}): [3]}
    again.extra_seeds = seeds_with_results(again, storage)
    decisions = {json.loads(d.cell)["ssl_weight"]: d for d in decide(again, results.load("rep", storage))}
    assert decisions[0.5].seeds == 4 and decisions[0.5].next_seed == 4
    lines = describe(list(decisions.values()), again.replication)
    assert len(lines) == 3 and "4 seed(s)" in lines[2]


def test_max_seeds_stops_a_cell_however_wide_its_interval(tmp_path, monkeypatch):
    spec = _study(tmp_path, monkeypatch, {"min": 2, "max": 2, "until_ci": 0.001})
    storage = str(tmp_path / "runs")
    for t in spec.trials():
        results.write_trial(storage, "rep", t.config_hash, _rows(t.config_hash, t.config, 0.3 + 0.2 * t.factors["seed"], "rep"))
    assert all(d.next_seed is None and "max seeds (2) reached" in d.reason for d in decide(spec, results.load("rep", storage)))


@pytest.mark.parametrize("seeds, message", [
    ({"min": 3, "max": 8}, "needs 'until_ci'"),
    ({"min": 3, "max": 2, "until_ci": 0.02}, r"max \(2\) is below min \(3\)"),
    ({"min": 0, "max": 2, "until_ci": 0.02}, "seeds.min: expected an integer >= 1"),
    ({"min": 1, "max": 2, "until_ci": 0}, "until_ci: expected a half-width > 0"),
    ({"min": 1, "max": 2, "until_ci": 0.1, "measure": "robust"}, "unknown measure 'robust'"),
    ({"min": 1, "max": 2, "until_ci": 0.1, "untill_ci": 1}, "unknown field 'untill_ci'"),
])
def test_bad_replication_settings_are_one_line(tmp_path, monkeypatch, seeds, message):
    with pytest.raises(UserError, match=message):
        _study(tmp_path, monkeypatch, seeds)
