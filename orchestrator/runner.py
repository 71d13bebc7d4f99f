"""Run a study on Ray Tune: the grid (or an Optuna search) of trials, tracked in MLflow.

`run_study` is four stages: plan (the cells without results), start (every check that can run
before anything is created: orchestrator.preflight; then Ray and the parent MLflow run), pre-train
the SSL backbones the pending cells need and storage lacks (orchestrator.pretrain: each once, as a
Ray task, before any trial starts), run the grid on Ray Tune, and finish (the report, the robustness
table, what failed and where everything is).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import pyarrow.fs as pafs

from . import preflight, results, storage as storage_mod, tracking
from .errors import UserError, last_line
from .spec import StudySpec, Trial

if TYPE_CHECKING:  # Ray Tune's modules: imported once the checks passed (start)
    from .mlflow_callback import StudyTracking
    from .trainable import StudyContext
    from .trial_setup import TrialSetupWatch

TUNE_STATE_FILE = "sslrobust_invocation.json"
SEARCH_TRIALS = "search trials"  # what needs a search's shared SSL pre-training


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
    tracking_errors: list = field(default_factory=list)  # tracking_problem.TrackingProblem
    report_path: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None  # the study's MLflow experiment
    pretrainings: int = 0  # SSL pre-trainings trained by this invocation (its stage and trials)
    trial_metrics: list[dict] = field(default_factory=list)  # each finished trial's last report
    missing: list[str] = field(default_factory=list)  # cells of the grid still without a result
    nan_objectives: list[str] = field(default_factory=list)  # search trials Optuna was told failed


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What an invocation is about: the grid's cells and the ones without a result yet."""

    storage: str  # normalised (storage.normalize)
    resources: dict  # per trial (and per SSL pre-training): {"cpu", "gpu"}
    trials: list[Trial]
    pending: list[Trial]


def plan(spec: StudySpec, options: RunOptions) -> Plan:
    storage = storage_mod.normalize(options.storage)
    trials = spec.trials()
    # Read every existing result once: a corrupt or foreign file is named now (ResultsError), before
    # anything runs, instead of counting as "done" and failing the report at the end.
    results.load(spec.name, storage)
    done = results.completed_hashes(storage, spec.name)
    return Plan(storage, {**spec.resources, **(options.resources or {})}, trials,
                [t for t in trials if t.config_hash not in done])


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


@dataclass
class Invocation:
    """This invocation once it is set up: where it tracks, its Tune experiment, its MLflow parent run."""

    tracking_uri: str
    name: str  # the Tune experiment's name (its folder under {storage}/tune)
    restore_path: str | None  # the interrupted Tune run --resume restores
    context: StudyContext
    tracker: StudyTracking
    setup_watch: TrialSetupWatch  # a trial's set-up error stops the study
    out: TextIO  # where the console lines go

    def directory(self, storage: str) -> str:
        return storage_mod.join(storage, "tune", self.name)


def run_study(spec: StudySpec, options: RunOptions, out=sys.stdout) -> StudyOutcome:
    """Plan → pre-train what is missing → run the grid → finish. Raises UserError (one line) for
    bad input, before anything is created, and for a set-up error of a node."""
    from .summary import finish_study

    work = plan(spec, options)
    outcome = StudyOutcome(skipped=len(work.trials) - len(work.pending))
    if options.dry_run:
        describe_dry_run(spec, work, out)
        return outcome
    invocation = start(spec, options, work, out)
    if invocation is None:
        _nothing_to_run(spec, work, out)
        outcome.report_path = finish_study(spec, work.storage, tracking.resolve_tracking_uri(options.tracking_uri),
                                           work.trials, outcome, out)
        return outcome
    try:
        not_runnable = pretrain_missing(spec, options, work, invocation, outcome, out)
        grid = run_grid(spec, options, work, invocation, not_runnable, outcome, out)
    except BaseException as exc:
        invocation.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return finish(spec, work, invocation, grid, outcome, out)


# ----------------------------------------------------------------------------- the stages


def describe_dry_run(spec: StudySpec, work: Plan, out) -> None:
    if spec.search is None:
        describe_plan(spec, work.trials, work.pending, out)
        return
    print(f"study {spec.name} ({spec.scale} scale): an Optuna search of {spec.search.num_samples} "
          f"trials over {', '.join(spec.search.space)}; objectives: "
          f"{', '.join(spec.search.objectives)}; {len(results.completed_hashes(work.storage, spec.name))} "
          f"results exist", file=out)


def _nothing_to_run(spec: StudySpec, work: Plan, out) -> None:
    print(f"every one of the {len(work.trials)} trials of {spec.name} has results; nothing to run "
          f"(add values to a factor or seeds to run more)", file=out)


def _driver_modules(tracking_uri: str) -> list[str]:
    """What the driver imports between Ray's start and the first trial: Ray Tune, MLflow's client
    and its store for ``tracking_uri``, and this package's modules that use them."""
    store = "rest_store" if tracking.is_http(tracking_uri) else "sqlalchemy_store"
    return ["ray.tune", "mlflow.tracking", f"mlflow.store.tracking.{store}",
            *(f"{__package__}.{name}" for name in ("mlflow_callback", "trainable", "trial_setup", "summary"))]


@contextlib.contextmanager
def _importing_meanwhile(modules: list[str]):
    """Import ``modules`` on a thread while the body runs.

    While a local Ray starts (~4 s), the driver mostly waits on Ray's processes and leaves a core
    idle; these imports (~2.3 s of CPU) fill it instead of following it. The smoke study's first
    trial started 9.3 s after the command instead of 10.1 s (mean of 3 runs; stage timestamps);
    with preflight.connect_ray's Ray started without idle workers as well, the default weight_sweep's
    wall / ideal went from 1.08-1.10 to 1.066-1.078 (benchmarks/bench_study_wall.py, RESULTS.md §10).
    Imports write nothing, so a bad input found in the body still leaves nothing behind; a failed
    import is left to the driver's own import, which raises it with its traceback."""
    def import_all() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - see the docstring
                return

    if not modules:
        yield
        return
    thread = threading.Thread(target=import_all, name="sslrobust-imports", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def start(spec: StudySpec, options: RunOptions, work: Plan, out) -> Invocation | None:
    """Check everything that can be checked, connect to Ray, start the MLflow parent run; None when
    the grid has nothing left to run (and no --resume)."""
    tracking_uri = tracking.resolve_tracking_uri(options.tracking_uri)
    tracking.check_reachable(tracking_uri)
    preflight.check_storage(work.storage)
    restore_path = _restore_path(spec, options, work.storage, out)
    check_resume_grid(spec, work.pending, restore_path)
    if spec.search is None and not work.pending and not options.resume:
        return None
    starts_local_ray = False
    if options.address:
        preflight.check_ray_address(options.address)
    else:  # on a cluster the workers find (or download) the data and the autoscaler adds GPUs
        import ray

        starts_local_ray = not ray.is_initialized()
        if starts_local_ray:  # else check_cluster_resources asks the Ray we are part of
            preflight.check_local_gpus(work.resources)
        preflight.check_datasets(work.pending, spec.fixed, options.data_dir)
    with _importing_meanwhile(_driver_modules(tracking_uri) if starts_local_ray else []):
        preflight.connect_ray(options.address)
    preflight.check_cluster_resources(work.resources, autoscaling=bool(options.address), out=out)
    results.migrate(work.storage)  # an earlier version's results/study=NAME/ folders, for every reader

    from .mlflow_callback import StudyTracking  # imports Ray Tune: after the checks, a bad input fails fast
    from .trainable import StudyContext
    from .trial_setup import TrialSetupWatch

    provenance = tracking.provenance_tags()
    started = dt.datetime.now()
    name = os.path.basename(restore_path) if restore_path else f"{spec.name}-{started:%Y%m%d-%H%M%S-%f}"
    context = StudyContext(
        study=spec.name, storage=work.storage, tracking_uri=tracking_uri, fixed=dict(spec.fixed),
        cpus_per_trial=work.resources["cpu"], data_dir=options.data_dir,
        git_sha=provenance.get("sslrobust.git_sha"), provenance=provenance, invocation=name,
        compact_console=options.verbose < 2,
    )
    varying = _varying(spec)
    tracker = StudyTracking(
        tracking_uri, spec.name, storage=work.storage, invocation=name, context=context, varying=varying,
        description=_description(spec), spec_text=spec.text,
        parent_name=f"{spec.name} {started:%Y-%m-%d %H:%M:%S}" + (" (search)" if spec.search else ""),
        parent_params={"scale": spec.scale, "trials": len(work.trials), "to_run": len(work.pending),
                       **{f"factor.{k}": v for k, v in spec.factors.items() if k in varying},
                       **({"seeds": spec.seeds} if "seed" in varying else {})},
        parent_tags={**provenance, "sslrobust.scale": spec.scale, "sslrobust.storage": work.storage,
                     "sslrobust.invocation": name},
        resume_parent_run_id=_read_invocation(restore_path).get("parent_run_id") if restore_path else None,
    )
    stale = tracker.set_up()  # raises TrackingError before anything is written
    if stale:
        print(f"marked {stale} MLflow run(s) left RUNNING by an earlier, interrupted invocation as KILLED",
              file=out)
    if tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow: {tracking.trials_view_url(tracking_uri, tracker.experiment_id)}", file=out)
    from .summary import record_grid

    record_grid(spec, work.trials, work.storage)  # a rebuilt report lists the missing cells even if the driver dies
    if spec.search is None and work.pending and not restore_path:
        describe_plan(spec, work.trials, work.pending, out)
    return Invocation(tracking_uri, name, restore_path, context, tracker, TrialSetupWatch(), out)


def pretrain_missing(spec: StudySpec, options: RunOptions, work: Plan, invocation: Invocation,
                     outcome: StudyOutcome, out) -> set[str]:
    """Train the SSL pre-trainings that the trials to run need and storage lacks, each once, before
    any trial starts. Returns the config hashes of the cells whose pre-training failed (each is in
    `outcome.failed` with the failure), SEARCH_TRIALS for a search's."""
    from . import pretrain

    configs = _search_configs(spec, invocation) if spec.search is not None else \
        [(t.config_hash, t.config) for t in work.pending]
    missing = pretrain.needed(work.storage, configs)
    if not missing:
        return set()
    outcome.pretrainings += pretrain.pretrain_missing(
        missing, work.resources, options.data_dir, max_concurrent=options.max_concurrent,
        max_retries=spec.max_failures, log=lambda line: print(f"[{spec.name}] {line}", file=out, flush=True),
        wait_step=invocation.tracker.keep_alive)
    failed = {chash: p.error for p in missing if p.error for chash in p.cells}
    outcome.failed.extend(f"{chash}: not run: {error}" for chash, error in failed.items())
    return set(failed)


def run_grid(spec: StudySpec, options: RunOptions, work: Plan, invocation: Invocation, not_runnable: set[str],
             outcome: StudyOutcome, out):
    """Ray Tune over what this invocation runs: the restored run (--resume), the search, or the
    pending cells but `not_runnable`; its ResultGrid, or None when nothing was left to run."""
    from ray import tune

    from .progress import quiet_tune
    from .search import search_setup

    # Per-epoch checkpoints of short trials are expected here, not a bottleneck worth a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's JSON and CSV result files in each trial folder (Result.metrics_dataframe reads them), not
    # its TensorBoard files: the study's dashboards are MLflow's. TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0
    # in the environment brings TensorBoard's back.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if invocation.restore_path:
        _callbacks(spec, invocation, options)  # what the restored run's pickled callbacks become
        tuner = tune.Tuner.restore(invocation.restore_path, trainable=_trainable(work, invocation),
                                   resume_errored=True)
        print(f"resuming {invocation.restore_path}", file=out)
    elif spec.search is not None:
        # The objectives exist only once a trial is evaluated, in its last report; Optuna's
        # multi-objective mode reads only that one, so per-epoch reports need not carry them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        space, searcher, remaining, warm = search_setup(spec, invocation.context, work.storage,
                                                        options.max_concurrent)
        print(f"Optuna search: {warm} earlier results as warm start, {remaining} new trials", file=out)
        outcome.skipped = warm
        if remaining == 0 or not_runnable:
            return None
        tuner = _tuner(spec, work, invocation, space, options, tune.TuneConfig(
            search_alg=searcher, num_samples=remaining, reuse_actors=True,
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_namer(spec)))
    else:
        cells = [t.factors for t in work.pending if t.config_hash not in not_runnable]
        if not cells:
            if not work.pending:
                _nothing_to_run(spec, work, out)
            return None
        tuner = _tuner(spec, work, invocation, {"cell": tune.grid_search(cells)}, options, tune.TuneConfig(
            reuse_actors=True, max_concurrent_trials=options.max_concurrent,
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_namer(spec)))
    with quiet_tune() if options.verbose < 2 else contextlib.nullcontext():
        return tuner.fit()


def finish(spec: StudySpec, work: Plan, invocation: Invocation, grid, outcome: StudyOutcome, out) -> StudyOutcome:
    """Count the trials, end the parent run, write the report and print the summary. Raises
    UserError for a node's set-up error (nothing of this invocation is left in storage)."""
    from .summary import finish_study

    tracker = invocation.tracker
    if grid is not None:
        count_results(spec, work, grid, outcome)
    setup_error = invocation.setup_watch.error
    if setup_error is not None:  # e.g. a dataset a worker could not fetch: stop, one line
        tracker.end("FAILED")
        if not invocation.restore_path:  # no trial wrote anything: leave nothing behind
            fs, path = storage_mod.filesystem_and_path(invocation.directory(work.storage))
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)
        raise UserError(setup_error)
    outcome.experiment_id = tracker.experiment_id
    outcome.parent_run_id = tracker.parent_run_id
    tracker.end("FAILED" if outcome.failed else "FINISHED")
    outcome.tracking_errors.extend(tracker.errors())
    outcome.report_path = finish_study(spec, work.storage, invocation.tracking_uri, work.trials, outcome, out,
                                       log_report=tracker.log_report)
    return outcome


def count_results(spec: StudySpec, work: Plan, grid, outcome: StudyOutcome) -> None:
    """What each of the Tuner's trials came to: failed, reused, already done (--resume) or run."""
    done_before = {t.config_hash for t in work.trials} - {t.config_hash for t in work.pending}
    for result in grid:
        metrics = result.metrics or {}
        if result.error is not None:
            outcome.failed.append(f"{result.path}: {last_line(result.error)}")
            continue
        if metrics.get("config_hash") in done_before:
            continue  # finished by the interrupted invocation (--resume); counted as skipped
        if metrics.get("reused_result"):
            outcome.skipped += 1
            continue
        outcome.ran += 1
        outcome.trial_metrics.append(dict(metrics))
        if spec.search is not None:
            undefined = [o for o in spec.search.objectives
                         if not isinstance(metrics.get(o), (int, float)) or metrics[o] != metrics[o]]
            if undefined:  # told to Optuna as failed (MultiObjectiveOptunaSearch)
                outcome.nan_objectives.append(
                    f"{metrics.get('config_hash')}: objective {', '.join(undefined)} is NaN; "
                    f"recorded as a failed trial of the search")
        outcome.pretrainings += int(metrics.get("pretrained_here", 0))


# ----------------------------------------------------------------------------- Tune's parts


def _varying(spec: StudySpec) -> list[str]:
    return spec.varying() if spec.search is None else list(spec.search.space)


def _search_configs(spec: StudySpec, invocation: Invocation) -> list[tuple[str, dict]]:
    """The search's pre-training when its samples share one (none of the searched settings is a
    pre-training setting); else none: each trial pre-trains its own sample's."""
    from .pretrain import INIT, depends_on
    from .trainable import trial_config

    config = trial_config({}, invocation.context)
    if config["init"] != INIT or depends_on(config, spec.search.space):
        return []
    return [(SEARCH_TRIALS, config)]


def _trainable(work: Plan, invocation: Invocation):
    from ray import tune

    from .trainable import run_trial

    return tune.with_resources(tune.with_parameters(run_trial, context=invocation.context),
                               {"cpu": work.resources["cpu"], "gpu": work.resources["gpu"]})


def _callbacks(spec: StudySpec, invocation: Invocation, options: RunOptions) -> list:
    """Tune's result files, the MLflow tracking and, unless --tune-output, the compact progress line.
    Tune pickles them with the experiment; a restored run's become this invocation's
    (mlflow_callback._active_callback, progress._active_progress)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .progress import ProgressLine

    callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), invocation.tracker]
    if options.verbose < 2:
        callbacks.append(ProgressLine(spec.name, _varying(spec), invocation.out))
    return callbacks


def _tuner(spec: StudySpec, work: Plan, invocation: Invocation, param_space: dict, options: RunOptions, tune_config):
    from ray import tune

    run_config = tune.RunConfig(
        name=invocation.name,
        storage_path=storage_mod.join(work.storage, "tune"),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Two, not one: Tune writes its whole experiment state (every trial's) after each checkpoint of
        # any trial when num_to_keep=1, so that the state never names a deleted checkpoint; with
        # two it does so every other checkpoint of a trial. Its own warning advises the same.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=_callbacks(spec, invocation, options),
        stop=invocation.setup_watch,
        # Tune's own per-trial tables only with --tune-output (verbose 2); else the compact ProgressLine
        verbose=1 if options.verbose >= 2 else 0,
    )
    # `cells`: what a --resume of this invocation runs (check_resume_grid)
    _write_invocation(invocation.directory(work.storage), {
        "study": spec.name, "scale": spec.scale, "parent_run_id": invocation.tracker.parent_run_id,
        "cells": [t.config_hash for t in work.pending]})
    return tune.Tuner(_trainable(work, invocation), param_space=param_space, run_config=run_config,
                      tune_config=tune_config)


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
