"""Kept models and re-evaluation: the atomic save/load round trip (orchestrator.models_store) and
`python -m orchestrator.evaluate` end to end on the smoke study (real Ray, MLflow sqlite, Parquet)."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator import models_store, results
from orchestrator.errors import UserError

CONFIG = dict(dataset="fashion_mnist", arch="small_cnn", ssl_task="rotation", ssl_weight=0.5, seed=3)


def _fresh_model(config):
    """A freshly initialised model of `config` (what a trial trains), its state dict."""
    from trainables.config import resolve
    from trainables.data import dataset_info
    from trainables.models import build_model
    from trainables.ssl import attach_head, task_from_config

    cfg = resolve(config)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["arch"], dataset_info(cfg["dataset"]))
    attach_head(model, task_from_config(cfg)[0])
    return cfg, model


class _RunsCode:
    """A pickle that would create a file when unpickled (what weights_only must refuse)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_kept_model_round_trip_is_atomic_and_refuses_code(tmp_path):
    storage = str(tmp_path / "runs")
    cfg, model = _fresh_model(CONFIG)
    with torch.no_grad():  # weights no fresh model has: the load must bring them back
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    files = models_store.save_model(storage, "s", "0123456789abcdef", cfg, models_store.encode_weights(model.state_dict()))
    assert set(files) == {"0123456789abcdef.pt", "0123456789abcdef.json"}
    folder = Path(storage) / "models" / "s"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no temporary file left
    assert (folder / "0123456789abcdef.pt").read_bytes() == files["0123456789abcdef.pt"]

    for name in ("0123", "0123456789abcdef", {"ssl_weight": 0.5, "seed": 3}):
        loaded, config = models_store.load_model("s", name, storage)
        assert config == cfg and not loaded.training
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    # a second model makes a short prefix and a shared setting ambiguous
    cfg2, model2 = _fresh_model({**CONFIG, "seed": 4})
    models_store.save_model(storage, "s", "0123fedcba987654", cfg2, models_store.encode_weights(model2.state_dict()))
    with pytest.raises(UserError, match="matches 2 kept models"):
        models_store.load_model("s", "0123", storage)
    with pytest.raises(UserError, match="matches 2 kept models"):
        models_store.load_model("s", {"ssl_weight": 0.5}, storage)
    with pytest.raises(UserError, match="no kept model for config hash 'ffff'"):
        models_store.load_model("s", "ffff", storage)
    with pytest.raises(UserError, match="has no kept models"):
        models_store.load_model("other", "0123", storage)

    # a .pt that would run code, with a matching checksum, is refused and runs nothing
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _RunsCode(str(marker))}, protocol=2)
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)  # a real torch zip file, then its pickle swapped
    evil = _swap_pickle(buffer.getvalue(), payload)
    (folder / "0123fedcba987654.pt").write_bytes(evil)
    meta = json.loads((folder / "0123fedcba987654.json").read_text())
    meta["sha256"] = hashlib.sha256(evil).hexdigest()
    (folder / "0123fedcba987654.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="cannot be loaded safely"):
        models_store.load_model("s", "0123f", storage)
    assert not marker.exists()
    # an altered file fails its checksum
    (folder / "0123456789abcdef.pt").write_bytes(files["0123456789abcdef.pt"][:-10])
    with pytest.raises(UserError, match="does not match the checksum"):
        models_store.load_model("s", "01234", storage)


def test_kept_model_through_a_storage_uri(tmp_path):
    """The pyarrow.fs path (s3://, gs://) taken with a file:// URI."""
    cfg, model = _fresh_model(CONFIG)
    uri = (tmp_path / "remote").as_uri()
    models_store.save_model(uri, "s", "00112233aabbccdd", cfg, models_store.encode_weights(model.state_dict()))
    assert models_store.kept_hashes(uri, "s") == ["00112233aabbccdd"]
    loaded, _ = models_store.load_model("s", "0011", uri)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _swap_pickle(torch_zip: bytes, payload: bytes) -> bytes:
    """The torch.save zip file with its data.pkl replaced by `payload`."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(torch_zip))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = payload if item.filename.endswith("/data.pkl") else source.read(item.filename)
            target.writestr(item, data)
    return out.getvalue()


@pytest.mark.slow
def test_smoke_study_reevaluated_keeps_both_sets_and_its_history(ray_cluster, workspace):
    from mlflow.tracking import MlflowClient

    from orchestrator import evaluate
    from orchestrator.runner import run_study
    from orchestrator.spec import load_study

    studies, options = workspace
    shutil.copy(Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml", studies / "smoke.yaml")
    spec = load_study("smoke", "smoke")
    outcome = run_study(spec, options, out=io.StringIO())
    assert outcome.ran == 2 and not outcome.failed
    storage, uri = options.storage, options.tracking_uri
    study_dir = Path(storage) / "results" / "smoke"
    before_files = {p.name: p.read_bytes() for p in study_dir.iterdir()}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sslrobust.role") == "trial"]
    assert len(children) == 2
    history = {r.info.run_id: {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                               for k in r.data.metrics} for r in children}
    assert all("train_loss" in h for h in history.values())
    for child in children:  # the kept model was logged with the run
        names = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
        chash = child.data.tags["sslrobust.config_hash"]
        assert {f"model/{chash}.pt", f"model/{chash}.json"} <= names

    sets = ["--set", "eval_stop_on_success=false", "--set", "eval_attack_steps=4"]
    args = ["smoke", "--scale", "smoke", *sets, "--storage", storage, "--tracking-uri", uri]
    assert evaluate.main(args) == 0
    eval_hash = evaluate.evaluation_hash({"eval_stop_on_success": False, "eval_attack_steps": 4})

    table = results.load("smoke", storage)  # its duplicate-key check passes with both sets
    own, new = table[table["eval_hash"].isna()], table[table["eval_hash"] == eval_hash]
    assert len(own) == len(new) == 2 * 3 and len(table) == 12
    assert set(own["attack"]) == {"none", "pgd_any_iterate"} and set(new["attack"]) == {"none", "pgd"}
    assert set(new.loc[new["eps_test"] > 0, "attack_steps"]) == {4}
    assert set(own.loc[own["eps_test"] > 0, "attack_steps"]) == {3}
    for (chash, eps), rows in new.groupby(["config_hash", "eps_test"]):  # same model, same test images
        old = own[(own["config_hash"] == chash) & (own["eps_test"] == eps)]
        assert rows["clean_acc"].iloc[0] == old["clean_acc"].iloc[0]
    assert {p.name: p.read_bytes() for p in study_dir.iterdir() if p.name in before_files} == before_files
    assert len(list(study_dir.iterdir())) == 4

    # the kept model is the trained one: its accuracy on the trial's test images is the rows' clean_acc
    from trainables.evaluate import predictions
    from trainables.train import DATA_SELECTION_SEED, load_split

    chash = own["config_hash"].iloc[0]
    model, config = models_store.load_model("smoke", chash[:6], storage)
    data = load_split(config["dataset"], False, None, config["test_subset"], DATA_SELECTION_SEED)
    accuracy = (predictions(model, data.images.float() / 255) == data.labels).sum().item() / len(data.labels)
    assert accuracy == pytest.approx(own.loc[own["config_hash"] == chash, "clean_acc"].iloc[0])

    for child in children:  # the same runs: training history unchanged, the new metrics added
        run = client.get_run(child.info.run_id)
        chash = run.data.tags["sslrobust.config_hash"]
        for key, points in history[run.info.run_id].items():
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == points, key
        rows = new[(new["config_hash"] == chash) & (new["eps_test"] == 0.1)]
        assert run.data.metrics[f"reeval/{eval_hash}/robust_acc/linf/0.1"] == pytest.approx(rows["robust_acc"].iloc[0])
        assert json.loads(run.data.tags[f"sslrobust.reeval.{eval_hash}"]) == {
            "eval_attack_steps": 4, "eval_stop_on_success": False}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "reeval")] == [
            f"reeval/{chash}.eval-{eval_hash}.parquet"]
    assert len([r for r in client.search_runs([experiment.experiment_id])]) == 3  # no new run
    report = Path(storage) / "reports" / "smoke" / f"eval-{eval_hash}"
    assert any(report.glob("*.html"))

    overrides = evaluate.evaluation_overrides(sets[1::2])  # again: every model already has these settings
    plan, skips = evaluate._plan(spec, str(Path(storage).resolve()), overrides, eval_hash, io.StringIO())
    assert plan == [] and len(skips) == 2 and all("already evaluated with these settings" in s for s in skips)
