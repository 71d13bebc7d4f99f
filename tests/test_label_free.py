"""Label-free robustness (Petrov and Kwiatkowska): the measures on hand-made points, randomized
smoothing against its published formula, the `repr` training variant, and a tiny label_free study
end to end (local Ray, sqlite MLflow, real Parquet files) with the center-smoothing settings of the
label_free study's smoke scale (center smoothing itself: tests/test_center_smoothing.py)."""
from __future__ import annotations

import datetime as dt
import io
import json
import math

import pytest
import torch
from scipy import stats

from orchestrator import results, metrics as metrics_mod
from orchestrator.report.build import build_report
from orchestrator.report.label_free import label_free_table
from orchestrator.report.smoothing import plot_center_smoothing
from orchestrator.report.statistics import aggregate, prepare
from trainables import label_free as lf
from trainables import smoothing
from trainables.config import ConfigError, resolve

from tests.rows import result_row

# ---------------------------------------------------------------------------------------------
# measures on hand-made representations


def test_risks_are_zero_for_an_encoder_that_ignores_the_perturbation():
    clean = torch.randn(21, 8, generator=torch.Generator().manual_seed(0))
    partners = lf.partner_pairs(21, torch.Generator().manual_seed(1))
    assert (partners != torch.arange(21)).all()
    paired = partners[partners] == torch.arange(21)
    assert int(paired.sum()) == 20  # ten pairs attacked both ways; the odd one out targets one of them
    assert lf.breakaway_risk(clean.clone(), clean) == 0.0
    assert lf.overlap_risk(clean.clone(), clean, partners) == 0.0
    assert lf.margin_ratio(clean.clone(), clean, partners).tolist() == pytest.approx([1.0] * 20)
    assert lf.normalised_attack_distance(clean.clone(), clean, 1.0) == 0.0


def test_breakaway_and_overlap_risks_on_hand_made_points():
    clean = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    # a0 moved to (7, 0): 7 from its own, 3 from c1, sqrt(149) from c2 -> one of two others closer
    # a1 stays; a2 moved to (0, 4): 6 from its own, 4 from c0 -> one of two others closer
    attacked = torch.tensor([[7.0, 0.0], [10.0, 0.0], [0.0, 4.0]])
    assert lf.breakaway_risk(attacked, clean) == pytest.approx(2 / 6)
    # pairs 0 <-> 1 and 2 -> 0 (the odd one out, not in the overlap risk). Seen from c0: the partner's
    # attack a1 is 10 away, a0 went 7 away -> (10 - 7) / 10. Seen from c1: a0 is 3 away, a1 stayed
    # (0) -> (3 - 0) / 10. No overlap.
    partners = torch.tensor([1, 0, 0])
    assert lf.margin_ratio(attacked, clean, partners).tolist() == pytest.approx([0.3, 0.3])
    assert lf.overlap_risk(attacked, clean, partners) == 0.0
    # a0 pushed to (6, 0) and a1 to (3, 0): they passed each other. From c0 the partner's attack is
    # 3 away, a0 itself 6: (3 - 6) / 10; from c1 a0 is 4 away, a1 itself 7: (4 - 7) / 10. Overlap.
    crossed = torch.tensor([[6.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert lf.margin_ratio(crossed, clean, partners).tolist() == pytest.approx([-0.3, -0.3])
    assert lf.overlap_risk(crossed, clean, partners) == 1.0
    # four points in two pairs, one of them overlapping: risk 1/2
    clean4 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    attacked4 = torch.tensor([[6.0, 0.0], [3.0, 0.0], [1.0, 10.0], [9.0, 10.0]])
    assert lf.overlap_risk(attacked4, clean4, torch.tensor([1, 0, 3, 2])) == pytest.approx(0.5)
    # pair distances 10, 10, sqrt(200): median 10
    assert lf.median_pair_distance(clean) == pytest.approx(10.0)
    assert lf.normalised_attack_distance(attacked, clean, 10.0) == pytest.approx((7 + 0 + 6) / 3 / 10)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.Tanh())
        self.head = torch.nn.Linear(6, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def test_representation_pgd_stays_in_the_ball_and_moves_the_representation():
    model = _Tiny().eval()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    clean = model.features(x).detach()
    eps = 0.1
    x_u = lf.representation_pgd(model, x, eps=eps, steps=10, step_size=0.025,
                                generator=torch.Generator().manual_seed(0))
    assert (x_u - x).abs().max() <= eps + 1e-6 and x_u.min() >= 0 and x_u.max() <= 1
    random = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).sign()).clamp(0, 1)
    moved = (model.features(x_u) - clean).norm(dim=1)
    assert (moved > (model.features(random) - clean).norm(dim=1)).float().mean() >= 0.75
    target = clean.roll(1, 0)
    x_t = lf.representation_pgd(model, x, target, eps=eps, steps=10, step_size=0.025,
                                generator=torch.Generator().manual_seed(0))
    assert (x_t - x).abs().max() <= eps + 1e-6
    assert ((model.features(x_t) - target).norm(dim=1) < (clean - target).norm(dim=1)).all()


# ---------------------------------------------------------------------------------------------
# randomized smoothing


def test_certified_radius_follows_the_published_formula():
    # n_A = 990 of n = 1000, α = 0.001: p_A = Beta(990, 11).ppf(α) (Clopper-Pearson), R = σ·Φ⁻¹(p_A)
    p_a = stats.beta.ppf(0.001, 990, 11)
    assert smoothing.lower_confidence_bound(990, 1000, 0.001) == pytest.approx(p_a)
    assert 0.97 < p_a < 0.99
    assert smoothing.certified_radius(990, 1000, 0.001, 0.5) == pytest.approx(0.5 * stats.norm.ppf(p_a))
    # all n agree: p_A = α^(1/n) exactly
    assert smoothing.lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert smoothing.certified_radius(520, 1000, 0.001, 0.25) is None  # p_A ≤ 1/2: abstain
    assert smoothing.lower_confidence_bound(0, 10, 0.001) == 0.0


class _Constant(torch.nn.Module):
    """Predicts class 2 whatever the input: every noisy copy votes for it."""

    def forward(self, x):
        return torch.tensor([0.0, 0.0, 1.0]).expand(len(x), 3)


def test_certify_on_a_constant_classifier_matches_the_formula():
    x, y = torch.zeros(4, 1, 2, 2), torch.tensor([2, 2, 0, 2])
    cert = smoothing.certify(_Constant(), x, sigma=0.5, n0=5, n=50, alpha=0.01)
    radius = 0.5 * stats.norm.ppf(0.01 ** (1 / 50))
    assert cert.prediction.tolist() == [2, 2, 2, 2]
    assert cert.radius.tolist() == pytest.approx([radius] * 4)
    acc = smoothing.certified_accuracy(cert, y, [0.0, radius - 1e-6, radius + 1e-6])
    assert acc == pytest.approx({0.0: 0.75, radius - 1e-6: 0.75, radius + 1e-6: 0.0})


def test_smoothing_with_vanishing_sigma_gives_the_clean_accuracy():
    model = _Tiny().eval()
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    pred = model(x).argmax(1)
    y = torch.where(torch.arange(40) % 3 == 0, (pred + 1) % 3, pred)  # clean accuracy 26/40
    clean_acc = float((pred == y).float().mean())
    cert = smoothing.certify(model, x, sigma=1e-7, n0=5, n=30, alpha=0.001)
    assert (cert.prediction == pred).all()
    assert smoothing.certified_accuracy(cert, y, [0.0])[0.0] == pytest.approx(clean_acc)


# ---------------------------------------------------------------------------------------------
# config and the `repr` training variant


def test_config_keys_leave_existing_hashes_alone():
    from orchestrator.spec import config_hash

    # the configuration and hash pinned in tests/test_label_noise.py (recorded before these keys)
    smoke = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=256, test_subset=64, epochs=2,
                 batch_size=64, attack_variant="joint", eps_train=0.1, train_attack_steps=2,
                 eval_attack_steps=3, eval_eps_linf=[0.0, 0.05, 0.1], ssl_weight=0.0, seed=0)
    assert config_hash(smoke) == "5db4e3dc338dd0ed"
    defaults = {"label_free_eval": False, "label_free_eps": None, "label_free_steps": 10,
                "smoothing_sigma": 0.25, "smoothing_n": 100, "smoothing_radii": [0.0, 0.25, 0.5, 0.75, 1.0],
                "center_smoothing_eps": [0.05, 0.1, 0.2], "center_smoothing_sigma": 0.25,
                "center_smoothing_n0": 100, "center_smoothing_n": 1000, "center_smoothing_alpha": 0.01,
                "center_smoothing_delta": 0.25, "center_smoothing_examples": 100}
    assert config_hash({**smoke, **defaults}) == "5db4e3dc338dd0ed"
    assert config_hash({**smoke, "label_free_eval": True}) != "5db4e3dc338dd0ed"
    assert resolve({"smoothing_radii": [0.5, 0, 0.5]})["smoothing_radii"] == [0.0, 0.5]
    with pytest.raises(ConfigError, match="smoothing_alpha"):
        resolve({"smoothing_alpha": 0.7})
    with pytest.raises(ConfigError, match="unknown attack_variant"):
        resolve({"attack_variant": "rep"})


@pytest.mark.parametrize("perturbation", ["shared", "independent"])
def test_repr_variant_trains_one_step_and_its_attack_stays_in_the_ball(perturbation):
    from trainables.objectives import attack_objective, clean_representation
    from trainables.train import Trainer

    trainer = Trainer(dict(train_subset=64, test_subset=16, epochs=1, batch_size=64, attack_variant="repr",
                           ssl_weight=0.5, eps_train=0.1, train_attack_steps=2, ssl_perturbation=perturbation,
                           eval_eps_linf=[0.0]), device="cpu")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_epoch()
    assert math.isfinite(metrics["train_loss"]) and metrics["train_ssl"] > 0  # CE + λ·SSL update
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    x = trainer.train_data.images[:16].float() / 255
    y = trainer.train_data.labels[:16]
    ssl = trainer._ssl_batch(16)
    from trainables.objectives import stack_inputs

    x_in = stack_inputs(x, ssl) if ssl.stacked else x
    x_adv = trainer._adversarial(x_in, y, ssl)
    assert x_adv.shape == x_in.shape
    assert (x_adv - x_in).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    trainer.model.eval()
    objective = attack_objective("repr", ssl, clean_representation(trainer.model, x_in))
    assert objective(trainer.model, x_in, y).abs().max() < 1e-8  # zero at the clean input
    assert objective(trainer.model, x_adv, y).shape == (16,)
    with torch.no_grad():
        assert float(objective(trainer.model, x_adv, y).mean()) > 0
    with pytest.raises(ValueError, match="clean features"):
        attack_objective("repr", ssl)


# ---------------------------------------------------------------------------------------------
# records, schema, tracking names, report


def test_label_free_records_of_a_short_run():
    from trainables.train import Trainer

    trainer = Trainer(dict(train_subset=64, test_subset=24, epochs=1, batch_size=64, eps_train=0.0,
                           eval_eps_linf=[0.0], label_free_eval=True, label_free_steps=2, smoothing_n0=4,
                           smoothing_n=16, smoothing_radii=[0.0, 0.5], **CENTER_SMOOTHING,
                           center_smoothing_eps=[0.05, 1.0], center_smoothing_examples=8), device="cpu")
    list(trainer.epochs())
    records = trainer.evaluate()
    got = {(r["measure"], r.get("radius")): r for r in records if r["measure"] is not None}
    # center smoothing: ε = 1 (4σ) is beyond what 256 samples certify, so only its abstention rate
    assert set(got) == {(m, None) for m in lf.MEASURES + ("smoothing_abstain_rate",)} | {
        ("certified_acc", 0.0), ("certified_acc", 0.5), ("center_smoothing_abstain_rate", 1.0)} | {
        (m, 0.05) for m in lf.CENTER_SMOOTHING_MEASURES}
    assert got["center_smoothing_abstain_rate", 1.0]["value"] == 1.0
    assert 0 <= got["center_smoothing_abstain_rate", 0.05]["value"] < 1
    cs_bound = got["center_smoothing_bound", 0.05]
    assert cs_bound["value"] > 0 and cs_bound["n_examples"] == 8 and cs_bound["attack"] == "none"
    scale = lf.median_pair_distance(lf._features(trainer.model, trainer.test_data().images.float() / 255, 24))
    assert got["center_smoothing_bound_normalized", 0.05]["value"] == pytest.approx(cs_bound["value"] / scale,
                                                                                    rel=1e-4)
    assert all(r["norm"] is None and r["robust_acc"] is None and r["ood_set"] is None for r in got.values())
    for m in ("breakaway_risk", "overlap_risk", "smoothing_abstain_rate"):
        assert 0 <= got[m, None]["value"] <= 1
    assert got["certified_acc", 0.5]["value"] <= got["certified_acc", 0.0]["value"]
    assert got["repr_distance_untargeted", None]["value"] > 0

    from orchestrator.metrics import scalar_metrics as result_metrics, summary_metrics

    metrics = result_metrics(records)
    assert metrics["label_free/breakaway_risk"] == got["breakaway_risk", None]["value"]
    assert metrics["certified_acc/0.5"] == got["certified_acc", 0.5]["value"]
    assert metrics["label_free/center_smoothing_bound/0.05"] == cs_bound["value"]
    assert metrics["label_free/center_smoothing_abstain_rate/1"] == 1.0
    config = {"norm_train": "linf", "eps_train": 0.0}
    plain = [r for r in records if r["measure"] is None]
    assert summary_metrics(config, records[::-1]) == summary_metrics(config, plain)


FINISHED = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)


def _rows(h, seed, lam, variant, breakaway=0.2):
    cfg = {"ssl_weight": lam, "attack_variant": variant, "seed": seed, "label_free_eval": True}

    def row(**columns):
        return result_row(cfg, config_hash=h, trial_id=f"t{h}", finished_at=FINISHED, **columns)

    rows = [row(eps_test=0.0, attack="none", robust_acc=0.8), row(eps_test=0.1, attack="pgd", robust_acc=0.5)]
    for m, v in (("repr_distance_untargeted", 0.4), ("breakaway_risk", breakaway + 0.01 * seed), ("overlap_risk", 0.1)):
        rows.append(row(attack="repr_pgd", measure=m, value=v))
    for r, v in ((0.0, 0.7), (0.5, 0.3), (1.0, 0.1)):
        rows.append(row(measure="certified_acc", radius=r, value=v - 0.1 * lam))
    for e, v in ((0.05, 0.6), (0.1, 0.9)):
        rows.append(row(measure="center_smoothing_bound", radius=e, value=v + lam))
        rows.append(row(measure="center_smoothing_bound_normalized", radius=e, value=(v + lam) / 2))
        rows.append(row(measure="center_smoothing_abstain_rate", radius=e, value=e + 0.1 * seed))
    return rows


def test_rows_round_trip_tracking_names_and_report(tmp_path):
    storage = str(tmp_path)
    n = 0
    for seed in (0, 1):
        for lam in (0.0, 0.5):
            for variant in ("ce", "repr"):
                results.write_trial(storage, "s", f"h{n}", _rows(f"h{n}", seed, lam, variant))
                n += 1
    df = results.load("s", storage)
    assert not df.duplicated(list(results.KEY_COLUMNS)).any()
    cert = df[df["measure"] == "certified_acc"]
    assert len(cert) == 8 * 3 and sorted(cert["radius"].unique()) == [0.0, 0.5, 1.0]
    assert sorted(df[df["measure"] == "center_smoothing_bound"]["radius"].unique()) == [0.05, 0.1]
    assert df[df["measure"] == "breakaway_risk"]["radius"].isna().all()
    rows = _rows("h0", 0, 0.0, "ce")
    with pytest.raises(results.ResultsError, match="duplicate"):
        results.write_trial(storage, "s", "h0", rows + rows[-1:])

    assert metrics_mod.label_free_metric_name("certified_acc", 0.25) == "certified_acc/0.25"
    assert metrics_mod.label_free_metric_name("overlap_risk") == "label_free/overlap_risk"
    with pytest.raises(ValueError):
        metrics_mod.label_free_metric_name("certified_acc")
    metrics = metrics_mod.scalar_metrics(rows)
    assert metrics["certified_acc/0.5"] == pytest.approx(0.3) and metrics["label_free/breakaway_risk"] == 0.2
    assert metrics["robust_acc/linf/0.1"] == 0.5
    assert metrics["label_free/center_smoothing_bound/0.05"] == pytest.approx(0.6)
    assert metrics["label_free/center_smoothing_abstain_rate/0.1"] == pytest.approx(0.1)
    assert metrics_mod.label_free_metric_name("center_smoothing_bound", 0.25) == "label_free/center_smoothing_bound/0.25"

    files = build_report("s", storage, out_dir=str(tmp_path / "out"))
    names = {p.rsplit("/", 1)[-1] for p in files.figures + files.tables}
    assert {"certified_accuracy.png", "center_smoothing.png", "label_free.md", "label_free.csv"} <= names
    data = prepare(df)
    assert data.adv["norm"].notna().all() and len(data.adv) == 16  # measure rows are not robustness rows
    table = label_free_table(aggregate(data.label_free, data.train_keys + ["measure", "radius"],
                                       value="value"), data.train_keys)
    assert len(table) == 4  # λ × variant
    row = table[(table["ssl_weight"] == 0.5) & (table["attack_variant"] == "repr")].iloc[0]
    assert row["breakaway_risk_mean"] == pytest.approx(0.205) and row["certified_acc@0.5_mean"] == pytest.approx(0.25)
    assert row["n_seeds"] == 2 and math.isfinite(row["breakaway_risk_ci95"])
    assert row["center_smoothing_bound@0.1_mean"] == pytest.approx(1.4)
    assert row["center_smoothing_abstain_rate@0.05_mean"] == pytest.approx(0.1)  # seeds 0 and 1: 0.05, 0.15
    cs_columns = [c[: -len("_mean")] for c in table.columns if c.startswith("center_smoothing") and c.endswith("_mean")]
    assert cs_columns == [f"center_smoothing_{m}@{e}" for m in ("bound", "bound_normalized", "abstain_rate")
                          for e in ("0.05", "0.1")]
    fig = plot_center_smoothing(aggregate(data.label_free, data.train_keys + ["measure", "radius"],
                                          value="value"), data.train_keys)
    bound_panel = fig.axes[0]
    assert len(bound_panel.get_lines()) == 4  # a curve per λ × variant
    assert sorted(bound_panel.get_lines()[0].get_xdata()) == [0.05, 0.1]
    md = (tmp_path / "out" / "label_free.md").read_text()
    assert "±" in md and "certified_acc@0.5" in md
    assert "certified accuracy" in (tmp_path / "out" / "report.html").read_text()


def test_report_has_no_label_free_section_without_such_rows(tmp_path):
    rows = [r for r in _rows("h0", 0, 0.5, "ce") if r.get("measure") is None]
    results.write_trial(str(tmp_path), "s", "h0", rows)
    files = build_report("s", str(tmp_path), out_dir=str(tmp_path / "out"))
    names = {p.rsplit("/", 1)[-1] for p in files.figures + files.tables}
    assert not {"certified_accuracy.png", "center_smoothing.png", "label_free.md"} & names


# ---------------------------------------------------------------------------------------------
# end to end through the study runner (fixture pattern of tests/test_ood.py)

def _smoke_center_smoothing() -> dict:
    """The center-smoothing settings of the label_free study's smoke scale (studies/label_free.yaml)."""
    import yaml
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "studies" / "label_free.yaml").read_text())
    fixed = {**spec["fixed"], **spec["scales"]["smoke"]["fixed"]}
    return {k: v for k, v in fixed.items() if k.startswith("center_smoothing_")}


CENTER_SMOOTHING = {k: v for k, v in _smoke_center_smoothing().items()
                    if k not in ("center_smoothing_eps", "center_smoothing_examples")}
TINY = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=128, test_subset=24, epochs=1, batch_size=64,
    ssl_task="rotation", rotations="one", ssl_weight=0.5, eps_train=0.1, train_attack_steps=1,
    eval_eps_linf=[0.0], label_free_eval=True, label_free_steps=2, smoothing_n0=4, smoothing_n=16,
    smoothing_radii=[0.0, 0.25], **{**_smoke_center_smoothing(), "center_smoothing_examples": 8},
)



def test_label_free_study_end_to_end(ray_cluster, workspace):
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from orchestrator.runner import run_study
    from orchestrator.spec import load_study

    studies, options = workspace
    body = {"description": "label-free tiny", "seeds": [0], "fixed": TINY,
            "factors": {"attack_variant": ["ce", "repr"]}, "resources": {"cpu": 1, "gpu": 0}}
    (studies / "lftiny.yaml").write_text(json.dumps(body))
    outcome = run_study(load_study("lftiny"), options, out=io.StringIO())
    assert outcome.ran == 2 and not outcome.failed

    table = results.load("lftiny", options.storage)
    assert not table.duplicated(list(results.KEY_COLUMNS)).any()
    measures = table[table["measure"].notna()]
    cs_eps = TINY["center_smoothing_eps"]
    cs_rows = measures[measures["measure"].str.startswith("center_smoothing")]
    # per trial and ε: the abstention rate, and the bound (l2 and normalised) unless every image abstained
    assert len(cs_rows[cs_rows.measure == "center_smoothing_abstain_rate"]) == 2 * len(cs_eps)
    assert len(cs_rows[cs_rows.measure == "center_smoothing_bound"]) >= 2  # the smoke settings certify
    assert len(measures) == 2 * (4 + 2 + 1) + len(cs_rows)  # trials × (4 measures + 2 radii + abstain rate)
    assert (cs_rows["n_examples"] == TINY["center_smoothing_examples"]).all()
    assert measures["ood_set"].isna().all() and measures["robust_acc"].isna().all()
    assert sorted(table["attack_variant"].unique()) == ["ce", "repr"]

    client = MlflowClient(options.tracking_uri)
    experiment = client.get_experiment_by_name("lftiny")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        chash = child.data.tags["sslrobust.config_hash"]
        mine = measures[measures.config_hash == chash]
        overlap = mine[mine.measure == "overlap_risk"]["value"].iloc[0]
        cert = mine[(mine.measure == "certified_acc") & (mine.radius == 0.25)]["value"].iloc[0]
        assert child.data.metrics["label_free/overlap_risk"] == pytest.approx(overlap)
        assert child.data.metrics["certified_acc/0.25"] == pytest.approx(cert)
        for row in cs_rows[cs_rows.config_hash == chash].itertuples():
            name = metrics_mod.label_free_metric_name(row.measure, row.radius)
            assert child.data.metrics[name] == pytest.approx(row.value)
        assert "label_free/repr_distance_targeted" in child.data.metrics and "clean_acc" in child.data.metrics
    report_dir = Path(options.storage) / "reports" / "lftiny"
    assert (report_dir / "label_free.md").is_file() and (report_dir / "certified_accuracy.png").is_file()
    assert (report_dir / "center_smoothing.png").is_file() and "center_smoothing_bound@" in (
        report_dir / "label_free.md").read_text()
