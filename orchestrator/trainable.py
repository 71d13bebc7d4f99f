"""The Ray Tune function trainable: one trial = train one configuration, evaluate it, record it.

It is a thin layer over `trainables`: it restores from `tune.get_checkpoint()`, reports every epoch
with a checkpoint (the last one together with the results and the path of the trial's Parquet
file). It never imports MLflow: the driver's tracking callback (orchestrator.mlflow_callback)
records what it reports. A cell is trained by one trial at a time across invocations
(orchestrator.cell_lease).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass

import ray
from ray import tune

from trainables.config import resolve
from trainables.datafiles import DatasetUnavailable
from trainables.records import masking_tags

from . import models_store, results, run_id_file
from .cell_lease import CellLease
from .metrics import summary_metrics
from .trial_setup import SETUP_ERROR
from .spec import config_hash

# torch, the trainer, pre-training and the figure are imported inside the trial: the driver imports
# this module only to hand `run_trial` to Ray, and importing torch there costs it more than a second.

CHECKPOINT_FILE = "trial_state.pt"
CONFIG_COLUMNS = results.CONFIG_COLUMNS


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
    invocation: str = ""  # the Tune experiment's name (its folder under {storage}/tune)
    compact_console: bool = False  # the compact progress line, not Tune's output (--tune-output)


def trial_config(params: dict, context: StudyContext) -> dict:
    """The study's fixed settings plus the trial's own values: its grid cell (factors and seed) in
    `params["cell"]`, or the keys a search sampled."""
    sampled = {k: v for k, v in params.items() if k != "cell"}
    return resolve({**context.fixed, **params.get("cell", {}), **sampled})


def trial_rows(context: StudyContext, config: dict, chash: str, trial_id: str, records: list,
               node_id: str, mlflow_run_id: str | None, selected_epoch: int | None = None) -> list[dict]:
    """The Parquet rows of a trial's records (trainables.records.EvalRecord): each record's
    columns plus the trial's config columns and provenance."""
    finished_at = dt.datetime.now(dt.timezone.utc)
    config_json = json.dumps(config, sort_keys=True)
    shared = {c: config[c] for c in CONFIG_COLUMNS}
    return [
        {
            **shared, **record.to_row(), "study": context.study, "trial_id": trial_id, "config_hash": chash,
            "node_id": node_id, "mlflow_run_id": mlflow_run_id, "git_sha": context.git_sha,
            "finished_at": finished_at, "config_json": config_json, "selected_epoch": selected_epoch,
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


# The trial's own work, in seconds, reported with its results: building the Trainer (data, model)
# and the epochs this attempt ran (a trial resumed from a checkpoint counts only those), and
# `Trainer.evaluate`. Tune, checkpoints, the cell lease, Parquet and the model store are not in them, so a
# study's wall time can be set against the work its trials did (benchmarks/bench_study_wall.py).
TRAIN_SECONDS, EVAL_SECONDS = "train_seconds", "eval_seconds"


def run_trial(params: dict, context: StudyContext) -> None:
    import torch

    if context.compact_console:  # Ray Train's "Checkpoint successfully created at ..." per epoch
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    log = lambda message: print(f"[{context.study}] {message}", flush=True)  # noqa: E731
    config = trial_config(params, context)
    chash = config_hash(config)
    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id() or chash
    node_id = ray.get_runtime_context().get_node_id()

    def reuse(why: str) -> None:
        existing = results.trial_table(context.storage, context.study, chash)
        records = existing.astype(object).where(existing.notna(), None).to_dict("records")
        log(f"trial {chash} {why} in {context.storage}; not training it again")
        tune.report({**summary_metrics(config, records), "config_hash": chash, "pretrained_here": 0,
                     "reused_result": 1})

    if chash in results.completed_hashes(context.storage, context.study):
        # Another trial (a search's repeated sample, a retry after the write) already has this result.
        return reuse("already has results")
    lease = CellLease(context.storage, context.study, chash)
    if not lease.acquire(log):
        return reuse("was trained by another invocation; its results are")
    try:
        _train_and_record(context, config, chash, trial_id, node_id, lease, log)
    finally:
        lease.release()
    if torch.cuda.is_available():
        # Reused actors run the next trial in this process: free this one's cyclic garbage first,
        # so that the cached GPU memory handed back is really unused.
        gc.collect()
        torch.cuda.empty_cache()


def _train_and_record(context: StudyContext, config: dict, chash: str, trial_id: str, node_id: str,
                      lease: CellLease, log) -> None:
    from trainables.train import Trainer

    from . import pretrain

    pretrained, pretrained_here = None, False
    try:
        if config["init"] == pretrain.INIT:  # stored by the driver's pre-training stage (runner)
            pretrained, pretrained_here = pretrain.load_or_train(context.storage, config, context.data_dir, log)
        started = time.perf_counter()
        trainer = Trainer(config, data_dir=context.data_dir, pretrained=pretrained)
        train_seconds = time.perf_counter() - started
    except DatasetUnavailable as err:
        # A set-up error, not a trial failure: retrying cannot help, so the trial ends without an
        # exception (no retry, nothing counted against max_failures) and the driver stops the study
        # with this one line (orchestrator.trial_setup).
        tune.report({"config_hash": chash, SETUP_ERROR: str(err)})
        return
    state = _load_checkpoint(log)
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        log(f"trial {chash} resumes after epoch {trainer.epoch}")

    last_epoch: dict = {}
    while not trainer.done:
        started = time.perf_counter()
        metrics = trainer.train_epoch()
        train_seconds += time.perf_counter() - started
        lease.renew()
        if trainer.done:  # the last epoch is reported, with its checkpoint, together with the results
            last_epoch = metrics
            break
        with _checkpoint(trainer, chash) as checkpoint:
            tune.report({**metrics, "config_hash": chash}, checkpoint=checkpoint)

    started = time.perf_counter()
    records = trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    # Kept, so a stronger attack later needs no retraining (orchestrator.evaluate): the weights
    # that were evaluated (checkpoint_selection), from epoch trainer.selected_epoch.
    selected, _ = trainer.selected_model()
    models_store.save_model(context.storage, context.study, chash, config,
                            models_store.encode_weights(selected.state_dict()),
                            selected_epoch=trainer.selected_epoch)
    run_id = run_id_file.read(context.storage, context.invocation, trial_id)  # written as the trial started
    rows = trial_rows(context, config, chash, trial_id, records, node_id, run_id, trainer.selected_epoch)
    parquet_path = results.write_trial(context.storage, context.study, chash, rows)
    with _checkpoint(trainer, chash) as checkpoint:
        tune.report({
            **last_epoch, **summary_metrics(config, records), "epoch": trainer.epoch, "config_hash": chash,
            "parquet": parquet_path, "mlflow_run_id": run_id or "", "pretrained_here": int(pretrained_here),
            "selected_epoch": trainer.selected_epoch,
            TRAIN_SECONDS: train_seconds, EVAL_SECONDS: eval_seconds,
            "masking_flags": ";".join(f"{k.split('/')[-1]}:{v}" for k, v in masking_tags(records).items()),
        }, checkpoint=checkpoint)
    # Reused actors run the next trial in this process: leave nothing of this one behind.
    del trainer, pretrained


@contextlib.contextmanager
def _checkpoint(trainer, chash: str):
    """The trainer's state as a Tune checkpoint (Tune copies it to the trial's storage in report).
    No MLflow run id in it: a retried trial's run is found by its config hash under the parent."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        torch.save({"trainer": trainer.state_dict(), "config_hash": chash}, os.path.join(folder, CHECKPOINT_FILE))
        yield tune.Checkpoint.from_directory(folder)
