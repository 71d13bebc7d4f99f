"""The study's MLflow store: one experiment per study, one parent run per invocation (child runs
are written by `orchestrator.mlflow_callback`), stale runs of dead invocations closed.

Layout in MLflow::

    experiment  <study>                   tags: sslrobust.study, mlflow.experimentKind, mlflow.note.content
      run  "<study> <time>"               tags: sslrobust.role=parent, sslrobust.owner, sslrobust.heartbeat
        run  "λ=0.5 seed=1"               tags: mlflow.parentRunId, sslrobust.role=trial,
                                                sslrobust.config_hash, sslrobust.attempt
      run  "<study> backfill <time>"      tags: sslrobust.role=backfill (written from Parquet afterwards)

Every call goes through ``MlflowClient(tracking_uri=...)`` with explicit run ids, inside
:func:`bounded_mlflow_http`: MLflow's HTTP client otherwise retries a dead server for many minutes
(7 retries, up to 120 s per sleep); here a refused connection fails in ~2 s. Failures are a
one-line :class:`TrackingError`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from . import liveness
from .metrics import clean_name
from .tracking_uri import (TrackingError, check_reachable, default_tracking_uri, is_http, one_line, reason,  # noqa: F401
                           resolve_tracking_uri,
                           sqlite_path, SERVER_HINT, trials_view_url)

ROLE_TAG = "sslrobust.role"
STUDY_TAG = "sslrobust.study"
HASH_TAG = "sslrobust.config_hash"
ATTEMPT_TAG = "sslrobust.attempt"
BACKFILLED_TAG = "sslrobust.backfilled"
OWNER_TAG = "sslrobust.owner"  # liveness.this_owner() of the invocation's driver
HEARTBEAT_TAG = "sslrobust.heartbeat"  # Unix seconds, renewed by the live driver
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows
# The MLflow 3 UI opens an experiment in its GenAI view unless this experiment tag says otherwise.
KIND_TAG, KIND_MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"

MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_SEARCH_PAGE = 1000
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
PROVENANCE_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "optuna", "pyarrow")

# Defaults for MLflow's HTTP client (names as read by mlflow 3.x at every request, see
# mlflow/environment_variables.py). A refused connection then fails after ~2 s; an unanswered one
# after at most ~35 s. Values the user exported are left alone.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # int in mlflow 3.x
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # int seconds, connect and read
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

_env_lock = threading.Lock()
_env_depth = 0
_env_added: list[str] = []


@contextlib.contextmanager
def bounded_mlflow_http():
    """Within this block MLflow HTTP requests give up after a few seconds (see HTTP_BOUNDS).

    Re-entrant and thread-safe (reference counted); environment variables the user set
    themselves are respected; the variables this block added are removed when the last user
    leaves it.
    """
    global _env_depth
    with _env_lock:
        if _env_depth == 0:
            _env_added.clear()
            for key, value in HTTP_BOUNDS.items():
                if key not in os.environ:
                    os.environ[key] = value
                    _env_added.append(key)
        _env_depth += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_depth -= 1
            if _env_depth == 0:
                for key in _env_added:
                    os.environ.pop(key, None)
                _env_added.clear()


_ready_stores: set[str] = set()


def client(uri: str):
    """An MlflowClient for ``uri``. A sqlite store is opened first under a file lock next to the
    database: MLflow creates (and migrates) a new database when it first opens it, and two processes
    doing that at once fail; with the lock the first creates it and the others wait."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri) if uri.lower().startswith("sqlite:") else None
    if not path or uri in _ready_stores:
        return MlflowClient(tracking_uri=uri)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            c = MlflowClient(tracking_uri=uri)
            c._tracking_client.store  # noqa: B018 - opens (creates, migrates) the database
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _ready_stores.add(uri)
    return c


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_status(status: str) -> str:
    status = str(status).upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown MLflow run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    return status


def unreachable(exc: BaseException) -> bool:
    return reason(exc) in ("connection refused", "unknown host", "timed out", "connection reset")


def driver_call(uri: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run fn with bounded HTTP; turn any failure into a one-line TrackingError."""
    try:
        with bounded_mlflow_http():
            return fn()
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, requests/sqlalchemy errors, OSError
        raise TrackingError(
            f"MLflow tracking at {uri} failed to {what} ({reason(exc)})"
            + (f"; {SERVER_HINT}" if is_http(uri) and unreachable(exc) else "")
        ) from None


def quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    note = f"...[truncated, {len(text)} chars]"
    return text[: limit - len(note)] + note


def _scalar_str(value: Any) -> str:
    if value is None:
        return "None"
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        if not items:
            return "[]"
        simple = all(
            isinstance(v, (bool, int, float))
            or (isinstance(v, str) and v and v == v.strip() and "," not in v)
            for v in items
        )
        if simple:
            return ",".join(_scalar_str(v) for v in items)
        return json.dumps(items, default=str)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return _scalar_str(value)


def flatten_params(config: dict) -> dict[str, str]:
    """Config -> MLflow params: every value a string (lists comma-joined, or JSON when their items
    are not simple; dicts JSON; None "None"), values cut to MLflow's 6000 characters with a note."""
    return {
        clean_name(key): _truncate(_param_value(value), MAX_PARAM_VALUE_LENGTH)
        for key, value in config.items()
    }


def tag_dict(tags: dict | None) -> dict[str, str]:
    return {
        str(k)[:MAX_KEY_LENGTH]: _truncate(_scalar_str(v), MAX_TAG_VALUE_LENGTH)
        for k, v in (tags or {}).items()
    }


_provenance_cache: dict[str, str] | None = None


def _git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", sha) else None


def provenance_tags() -> dict[str, str]:
    """``sslrobust.git_sha`` (git checkout of this package, else $SSLROBUST_GIT_SHA, else
    "unknown") and ``sslrobust.version.<pkg>`` for torch, torchvision, ray, mlflow, optuna,
    pyarrow ("not installed" when missing). Computed once per process."""
    global _provenance_cache
    if _provenance_cache is None:
        from importlib import metadata

        tags = {"sslrobust.git_sha": _git_sha() or os.environ.get("SSLROBUST_GIT_SHA") or "unknown"}
        for pkg in PROVENANCE_PACKAGES:
            try:
                tags[f"sslrobust.version.{pkg}"] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                tags[f"sslrobust.version.{pkg}"] = "not installed"
        _provenance_cache = tags
    return dict(_provenance_cache)


def _artifact_location(uri: str, study: str) -> str | None:
    """For sqlite stores keep artifacts next to the database (MLflow's default would be ./mlruns
    under whatever the current directory is); servers decide for themselves."""
    if not uri.lower().startswith("sqlite:"):
        return None
    path = sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._") or "study"
    return (Path(path).resolve().parent / "mlartifacts" / slug[:100]).as_uri()


def study_experiment(uri: str, study: str, description: str | None = None) -> str:
    """Id of the experiment named after the study, created if needed (safe against a concurrent
    creation by another process). It is tagged to open in the MLflow UI's model-training view
    (KIND_TAG) and, given a ``description``, carries it as its note."""

    def run():
        c = client(uri)
        exp = c.get_experiment_by_name(study)
        if exp is None:
            try:
                experiment_id = c.create_experiment(
                    study, artifact_location=_artifact_location(uri, study), tags={STUDY_TAG: study}
                )
            except Exception as exc:
                exp = c.get_experiment_by_name(study)
                if exp is None:
                    raise exc
            else:
                exp = c.get_experiment(experiment_id)
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment '{study}' (id {exp.experiment_id}) at {uri} was deleted; "
                f"restore it with `mlflow experiments restore --experiment-id {exp.experiment_id}` "
                "or remove it for good with `mlflow gc`"
            )
        wanted = {KIND_TAG: KIND_MODEL_TRAINING, **({NOTE_TAG: description} if description else {})}
        for key, value in wanted.items():
            if exp.tags.get(key) != value:
                c.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    return driver_call(uri, f"get or create experiment '{study}'", run)


def start_parent_run(uri: str, experiment_id: str, name: str, study: str, params: dict, tags: dict,
                     spec_text: str | None = None) -> str:
    """Create the parent run of one study invocation, owned by this process (OWNER_TAG,
    HEARTBEAT_TAG: see `close_stale_runs`); returns its id. Tags: sslrobust.role=parent,
    sslrobust.study, provenance (git sha, package versions) and the given tags; the study file
    as the artifact ``study.yaml``."""
    from mlflow.entities import Param

    all_tags = {**provenance_tags(), **tag_dict(tags), ROLE_TAG: "parent", STUDY_TAG: study,
                OWNER_TAG: liveness.this_owner(), HEARTBEAT_TAG: str(int(time.time()))}

    def run():
        c = client(uri)
        parent = c.create_run(experiment_id, tags=all_tags, run_name=name)
        flat = flatten_params(params or {})
        if flat:
            c.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in flat.items()], synchronous=True)
        if spec_text:
            c.log_text(parent.info.run_id, spec_text, "study.yaml")
        return parent.info.run_id

    return driver_call(uri, f"start the parent run of study '{study}'", run)


def take_over_run(uri: str, run_id: str) -> None:
    """Make this process the owner of an existing run and set it RUNNING again (the parent run of
    an interrupted invocation that --resume continues); its end time is replaced when it ends."""

    def run():
        c = client(uri)
        if c.get_run(run_id).info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        c.set_tag(run_id, OWNER_TAG, liveness.this_owner())
        c.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))

    driver_call(uri, f"reopen run {run_id}", run)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run (sets status and end time)."""
    status = check_status(status)
    driver_call(uri, f"end run {run_id}", lambda: client(uri).set_terminated(run_id, status))


def log_artifacts(
    uri: str, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None
) -> None:
    """Upload local files (or directories) to a run's artifacts, e.g. the study report to the
    parent run. A missing path is a TrackingError naming it."""
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not os.path.exists(path):
            raise TrackingError(f"cannot log {path} to MLflow run {run_id}: the file does not exist")

    def run():
        c = client(uri)
        for path in paths:
            c.log_artifact(run_id, path, artifact_path)

    driver_call(uri, f"log {len(paths)} artifact(s) to run {run_id}", run)


def search_all(c, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = c.search_runs(
            [experiment_id], filter_string=filter_string, max_results=_SEARCH_PAGE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs




def _stale(run, parents_alive: dict[str, bool]) -> bool:
    tags = run.data.tags
    if tags.get(ROLE_TAG) in ("parent", "backfill") or PARENT_TAG not in tags:
        return not liveness.is_alive(tags.get(OWNER_TAG), tags.get(HEARTBEAT_TAG))
    return not parents_alive.get(tags[PARENT_TAG], False)  # a child lives while its parent does


def close_stale_runs(uri: str, experiment_id: str, status: str = "KILLED", exclude: Iterable[str] = ()) -> list[str]:
    """End the RUNNING runs of dead invocations: a parent run whose owning driver is gone
    (`liveness.is_alive` on its sslrobust.owner and sslrobust.heartbeat tags), and every RUNNING
    child whose parent is not a live RUNNING run. Runs of live invocations are left alone, so two
    invocations may run at once. Returns the ids of the runs ended with ``status``."""
    status = check_status(status)
    exclude = set(exclude)

    def run():
        c = client(uri)
        running = search_all(c, experiment_id, "attributes.status = 'RUNNING'")
        top = [r for r in running if PARENT_TAG not in r.data.tags]
        alive = {r.info.run_id: r.info.run_id in exclude or not _stale(r, {}) for r in top}
        closed = []
        for r in running:
            if r.info.run_id in exclude or r.data.tags.get(PARENT_TAG) in exclude:
                continue
            if PARENT_TAG in r.data.tags and r.data.tags[PARENT_TAG] not in alive:
                stale = True  # its parent ended (or is gone) while it was left RUNNING
            else:
                stale = _stale(r, alive)
            if stale:
                c.set_terminated(r.info.run_id, status)
                closed.append(r.info.run_id)
        return closed

    return driver_call(uri, f"close stale runs of experiment {experiment_id}", run)
