"""Run a study on Ray Tune: the grid (or an Optuna search) of trials, tracked in MLflow.

The driver decides what to run (cells without results), checks everything that can be checked
before a trial starts (tracking store, Ray address, GPUs), starts the parent MLflow run, runs the
Tuner, and at the end writes the report and prints the robustness table.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from . import results, storage as storage_mod, tracking
from .errors import UserError
from .spec import StudySpec, Trial

TUNE_STATE_FILE = "sslrobust_invocation.json"


@dataclass
class RunOptions:
    storage: str = "runs"
    tracking_uri: str | None = None
    address: str | None = None
    max_concurrent: int | None = None
    resume: bool = False
    dry_run: bool = False
    data_dir: str | None = None
    resources: dict | None = None
    verbose: int = 1  # 2: Tune's own per-trial output instead of the compact progress line


@dataclass
class StudyOutcome:
    ran: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    tracking_errors: list[str] = field(default_factory=list)
    report_path: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None  # the study's MLflow experiment
    pretrainings: int = 0  # SSL pre-trainings trained by this invocation's trials
    trial_metrics: list[dict] = field(default_factory=list)  # each finished trial's last report
    missing: list[str] = field(default_factory=list)  # cells of the grid still without a result
    nan_objectives: list[str] = field(default_factory=list)  # search trials Optuna was told failed


# ----------------------------------------------------------------------------- planning


def plan(spec: StudySpec, storage: str) -> tuple[list[Trial], list[Trial]]:
    """(all trials of the grid, the ones that still need to run)."""
    trials = spec.trials()
    # Read every existing result once: a corrupt or foreign file is named now (ResultsError), before
    # anything runs, instead of counting as "done" and failing the report at the end.
    results.load(spec.name, storage)
    done = results.completed_hashes(storage, spec.name)
    return trials, [t for t in trials if t.config_hash not in done]


def describe_plan(spec: StudySpec, trials: list[Trial], pending: list[Trial], out=sys.stdout) -> None:
    varying = spec.varying()
    done = len(trials) - len(pending)
    print(f"study {spec.name} ({spec.scale} scale): {len(trials)} trials, {done} already done, "
          f"{len(pending)} to run", file=out)
    if spec.description:
        print(f"  {spec.description}", file=out)
    print(f"  varying: {', '.join(varying) if varying else '(nothing)'}; "
          f"resources per trial: cpu={spec.resources['cpu']:g} gpu={spec.resources['gpu']:g}", file=out)
    pending_hashes = {t.config_hash for t in pending}
    for t in trials:
        values = ", ".join(f"{k}={t.factors[k]}" for k in varying) or "(single cell)"
        status = "to run" if t.config_hash in pending_hashes else "done"
        print(f"  {t.config_hash}  {values:<60} {status}", file=out)


# ----------------------------------------------------------------------------- ray


def connect_ray(address: str | None, num_cpus_hint: float | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # A local Ray of this machine; its dashboard (if installed) listens on 127.0.0.1 only.
            ray.init(dashboard_host="127.0.0.1", log_to_driver=True)
    except ConnectionError as err:
        token_hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
            "(docs/cluster.md)")
        raise UserError(f"cannot reach a Ray cluster at --address {address}: {str(err).splitlines()[0]}; "
                        f"start one with `ray start --head` or `ray up cluster.yaml`, or drop --address "
                        f"to run on this machine{token_hint}") from None
    except Exception as err:  # noqa: BLE001 - ray raises many types for a bad address
        if address:
            raise UserError(f"cannot connect to Ray at --address {address} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); check the address "
                            f"(`ray status` on the head node prints it)") from None
        raise


def check_cluster_resources(resources: dict, autoscaling: bool, out=sys.stdout) -> None:
    """Refuse a study a local Ray can never run; on a cluster only warn (the autoscaler adds nodes)."""
    import ray

    available = ray.cluster_resources()
    problems = []
    if resources.get("gpu", 0) > 0 and available.get("GPU", 0) == 0:
        problems.append(f"the study asks for gpu: {resources['gpu']:g} per trial but the Ray cluster has no GPU")
    if resources.get("cpu", 0) > available.get("CPU", 0):
        problems.append(f"a trial asks for cpu: {resources['cpu']:g} but the Ray cluster has "
                        f"{available.get('CPU', 0):g} CPUs")
    if not problems:
        return
    if autoscaling:
        print(f"note: {'; '.join(problems)} right now; trials wait until the autoscaler adds such nodes",
              file=out)
        return
    raise UserError(f"{'; '.join(problems)}; to run on this machine's CPUs pass --resources cpu=1,gpu=0 "
                    f"(or use --scale default)")


# ----------------------------------------------------------------------------- pre-flight
# Checks that run before anything is created (no MLflow database, no runs/ folder, no Ray): bad
# input then ends with one line on stderr instead of a traceback from a Ray worker.


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """An explicit --address (HOST:PORT or ray://HOST:PORT) must accept a TCP connection; without
    this check ray.init retries an unreachable address for many minutes."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return  # not HOST:PORT; ray.init reports it
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        reason = ("connection refused" if isinstance(err, ConnectionRefusedError)
                  else "unknown host" if isinstance(err, socket.gaierror)
                  else f"no answer within {timeout:g} s" if isinstance(err, TimeoutError)
                  else str(err) or type(err).__name__)
        raise UserError(f"cannot reach a Ray cluster at --address {address} ({reason}); start one with "
                        f"`ray start --head` or `ray up cluster.yaml` (`ray status` on the head node prints "
                        f"its address), or drop --address to run on this machine") from None


def check_storage(storage: str) -> None:
    """--storage must be creatable and writable: a probe file under a temporary name is written and
    removed again, and so is every folder made for it, so a refusal, and a success, leave nothing."""
    how = "pass a --storage you can write (a folder path, or a URI such as s3://bucket/prefix)"
    try:
        fs, path = storage_mod.filesystem_and_path(storage)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad URI
        raise UserError(f"--storage {storage}: not a usable location ({_first_line(err)}); {how}") from None
    probe_name = f".sslrobust-probe-{uuid.uuid4().hex}"
    if not isinstance(fs, pafs.LocalFileSystem):
        try:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{probe_name}") as stream:
                stream.write(b"probe")
            fs.delete_file(f"{path}/{probe_name}")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--storage {storage}: cannot write there ({_first_line(err)}); {how}") from None
        return
    made: list[str] = []
    try:
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UserError(f"--storage {storage}: {existing} is a file, not a folder; {how}")
        for folder in _folders_below(existing, path):
            os.mkdir(folder)
            made.append(folder)
        probe = os.path.join(path, probe_name)
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--storage {storage}: cannot create or write {err.filename or path} "
                        f"({err.strerror or type(err).__name__}); {how}") from None
    finally:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _folders_below(existing: str, path: str) -> list[str]:
    """The folders from just below `existing` down to `path`, outermost first."""
    out = []
    while path != existing:
        out.append(path)
        path = os.path.dirname(path)
    return out[::-1]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_resume_grid(spec: StudySpec, pending: list[Trial], restore_path: str | None) -> None:
    """A restored Tune run runs the cells it was started with; refuse --resume when the grid has
    cells since added (they would be left out), before anything starts."""
    if restore_path is None or spec.search is not None:
        return
    started = _read_invocation(restore_path).get("cells")
    if started is None:  # an invocation of an earlier version: the end-of-run summary lists what is left
        return
    added = [t for t in pending if t.config_hash not in set(started)]
    if not added:
        return
    varying = spec.varying()
    shown = "; ".join(", ".join(f"{k}={t.factors[k]}" for k in varying) or t.config_hash for t in added[:3])
    more = f" and {len(added) - 3} more" if len(added) > 3 else ""
    raise UserError(f"--resume: the grid of {spec.name} has {len(added)} cell(s) that the interrupted run "
                    f"{restore_path} did not start ({shown}{more}); run without --resume to run every cell "
                    f"without a result (finished trials are kept), or resume with the grid it was started with")


def check_local_gpus(resources: dict) -> None:
    """A local Ray offers the GPUs this machine has; refuse a GPU study on a machine without one."""
    if resources.get("gpu", 0) <= 0:
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise UserError(f"the study asks for gpu: {resources['gpu']:g} per trial but this machine has no "
                        f"CUDA GPU, so a local Ray sees none; to run on this machine's CPUs pass "
                        f"--resources cpu=1,gpu=0 (or use --scale default)")


def check_datasets(pending: list[Trial], fixed: dict, data_dir: str | None) -> None:
    """Both splits of every dataset the pending trials use must be readable (downloaded once if
    missing); a missing dataset is one line naming it and how to get it, before any trial starts.
    NumPy readers only: the driver never needs torch."""
    from trainables.config import resolve
    from trainables.datafiles import DatasetUnavailable, data_root, load_arrays

    root = data_root(data_dir)
    names = sorted({t.config["dataset"] for t in pending}) or [resolve(fixed)["dataset"]]
    try:
        for name in names:
            for train in (True, False):
                load_arrays(name, train, root, download=True)
    except DatasetUnavailable as err:
        raise UserError(f"{err} (the study looks for datasets in, and downloads them to, --data-dir: here "
                        f"{root})") from None


# ----------------------------------------------------------------------------- tune


class _TrialNamer:
    """Trial names from the factors that vary. A small picklable object rather than a closure: Tune
    stores the namer in every trial's state, which it writes again after trial checkpoints."""

    def __init__(self, varying):
        self.varying = tuple(varying)

    def __call__(self, trial) -> str:
        cell = trial.config.get("cell")
        if cell is not None:
            parts = [f"{k}={cell.get(k)}" for k in self.varying]
        else:
            parts = [f"{k}={trial.config[k]:.4g}" for k in sorted(trial.config) if k != "cell"]
        return f"{trial.trial_id}_" + ("_".join(parts) if parts else "cell")


def _trial_namer(spec: StudySpec) -> _TrialNamer:
    return _TrialNamer(spec.varying())


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _invocation_dirs(storage: str, study: str) -> list[str]:
    fs, path = storage_mod.filesystem_and_path(storage_mod.join(storage, "tune"))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith(f"{study}-"))
    return [storage_mod.join(storage, "tune", n) for n in names]


def _write_invocation(experiment_path: str, info: dict) -> None:
    fs, path = storage_mod.filesystem_and_path(experiment_path)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{TUNE_STATE_FILE}") as stream:
        stream.write(json.dumps(info).encode())


def _read_invocation(experiment_path: str) -> dict:
    fs, path = storage_mod.filesystem_and_path(experiment_path)
    try:
        with fs.open_input_stream(f"{path}/{TUNE_STATE_FILE}") as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError, ValueError):
        return {}


def _restore_path(spec: StudySpec, options: RunOptions, storage: str, out) -> str | None:
    """The interrupted Tune run --resume restores, or None."""
    if not options.resume:
        return None
    from ray.tune import Tuner

    restorable = [p for p in _invocation_dirs(storage, spec.name) if Tuner.can_restore(p)]
    if restorable:
        return restorable[-1]
    print(f"--resume: no interrupted run of {spec.name} under {storage}/tune; starting the "
          f"missing cells afresh", file=out)
    return None


def run_study(spec: StudySpec, options: RunOptions, out=sys.stdout) -> StudyOutcome:
    # Per-epoch checkpoints of short trials are expected here, not a bottleneck worth a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from .summary import finish_study, record_grid

    storage = storage_mod.normalize(options.storage)
    resources = dict(spec.resources)
    if options.resources:
        resources.update(options.resources)
    trials, pending = plan(spec, storage)
    outcome = StudyOutcome(skipped=len(trials) - len(pending))
    if options.dry_run:
        if spec.search is not None:
            print(f"study {spec.name} ({spec.scale} scale): an Optuna search of {spec.search.num_samples} "
                  f"trials over {', '.join(spec.search.space)}; objectives: "
                  f"{', '.join(spec.search.objectives)}; {len(results.completed_hashes(storage, spec.name))} "
                  f"results exist", file=out)
        else:
            describe_plan(spec, trials, pending, out)
        return outcome

    tracking_uri = tracking.resolve_tracking_uri(options.tracking_uri)
    tracking.check_reachable(tracking_uri)
    check_storage(storage)
    restore_path = _restore_path(spec, options, storage, out)
    check_resume_grid(spec, pending, restore_path)
    if spec.search is None and not pending and not options.resume:
        print(f"every one of the {len(trials)} trials of {spec.name} has results; nothing to run "
              f"(add values to a factor or seeds to run more)", file=out)
        outcome.report_path = finish_study(spec, storage, tracking_uri, trials, outcome, out)
        return outcome
    if options.address:
        check_ray_address(options.address)
    else:  # on a cluster the workers find (or download) the data and the autoscaler adds GPUs
        import ray

        if not ray.is_initialized():  # else check_cluster_resources asks the Ray we are part of
            check_local_gpus(resources)
        check_datasets(pending, spec.fixed, options.data_dir)
    connect_ray(options.address)
    check_cluster_resources(resources, autoscaling=bool(options.address), out=out)
    results.migrate(storage)  # an earlier version's results/study=NAME/ folders, for every reader

    from ray import tune  # imported after the checks above: a bad input fails in a second or two

    from .mlflow_callback import StudyTracking
    from .progress import ProgressLine, quiet_tune
    from .search import search_setup
    from .trainable import StudyContext, run_trial
    from .trial_setup import TrialSetupWatch

    provenance = tracking.provenance_tags()
    started = dt.datetime.now()
    name = os.path.basename(restore_path) if restore_path else f"{spec.name}-{started:%Y%m%d-%H%M%S-%f}"
    invocation_dir = storage_mod.join(storage, "tune", name)
    context = StudyContext(
        study=spec.name, storage=storage, tracking_uri=tracking_uri, fixed=dict(spec.fixed),
        cpus_per_trial=resources["cpu"], data_dir=options.data_dir, git_sha=provenance.get("sslrobust.git_sha"),
        provenance=provenance, invocation=name, compact_console=options.verbose < 2,
    )
    varying = spec.varying() if spec.search is None else list(spec.search.space)
    tracker = StudyTracking(
        tracking_uri, spec.name, storage=storage, invocation=name, context=context, varying=varying,
        description=_description(spec),
        spec_text=spec.text, parent_name=f"{spec.name} {started:%Y-%m-%d %H:%M:%S}" + (" (search)" if spec.search else ""),
        parent_params={"scale": spec.scale, "trials": len(trials), "to_run": len(pending),
                       **{f"factor.{k}": v for k, v in spec.factors.items() if k in varying},
                       **({"seeds": spec.seeds} if "seed" in varying else {})},
        parent_tags={**provenance, "sslrobust.scale": spec.scale, "sslrobust.storage": storage,
                     "sslrobust.invocation": name},
        resume_parent_run_id=_read_invocation(restore_path).get("parent_run_id") if restore_path else None,
    )
    stale = tracker.set_up()  # raises TrackingError before anything is written
    if stale:
        print(f"marked {stale} MLflow run(s) left RUNNING by an earlier, interrupted invocation as KILLED",
              file=out)
    outcome.experiment_id = tracker.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow: {tracking.trials_view_url(tracking_uri, tracker.experiment_id)}", file=out)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": resources["cpu"], "gpu": resources["gpu"]})
    # `cells`: what a --resume of this invocation runs (check_resume_grid)
    invocation = {"study": spec.name, "scale": spec.scale, "parent_run_id": tracker.parent_run_id,
                  "cells": [t.config_hash for t in pending]}
    record_grid(spec, trials, storage)  # a rebuilt report lists the missing cells even if the driver dies
    setup_watch = TrialSetupWatch()
    # Tune's JSON and CSV result files in each trial folder (Result.metrics_dataframe reads them), not
    # its TensorBoard files: the study's dashboards are MLflow's. TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0
    # in the environment brings TensorBoard's back.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), tracker]
    if options.verbose < 2:
        callbacks.append(ProgressLine(spec.name, varying, out))
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_mod.join(storage, "tune"),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Two, not one: Tune writes its whole experiment state (every trial's) after each checkpoint of
        # any trial when num_to_keep=1, so that the state never names a deleted checkpoint; with
        # two it does so every other checkpoint of a trial. Its own warning advises the same.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks,
        stop=setup_watch,
        # Tune's own per-trial tables only with --tune-output (verbose 2); else the compact ProgressLine
        verbose=1 if options.verbose >= 2 else 0,
    )
    status = "FINISHED"
    try:
        if restore_path:
            tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True)
            print(f"resuming {restore_path}", file=out)
        elif spec.search is not None:
            # The objectives exist only once a trial is evaluated, in its last report; Optuna's
            # multi-objective mode reads only that one, so per-epoch reports need not carry them.
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
            space, searcher, remaining, warm = search_setup(spec, context, storage, options.max_concurrent)
            print(f"Optuna search: {warm} earlier results as warm start, {remaining} new trials", file=out)
            outcome.skipped = warm
            if remaining == 0:
                tuner = None
            else:
                tuner = tune.Tuner(
                    trainable, param_space=space, run_config=run_config,
                    tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, reuse_actors=True,
                                                trial_dirname_creator=_trial_dirname,
                                                trial_name_creator=_trial_namer(spec)),
                )
        elif pending:
            describe_plan(spec, trials, pending, out)
            tuner = tune.Tuner(
                trainable,
                param_space={"cell": tune.grid_search([t.factors for t in pending])},
                run_config=run_config,
                tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=options.max_concurrent,
                                            trial_dirname_creator=_trial_dirname,
                                            trial_name_creator=_trial_namer(spec)),
            )
        else:
            print(f"every one of the {len(trials)} trials of {spec.name} has results; nothing to run "
                  f"(add values to a factor or seeds to run more)", file=out)
            tuner = None
        if tuner is not None:
            if not restore_path:  # what --resume reads to take over this invocation's parent run
                _write_invocation(invocation_dir, invocation)
            with quiet_tune() if options.verbose < 2 else contextlib.nullcontext():
                grid = tuner.fit()
            done_before = {t.config_hash for t in trials} - {t.config_hash for t in pending}
            for result in grid:
                if result.error is not None:
                    outcome.failed.append(f"{result.path}: {type(result.error).__name__}: "
                                          f"{str(result.error).strip().splitlines()[-1] if str(result.error) else ''}")
                    continue
                if (result.metrics or {}).get("config_hash") in done_before:
                    continue  # finished by the interrupted invocation (--resume); counted as skipped
                if (result.metrics or {}).get("reused_result"):
                    outcome.skipped += 1
                    continue
                outcome.ran += 1
                outcome.trial_metrics.append(dict(result.metrics or {}))
                if spec.search is not None:
                    undefined = [o for o in spec.search.objectives
                                 if not isinstance((result.metrics or {}).get(o), (int, float))
                                 or result.metrics[o] != result.metrics[o]]
                    if undefined:  # told to Optuna as failed (MultiObjectiveOptunaSearch)
                        outcome.nan_objectives.append(
                            f"{result.metrics.get('config_hash')}: objective {', '.join(undefined)} is NaN; "
                            f"recorded as a failed trial of the search")
                outcome.pretrainings += int((result.metrics or {}).get("pretrained_here", 0))
        if outcome.failed:
            status = "FAILED"
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if setup_watch.error is not None:  # e.g. a dataset a worker could not fetch: stop, one line
        tracker.end("FAILED")
        if tuner is not None and not restore_path:  # no trial wrote anything: leave nothing behind
            fs, path = storage_mod.filesystem_and_path(invocation_dir)
            fs.delete_dir(path)
        raise UserError(setup_watch.error)
    outcome.parent_run_id = tracker.parent_run_id
    tracker.end(status)
    outcome.tracking_errors.extend(tracker.errors())
    outcome.report_path = finish_study(spec, storage, tracking_uri, trials, outcome, out, log_report=tracker.log_report)
    return outcome


def _description(spec: StudySpec) -> str:
    """The MLflow note of the experiment and the parent run: what the study is and varies."""
    varying = spec.varying()
    text = " ".join(str(spec.description or spec.name).split())
    grid = "; ".join(f"{k} in {spec.factors[k]}" for k in varying if k in spec.factors)
    if "seed" in varying:
        grid += ("; " if grid else "") + f"seeds {spec.seeds}"
    return (f"{text}\n\nVaries: {grid or 'nothing'}. Each child run is one trial, named by its factors. "
            f"Curves: acc_vs_eps/robust_acc_<norm> is robust accuracy against ε with step = round(ε·10^4) "
            f"(ε=0.1 at step 1000); robust_acc/<norm>/<ε> are the same points as scalars.")
