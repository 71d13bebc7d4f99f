"""The Ray Tune function trainable: one trial = train one configuration, evaluate it, record it.

It is a thin layer over `trainables`: it restores from `tune.get_checkpoint()`, reports every epoch
with a checkpoint (the last one together with the results), writes the trial's Parquet file, and
has the study's tracking service record it as an MLflow child run. Tracking failures never fail
the science: the Parquet file is written regardless and the missing tracking is reported by the
driver at the end.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from trainables.config import resolve
from trainables.masking import masking_tags

from . import results
from .spec import config_hash
from .tracking import label_free_metric_name, ood_metric_name, result_metric_name
from .tracking_service import RemoteTrialTracker

# torch, the trainer, pre-training and the figure are imported inside the trial: the driver imports
# this module only to hand `run_trial` to Ray, and importing torch there costs it more than a second.

CHECKPOINT_FILE = "trial_state.pt"
# Config keys that are also Parquet columns (the rest of the config is in `config_json`).
CONFIG_COLUMNS = tuple(
    c for c in results.COLUMNS
    if c in ("seed", "dataset", "arch", "ssl_task", "ssl_weight", "attack_variant", "init",
             "norm_train", "eps_train", "train_attack_steps", "rotations", "label_noise")
)


@dataclass(frozen=True)
class StudyContext:
    """What every trial of one study invocation shares (passed with `tune.with_parameters`)."""

    study: str
    storage: str
    tracking_uri: str
    fixed: dict
    cpus_per_trial: float
    data_dir: str | None = None
    git_sha: str | None = None
    provenance: dict | None = None
    tracking_service: Any = None  # the TrackingService actor handle; None: trials are not tracked
    tracking_setup: Any = None  # the ObjectRef of the service's set-up result


def trial_config(params: dict, context: StudyContext) -> dict:
    """The study's fixed settings plus the trial's own values: its grid cell (factors and seed) in
    `params["cell"]`, or the keys a search sampled."""
    sampled = {k: v for k, v in params.items() if k != "cell"}
    return resolve({**context.fixed, **params.get("cell", {}), **sampled})


def summary_metrics(config: dict, records: list[dict]) -> dict[str, float]:
    """The numbers a search optimises and the progress table shows (OOD and label-free measure
    rows ignored)."""
    kept = [r for r in records if not _is_ood(r) and not _is_label_free(r) and not _is_defended(r)]
    adversarial = [r for r in kept if r["corruption"] is None and r["norm"] == config["norm_train"]]
    clean = (kept or records)[0]["clean_acc"] if records else float("nan")  # on every row
    above = [r["robust_acc"] for r in adversarial if r["eps_test"] >= config["eps_train"] - 1e-12]
    at = [r["robust_acc"] for r in adversarial if abs(r["eps_test"] - config["eps_train"]) < 1e-12]
    out = {
        "clean_acc": clean,
        "robust_acc_above_eps_train": sum(above) / len(above) if above else float("nan"),
        "robust_acc_at_eps_train": at[0] if at else float("nan"),
    }
    if config.get("eval_attack") == "autoattack":  # RobustBench's name for this number
        out["autoattack_acc"] = out["robust_acc_at_eps_train"]
    return out


def _is_ood(record: dict) -> bool:
    value = record.get("ood_set")
    return value is not None and value == value  # None or NaN (pandas) means not an OOD row


def _is_defended(record: dict) -> bool:
    """A row of the model behind a test-time defence (trainables.defence); null/"none": undefended."""
    value = record.get("defence")
    return value is not None and value == value and value != "none"


def defended_metric_name(record: dict) -> str:
    """``defended_acc/<defence>/<attack>/<norm>/<eps>``, e.g. defended_acc/ssl_reverse/pgd_adaptive/linf/0.1."""
    plain = result_metric_name(record["norm"], record["eps_test"], None, None)  # robust_acc/<norm>/<eps>
    return f"defended_acc/{record['defence']}/{record['attack']}/" + plain.split("/", 1)[1]


def _is_label_free(record: dict) -> bool:
    """A label-free measure row: a measure without an OOD set (trainables.label_free)."""
    value = record.get("measure")
    return value is not None and value == value and not _is_ood(record)


def result_metrics(records: list[dict]) -> dict[str, float]:
    """The MLflow metrics of a trial's records: robust_acc/<norm>/<eps>,
    corruption_acc/<corruption>/<severity>, ood/<set>/<score>/<measure>, label_free/<measure> and
    certified_acc/<radius>."""
    metrics = {}
    for r in records:
        if _is_ood(r):
            metrics[ood_metric_name(r["ood_set"], r["score"], r["measure"])] = r["value"]
        elif _is_label_free(r):
            metrics[label_free_metric_name(r["measure"], r.get("radius"))] = r["value"]
        elif _is_defended(r):
            metrics[defended_metric_name(r)] = r["robust_acc"]
        else:
            metrics[result_metric_name(r["norm"], r["eps_test"], r["corruption"], r["severity"])] = r["robust_acc"]
    return metrics


def trial_rows(context: StudyContext, config: dict, chash: str, trial_id: str, records: list[dict],
               node_id: str, mlflow_run_id: str | None) -> list[dict]:
    finished_at = dt.datetime.now(dt.timezone.utc)
    config_json = json.dumps(config, sort_keys=True)
    shared = {c: config[c] for c in CONFIG_COLUMNS}
    return [
        {
            **shared, **record, "study": context.study, "trial_id": trial_id, "config_hash": chash,
            "node_id": node_id, "mlflow_run_id": mlflow_run_id, "git_sha": context.git_sha,
            "finished_at": finished_at, "config_json": config_json,
        }
        for record in records
    ]


def _load_checkpoint(log) -> dict | None:
    import torch

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, CHECKPOINT_FILE)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a corrupt checkpoint is named and never used
            log(f"WARNING: checkpoint {path} is unreadable ({type(err).__name__}: {_load_error(err)}); "
                f"not using it, the trial starts again from epoch 0")
            return None


def _load_error(err: Exception) -> str:
    """One line on why torch.load refused a file. For weights_only refusals (corrupt data, or a
    pickle that would run code) that is the unpickler's own reason, not torch's advice to retry
    with weights_only=False, which must never be followed for a checkpoint that fails here."""
    text = " ".join(str(err).split())
    match = re.search(r"WeightsUnpickler error: (.+?)(?: Please use| Check the documentation|$)", text)
    reason = match.group(1) if match else text
    return reason if len(reason) <= 200 else reason[:197] + "..."


def run_trial(params: dict, context: StudyContext) -> None:
    import torch

    from trainables.train import Trainer

    from .pretrain import ensure_pretrained
    from .trial_plot import trial_curve_svg

    _collect_garbage()  # what is alive now (modules, caches) lives on: keep the collector off it
    log = lambda message: print(f"[{context.study}] {message}", flush=True)  # noqa: E731
    config = trial_config(params, context)
    chash = config_hash(config)
    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id() or chash
    node_id = ray.get_runtime_context().get_node_id()

    existing = results.trial_table(context.storage, context.study, chash)
    if len(existing):
        # Another trial (a search's repeated sample, a retry after the write) already has this result.
        records = existing.astype(object).where(existing.notna(), None).to_dict("records")
        log(f"trial {chash} already has results in {context.storage}; not training it again")
        tune.report({**summary_metrics(config, records), "config_hash": chash, "pretrained_here": 0,
                     "tracking_error": "", "reused_result": 1})
        return
    pretrained, pretrained_here = None, False
    if config["init"] == "ssl_pretrained":
        pretrained, pretrained_here = ensure_pretrained(context.storage, config, holder=f"{trial_id}-{os.getpid()}",
                                          data_dir=context.data_dir, log=log)
    trainer = Trainer(config, data_dir=context.data_dir, pretrained=pretrained)
    state = _load_checkpoint(log)
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        log(f"trial {chash} resumes after epoch {trainer.epoch}")

    tracker = None
    if context.tracking_service is not None:
        tracker = RemoteTrialTracker(context.tracking_service, context.tracking_setup, chash,
                                     run_name=f"{context.study}-{chash[:8]}", attempt=f"{trial_id}-{uuid.uuid4().hex}")
        tracker.start(
            params=config,
            tags={**(context.provenance or {}), "sslrobust.study": context.study, "sslrobust.node_id": node_id},
        )

    last_epoch: dict = {}
    for metrics in trainer.epochs():
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=metrics["epoch"])
        if trainer.done:  # the last epoch is reported, with its checkpoint, together with the results
            last_epoch = metrics
            break
        if tracker is not None and tracker.setup_failed():
            return  # the driver stops the study with the set-up's one-line error: write nothing
        with _checkpoint(trainer, chash) as checkpoint:
            tune.report({**metrics, "config_hash": chash}, checkpoint=checkpoint)

    records = trainer.evaluate()
    if tracker is not None and tracker.setup_failed():
        return
    run_id = tracker.run_id if tracker is not None else None  # created during training: no wait
    rows = trial_rows(context, config, chash, trial_id, records, node_id, run_id)
    summary = summary_metrics(config, records)
    encoded = results.encode_trial(context.study, chash, rows)
    parquet_path = results.write_encoded(context.storage, context.study, chash, encoded)
    masking = masking_tags(records)  # gradient-masking checks that fired: run tags, a Tune result
    if tracker is not None:
        if masking:
            tracker.set_tags(masking)
        tracker.log_result_metrics({**result_metrics(records), **summary})
        tracker.log_artifact_content("robust_accuracy_curve.svg", trial_curve_svg(records, config).encode())
        tracker.log_artifact_content(f"{chash}.parquet", encoded)
        tracker.finish("FINISHED")
    tracking_error = tracker.error if tracker is not None and not tracker.ok else ""
    with _checkpoint(trainer, chash) as checkpoint:
        tune.report({
            **last_epoch, **summary, "epoch": trainer.epoch, "config_hash": chash, "parquet": parquet_path,
            "mlflow_run_id": run_id or "", "tracking_error": tracking_error or "",
            "pretrained_here": int(pretrained_here),
            "masking_flags": ";".join(f"{k.split('/')[-1]}:{v}" for k, v in masking.items()),
        }, checkpoint=checkpoint)
    # Reused actors run the next trial in this process: leave nothing of this one behind.
    del trainer, pretrained
    _collect_garbage()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _checkpoint(trainer, chash: str):
    """The trainer's state as a Tune checkpoint (Tune copies it to the trial's storage in report).
    No MLflow run id in it: a retried trial's run is found by its config hash under the parent."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        torch.save({"trainer": trainer.state_dict(), "config_hash": chash}, os.path.join(folder, CHECKPOINT_FILE))
        yield tune.Checkpoint.from_directory(folder)


def _collect_garbage() -> None:
    """Free reference cycles, then freeze the survivors: they are long-lived (imported modules,
    MLflow's and torch's caches), and frozen objects are never walked again by the collector. A full
    collection over torch, Ray, MLflow and pandas costs ~0.25 s in a worker, more than a trivial
    trial, and Python runs one now and then during training too. Frozen objects are still freed by
    reference counting."""
    gc.collect()
    gc.freeze()
