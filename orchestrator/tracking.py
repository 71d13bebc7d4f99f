"""MLflow tracking for studies: one experiment per study, one parent run per invocation, one child
run per trial.

Everything goes through ``MlflowClient(tracking_uri=...)`` with explicit run ids: there is no
``mlflow.start_run`` global state, because several trials may run one after another (or at the same
time) in one reused Ray worker process.

Layout in MLflow::

    experiment  <study name>                     tags: sslrobust.study
      run  "<study> <timestamp>"                 tags: sslrobust.role=parent, provenance
        run  <trial name>                        tags: mlflow.parentRunId, sslrobust.role=trial,
                                                       sslrobust.config_hash
      run  "<study> backfill <timestamp>"        tags: sslrobust.role=backfill
        run  <trial name>                        (written from Parquet results after the fact)

Invariant: exactly one child run per (parent run, config hash); a retried trial reuses its run.

Failure model:

* Study-level functions (``study_experiment``, ``start_parent_run``, ``close_stale_runs``,
  ``backfill_from_results``, ...) raise :class:`TrackingError`, a one-line :class:`UserError`.
* :class:`TrialTracker` (one per running trial, inside the study's TrackingService actor) never
  raises: the first failure is stored in ``.error`` and every later call is skipped at once, so
  the trial's science always finishes.

MLflow's HTTP client retries a failed request 7 times with exponential backoff (2 s factor, up to
120 s per sleep) and a 120 s timeout: a dead server blocks a call for many minutes. All MLflow calls
made here run inside :func:`bounded_mlflow_http`, which sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``..._BACKOFF_FACTOR``, ``..._BACKOFF_JITTER`` and ``..._TIMEOUT`` (read by MLflow at every
request) to small values unless the user set them, so a refused connection fails in ~2 s.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

from orchestrator.errors import UserError

logger = logging.getLogger("sslrobust.tracking")

ROLE_TAG = "sslrobust.role"
STUDY_TAG = "sslrobust.study"
HASH_TAG = "sslrobust.config_hash"
ATTEMPT_TAG = "sslrobust.attempt"
BACKFILLED_TAG = "sslrobust.backfilled"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"

# MLflow limits (mlflow.utils.validation).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_SEARCH_PAGE = 1000

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
PROVENANCE_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "optuna", "pyarrow")

SERVER_HINT = (
    "start it with `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
    "sqlite:///mlflow.db` or pass --tracking-uri sqlite:///mlflow.db"
)

# Defaults for MLflow's HTTP client (names as read by mlflow 3.x at every request, see
# mlflow/environment_variables.py and mlflow/utils/rest_utils.py::http_request). A refused
# connection then fails after ~2 s (3 attempts, sleeps 0 s and 2 s plus up to 0.5 s jitter); an
# unanswered one after at most ~35 s. Values the user exported are left alone.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # int in mlflow 3.x
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # int seconds, connect and read
    # set_terminated() prints "View run ... at: http://..." for every run on a server; in Ray
    # workers that is noise (use run_url() to show the link where it helps).
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackingError(UserError):
    """MLflow tracking cannot be used: the one-line message says what, where and how to fix."""


# --------------------------------------------------------------------------------------------
# bounded HTTP
# --------------------------------------------------------------------------------------------

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


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a failed MLflow call (connection errors made readable)."""
    text = str(exc)
    low = text.lower()
    for needle, reason in (
        ("connection refused", "connection refused"),
        ("errno 111", "connection refused"),
        ("name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("temporary failure in name resolution", "unknown host"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
        ("remotedisconnected", "connection closed by server"),
        ("connection reset", "connection reset"),
        ("connection aborted", "connection aborted"),
        ("database is locked", "database is locked"),
    ):
        if needle in low:
            return reason
    if not text:
        return type(exc).__name__
    return _one_line(f"{type(exc).__name__}: {text}" if len(text) < 20 else text)


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_status(status: str) -> str:
    status = str(status).upper()
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown MLflow run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    return status


def _driver_call(uri: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run fn with bounded HTTP; turn any failure into a one-line TrackingError."""
    try:
        with bounded_mlflow_http():
            return fn()
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, requests/sqlalchemy errors, OSError
        raise TrackingError(
            f"MLflow tracking at {uri} failed to {what} ({_reason(exc)})"
            + (f"; {SERVER_HINT}" if _is_http(uri) and _unreachable(exc) else "")
        ) from None


def _unreachable(exc: BaseException) -> bool:
    return _reason(exc) in ("connection refused", "unknown host", "timed out", "connection reset")


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------

def default_tracking_uri(workdir: str | os.PathLike = ".") -> str:
    """``sqlite:///<absolute path>/mlflow.db`` (absolute: workers with another CWD use the same db)."""
    path = os.path.abspath(os.path.join(os.path.expanduser(os.fspath(workdir)), "mlflow.db"))
    return "sqlite:///" + path


_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SCHEMELESS_OK = ("databricks", "databricks-uc", "uc")


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike = ".") -> str:
    """Normalise a user-given tracking URI.

    * ``None``/empty -> :func:`default_tracking_uri`
    * a bare path ending in ``.db`` (``.sqlite``, ``.sqlite3``) -> absolute ``sqlite:///`` URI
    * ``sqlite:///relative.db`` -> made absolute against ``workdir`` (so Ray workers agree)
    * other URIs with a scheme (``http(s)://``, ``postgresql://``, ``mysql://``...) -> unchanged
    * ``file://`` URIs and plain directories such as ``./mlruns`` -> TrackingError
    """
    if uri is None or not str(uri).strip():
        return default_tracking_uri(workdir)
    uri = os.fspath(uri).strip() if isinstance(uri, os.PathLike) else str(uri).strip()
    base = os.path.expanduser(os.fspath(workdir))
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme == "file":
            raise _file_store_error(uri)
        if scheme == "sqlite":
            rest = uri[len("sqlite:///"):] if uri.lower().startswith("sqlite:///") else None
            if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                return "sqlite:///" + os.path.abspath(os.path.join(base, os.path.expanduser(rest)))
        return uri
    if uri in _SCHEMELESS_OK:
        return uri
    if uri.lower().endswith(_DB_SUFFIXES):
        return "sqlite:///" + os.path.abspath(os.path.join(base, os.path.expanduser(uri)))
    raise _file_store_error(uri)


def _file_store_error(uri: str) -> TrackingError:
    return TrackingError(
        f"tracking URI {uri!r} is a file store (a directory like ./mlruns); MLflow 3 needs a "
        "database or a server: use e.g. --tracking-uri sqlite:///mlflow.db (or any path ending "
        "in .db), or http://127.0.0.1:5000 for a running `mlflow server`"
    )


def _sqlite_path(uri: str) -> str | None:
    """The file path of a sqlite URI (None for in-memory databases)."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    rest = rest.split("?", 1)[0]
    if rest.startswith("/"):
        rest = rest[1:]  # sqlite:///rel -> "rel", sqlite:////abs -> "/abs"
    if rest in ("", ":memory:"):
        return None
    return rest


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a one-line TrackingError when the tracking backend cannot be used.

    http(s): ``GET {uri}/health`` must answer 200 within ``timeout`` seconds.
    sqlite: the database's directory must exist and be writable (and the file, if it exists).
    Other schemes are not checked.
    """
    if _is_http(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code} from {url}"
        except urllib.error.URLError as exc:
            inner = exc.reason
            reason = _reason(inner) if isinstance(inner, BaseException) else _one_line(str(inner))
        except (socket.timeout, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        except (OSError, ValueError) as exc:
            reason = _reason(exc)
        else:
            if status == 200:
                return
            reason = f"HTTP {status} from {url}"
        if reason == "timed out":
            reason = f"no answer within {timeout:g} s"
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({reason}); {SERVER_HINT}")
    if uri.lower().startswith("sqlite:"):
        path = _sqlite_path(uri)
        if path is None:
            return
        db = Path(path).expanduser()
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.is_dir():
            raise TrackingError(
                f"MLflow database directory {parent} does not exist (tracking URI {uri}); "
                "create it or pass another --tracking-uri"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TrackingError(
                f"MLflow database directory {parent} is not writable (tracking URI {uri}); "
                "fix its permissions or pass another --tracking-uri"
            )
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingError(
                f"MLflow database {db} is not writable (tracking URI {uri}); "
                "fix its permissions or pass another --tracking-uri"
            )


def run_url(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """Link to the experiment (or run) in the MLflow UI for server URIs, else None."""
    if not _is_http(uri):
        return None
    url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{url}/runs/{run_id}" if run_id else url


# --------------------------------------------------------------------------------------------
# params, tags, metric names
# --------------------------------------------------------------------------------------------

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def _clean_name(name: Any) -> str:
    """A valid MLflow param/metric key: only alnum, ``_-./`` and space; no empty/'..' segments."""
    text = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in text.split("/") if p not in ("", ".")]
    parts = ["_" if p == ".." else p for p in parts]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


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
        _clean_name(key): _truncate(_param_value(value), MAX_PARAM_VALUE_LENGTH)
        for key, value in config.items()
    }


def _tag_dict(tags: dict | None) -> dict[str, str]:
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
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
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


def _compact_number(value: float) -> str:
    """0.1 -> "0.1", 0.025 -> "0.025", 8/255 -> "0.0314", 2.0 -> "2"."""
    x = float(value)
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    text = repr(x)
    mantissa = text.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
    if len(mantissa) <= 4:
        return text
    return f"{x:.3g}"


def _missing(value: Any) -> bool:
    """None, NaN, pandas NA/NaT or an empty string (Parquet rows spell "no value" many ways)."""
    try:
        return bool(value is None or value != value or (isinstance(value, str) and not value))
    except (TypeError, ValueError):  # pd.NA refuses bool()
        return True


def result_metric_name(
    norm: str | None, eps: float | None, corruption: str | None, severity: int | None
) -> str:
    """``robust_acc/<norm>/<eps>`` (eps compact: 0.1, 0.0314), ``corruption_acc/<name>/<severity>``,
    or ``clean_acc`` when neither a norm nor a corruption is given."""
    if not _missing(corruption):
        if not _missing(norm):
            raise ValueError("a result is either adversarial (norm, eps) or a corruption, not both")
        if _missing(severity):
            raise ValueError(f"corruption {corruption!r} needs a severity")
        return _clean_name(f"corruption_acc/{corruption}/{int(severity)}")
    if not _missing(norm):
        if _missing(eps):
            raise ValueError(f"norm {norm!r} needs an eps")
        return _clean_name(f"robust_acc/{norm}/{_compact_number(eps)}")
    return "clean_acc"


def ood_metric_name(ood_set: str, score: str, measure: str) -> str:
    """``ood/<set>/<score>/<measure>``, e.g. ``ood/gaussian/rotation/auroc``."""
    for what, value in (("ood_set", ood_set), ("score", score), ("measure", measure)):
        if _missing(value):
            raise ValueError(f"an OOD metric needs '{what}'")
    return _clean_name(f"ood/{ood_set}/{score}/{measure}")


def label_free_metric_name(measure: str, radius: float | None = None) -> str:
    """``certified_acc/<radius>`` (radius compact: 0.25) for measure certified_acc, else
    ``label_free/<measure>``, e.g. ``label_free/breakaway_risk``, or with a radius (center
    smoothing's input radius ε) ``label_free/<measure>/<radius>``."""
    if _missing(measure):
        raise ValueError("a label-free metric needs 'measure'")
    if measure == "certified_acc":
        if _missing(radius):
            raise ValueError("certified_acc needs a radius")
        return _clean_name(f"certified_acc/{_compact_number(radius)}")
    if not _missing(radius):
        return _clean_name(f"label_free/{measure}/{_compact_number(radius)}")
    return _clean_name(f"label_free/{measure}")


# --------------------------------------------------------------------------------------------
# experiment and parent runs (driver side: raise TrackingError)
# --------------------------------------------------------------------------------------------

def _artifact_location(uri: str, study: str) -> str | None:
    """For sqlite stores keep artifacts next to the database (MLflow's default would be ./mlruns
    under whatever the current directory is); servers decide for themselves."""
    if not uri.lower().startswith("sqlite:"):
        return None
    path = _sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._") or "study"
    return (Path(path).resolve().parent / "mlartifacts" / slug[:100]).as_uri()


def study_experiment(uri: str, study: str) -> str:
    """Id of the experiment named after the study, created if needed (safe against a concurrent
    creation by another process)."""

    def run():
        client = _client(uri)
        exp = client.get_experiment_by_name(study)
        if exp is None:
            try:
                return client.create_experiment(
                    study, artifact_location=_artifact_location(uri, study), tags={STUDY_TAG: study}
                )
            except Exception as exc:
                exp = client.get_experiment_by_name(study)
                if exp is None:
                    raise exc
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment '{study}' (id {exp.experiment_id}) at {uri} was deleted; "
                f"restore it with `mlflow experiments restore --experiment-id {exp.experiment_id}` "
                "or remove it for good with `mlflow gc`"
            )
        return exp.experiment_id

    return _driver_call(uri, f"get or create experiment '{study}'", run)


def start_parent_run(uri: str, experiment_id: str, study: str, params: dict, tags: dict) -> str:
    """Create the parent run of one study invocation; returns its id. Tags: sslrobust.role=parent,
    sslrobust.study, provenance (git sha, package versions) and the given tags."""
    from mlflow.entities import Param

    all_tags = {**provenance_tags(), **_tag_dict(tags), ROLE_TAG: "parent", STUDY_TAG: study}
    name = f"{study} {time.strftime('%Y-%m-%d %H:%M:%S')}"

    def run():
        client = _client(uri)
        parent = client.create_run(experiment_id, tags=all_tags, run_name=name)
        flat = flatten_params(params or {})
        if flat:
            client.log_batch(
                parent.info.run_id, params=[Param(k, v) for k, v in flat.items()], synchronous=True
            )
        return parent.info.run_id

    return _driver_call(uri, f"start the parent run of study '{study}'", run)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run (sets status and end time)."""
    status = _check_status(status)
    _driver_call(uri, f"end run {run_id}", lambda: _client(uri).set_terminated(run_id, status))


def reopen_run(uri: str, run_id: str) -> None:
    """Set a terminated run back to RUNNING (the parent run of a study invocation that resumes
    an interrupted one); its end time is replaced when it is ended again."""

    def run():
        client = _client(uri)
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")

    _driver_call(uri, f"reopen run {run_id}", run)


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
        client = _client(uri)
        for path in paths:
            client.log_artifact(run_id, path, artifact_path)

    _driver_call(uri, f"log {len(paths)} artifact(s) to run {run_id}", run)


def _search_all(client, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=_SEARCH_PAGE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def close_stale_runs(
    uri: str, experiment_id: str, status: str = "KILLED", exclude: Iterable[str] = ()
) -> list[str]:
    """Terminate runs left RUNNING by a dead invocation (a driver killed mid-study never ends its
    runs): every RUNNING run in the experiment except those in ``exclude`` and their children gets
    ``status`` and an end time. Returns their ids. Call it at the start of an invocation, excluding
    its own parent run. Note: it cannot tell a dead invocation from a live concurrent one."""
    status = _check_status(status)
    exclude = set(exclude)

    def run():
        client = _client(uri)
        closed = []
        for r in _search_all(client, experiment_id, "attributes.status = 'RUNNING'"):
            if r.info.run_id in exclude or r.data.tags.get(PARENT_TAG) in exclude:
                continue
            client.set_terminated(r.info.run_id, status)
            closed.append(r.info.run_id)
        return closed

    return _driver_call(uri, f"close stale runs of experiment {experiment_id}", run)


def child_run_hashes(uri: str, experiment_id: str, parent_run_id: str) -> set[str]:
    """The config hashes that already have a child run under ``parent_run_id`` (one search)."""

    def run():
        filt = f"tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}'"
        return {r.data.tags[HASH_TAG] for r in _search_all(_client(uri), experiment_id, filt)
                if HASH_TAG in r.data.tags}

    return _driver_call(uri, f"list the child runs of {parent_run_id}", run)


# --------------------------------------------------------------------------------------------
# one trial, inside the study's TrackingService (orchestrator.tracking_service): never raises
# --------------------------------------------------------------------------------------------

def _metric_list(metrics: dict, step: int, warnings: list[str]):
    from mlflow.entities import Metric

    now = _now_ms()
    out = []
    for key, value in (metrics or {}).items():
        if value is None:
            continue
        try:
            if hasattr(value, "item"):
                value = value.item()
            number = float(value)
        except (TypeError, ValueError):
            warnings.append(f"metric {key!r} is not a number ({value!r}); not logged")
            continue
        out.append(Metric(key=_clean_name(key), value=number, timestamp=now, step=int(step)))
    return out


class TrialTracker:
    """Tracking for one trial (the TrackingService holds one per running trial). Never raises for
    tracking failures: the trial's science must finish even if the MLflow server went away;
    failures are recorded in .error and the caller reports them.

    After the first failure every later call returns at once (counted in ``skipped``). Problems
    that are not tracking failures (a missing artifact file, a non-numeric metric, a param whose
    value differs from the one already logged on a reused run) go to ``warnings`` and do not stop
    tracking.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, config_hash: str, run_name: str):
        self.uri = uri
        self.experiment_id = str(experiment_id)
        self.parent_run_id = parent_run_id
        self.config_hash = config_hash
        self.run_name = run_name
        self.run_id: str | None = None
        self.error: str | None = None
        self.warnings: list[str] = []
        self.skipped = 0
        self.reused = False
        self._client_obj = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __getstate__(self):  # picklable (e.g. shipped to another Ray worker): drop the client
        state = dict(self.__dict__)
        state["_client_obj"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"TrialTracker(run_id={self.run_id!r}, hash={self.config_hash!r}, "
            f"ok={self.ok}, error={self.error!r})"
        )

    # -- plumbing ---------------------------------------------------------------------------
    def _get_client(self):
        if self._client_obj is None:
            if self.uri.lower().startswith("sqlite:"):
                # MLflow retries creating a sqlite engine for ~100 s; check the directory first.
                check_reachable(self.uri)
            self._client_obj = _client(self.uri)
        return self._client_obj

    def _call(self, what: str, fn: Callable[[], Any], needs_run: bool = True) -> Any:
        if self.error is not None:
            self.skipped += 1
            return None
        if needs_run and self.run_id is None:
            self.error = f"MLflow tracking: cannot {what} before the trial run was started"
            return None
        try:
            with bounded_mlflow_http():
                return fn()
        except Exception as exc:
            self.error = (
                f"MLflow tracking at {self.uri} failed to {what} for trial '{self.run_name}' "
                f"({_reason(exc)}); tracking for this trial is off from here on"
            )
            logger.warning(self.error)
            return None

    # -- API --------------------------------------------------------------------------------
    def start(self, params: dict, tags: dict, existing_run_id: str | None = None,
              search_existing: bool = True) -> str | None:
        """Reuse ``existing_run_id`` (from the checkpoint of a retried trial) if it is this
        trial's run, else a child run of the parent with the same config hash, else create one.
        ``search_existing=False`` skips the search for such a child: for a caller that knows every
        child of the parent (the study's tracking service). Logs the (missing) params and the tags;
        returns the run id, or None on failure."""

        def run():
            client = self._get_client()
            found = self._reusable(client, existing_run_id) if existing_run_id else None
            if found is None and search_existing:
                found = self._find_child(client)
            extra_tags = _tag_dict(tags)
            if found is None:
                base = {
                    PARENT_TAG: self.parent_run_id,
                    RUN_NAME_TAG: self.run_name,
                    HASH_TAG: self.config_hash,
                    ROLE_TAG: "trial",
                    ATTEMPT_TAG: "1",
                }
                created = client.create_run(
                    self.experiment_id, tags={**extra_tags, **base}, run_name=self.run_name
                )
                self.run_id = created.info.run_id
                self.reused = False
                existing_params: dict[str, str] = {}
            else:
                self.run_id = found.info.run_id
                self.reused = True
                if found.info.status != "RUNNING":
                    client.update_run(self.run_id, status="RUNNING")
                try:
                    attempt = int(found.data.tags.get(ATTEMPT_TAG, "1")) + 1
                except ValueError:
                    attempt = 2
                extra_tags = {**extra_tags, ATTEMPT_TAG: str(attempt)}
                existing_params = dict(found.data.params)
            self._log_params_and_tags(client, params, extra_tags if self.reused else {}, existing_params)
            return self.run_id

        self._call("start the trial run", run, needs_run=False)
        return self.run_id

    def _reusable(self, client, run_id: str):
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                self.warnings.append(f"run {run_id} from the checkpoint no longer exists; not reused")
                return None
            raise
        tags = run.data.tags
        if (
            run.info.lifecycle_stage != "active"
            or tags.get(PARENT_TAG) != self.parent_run_id
            or tags.get(HASH_TAG) != self.config_hash
        ):
            # e.g. a checkpoint from an earlier invocation (another parent run): keep the
            # one-child-per-(parent, hash) invariant and start a fresh child instead.
            return None
        return run

    def _find_child(self, client):
        filt = (
            f"tags.`{HASH_TAG}` = '{_quote(self.config_hash)}' "
            f"and tags.`{PARENT_TAG}` = '{_quote(self.parent_run_id)}'"
        )
        runs = client.search_runs(
            [self.experiment_id], filter_string=filt, max_results=10, order_by=["attributes.start_time ASC"]
        )
        return runs[0] if runs else None

    def _log_params_and_tags(self, client, params: dict, tags: dict[str, str], existing: dict[str, str]):
        from mlflow.entities import Param, RunTag

        new = {}
        for key, value in flatten_params(params or {}).items():
            if key not in existing:
                new[key] = value
            elif existing[key] != value:
                self.warnings.append(
                    f"param {key!r} is already logged as {existing[key]!r} on run {self.run_id}; "
                    f"new value {value!r} not logged"
                )
        if new or tags:
            client.log_batch(
                self.run_id,
                params=[Param(k, v) for k, v in new.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
                synchronous=True,
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log step metrics in one batch."""

        def run():
            batch = _metric_list(metrics, step, self.warnings)
            if batch:
                self._get_client().log_batch(self.run_id, metrics=batch, synchronous=True)

        self._call(f"log metrics at step {step}", run)

    def log_result_metrics(self, metrics: dict[str, float]) -> None:
        """Log final metrics (names from result_metric_name, e.g. robust_acc/linf/0.1)."""

        def run():
            batch = _metric_list(metrics, 0, self.warnings)
            if batch:
                self._get_client().log_batch(self.run_id, metrics=batch, synchronous=True)

        self._call("log result metrics", run)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory) to the run's artifacts."""
        if self.error is None and not os.path.exists(local_path):
            self.warnings.append(f"artifact {local_path} does not exist; not logged")
            return
        self._call(
            f"log artifact {os.path.basename(os.fspath(local_path))}",
            lambda: self._get_client().log_artifact(self.run_id, os.fspath(local_path), artifact_path),
        )

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        def run():
            pairs = [RunTag(k, v) for k, v in _tag_dict(tags).items()]
            if pairs:
                self._get_client().log_batch(self.run_id, tags=pairs, synchronous=True)

        self._call("set tags", run)

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED, KILLED)."""
        try:
            status = _check_status(status)
        except ValueError as exc:
            self.warnings.append(f"{exc}; run ended as FAILED")
            status = "FAILED"
        self._call(
            f"end the run as {status}", lambda: self._get_client().set_terminated(self.run_id, status)
        )


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


# --------------------------------------------------------------------------------------------
# backfill from Parquet results (driver side)
# --------------------------------------------------------------------------------------------

_VALUE_COLUMNS = ("robust_acc", "accuracy", "acc", "value")
_WIDE_PREFIXES = ("robust_acc/", "corruption_acc/")


def _number(value: Any) -> float | None:
    if _missing(value) or isinstance(value, (bool, str)):
        return None
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError):
        return None


def _clean_row(row: Any) -> dict:
    """A plain dict with every missing cell (NaN, pd.NA, NaT, "") as None."""
    return {k: (None if _missing(v) else v) for k, v in dict(row).items()}


def metrics_from_rows(rows: Iterable[dict]) -> dict[str, float]:
    """Final metrics from result rows (orchestrator.results schema: one row per norm x eps_test
    or corruption x severity, the accuracy in ``robust_acc``, ``clean_acc`` on every row):

    * ``norm`` + ``eps_test`` (or ``eps``) -> ``robust_acc/<norm>/<eps>``
    * ``corruption`` + ``severity`` -> ``corruption_acc/<corruption>/<severity>``
    * ``ood_set`` + ``score`` + ``measure`` -> ``ood/<set>/<score>/<measure>`` (value in ``value``)
    * ``measure`` alone (label-free rows) -> ``label_free/<measure>`` (``label_free/<measure>/<radius>`` with a
      radius), or ``certified_acc/<radius>``
    * ``clean_acc`` -> ``clean_acc``
    * a ``metric`` column names the value itself; columns already named like a metric
      (``robust_acc/linf/0.1``) are taken as they are.
    The value of a row is its first number in robust_acc, accuracy, acc, value.
    """
    out: dict[str, float] = {}
    for row in rows:
        row = _clean_row(row)
        for key, value in row.items():
            if str(key).startswith(_WIDE_PREFIXES) and (number := _number(value)) is not None:
                out[_clean_name(key)] = number
        if (clean := _number(row.get("clean_acc"))) is not None:
            out.setdefault("clean_acc", clean)
        value = next((v for v in (_number(row.get(c)) for c in _VALUE_COLUMNS) if v is not None), None)
        if value is None:
            continue
        if row.get("metric") is not None:
            name = _clean_name(row["metric"])
        elif row.get("ood_set") is not None:
            try:
                name = ood_metric_name(row["ood_set"], row.get("score"), row.get("measure"))
            except ValueError:
                continue
        elif row.get("measure") is not None and row.get("norm") is None and row.get("corruption") is None:
            try:  # a label-free measure row (no ood_set)
                name = label_free_metric_name(row["measure"], row.get("radius"))
            except ValueError:
                continue
        elif row.get("norm") is None and row.get("corruption") is None:
            continue  # nothing says what the value measures
        else:
            eps = row.get("eps_test", row.get("eps"))
            try:
                name = result_metric_name(row.get("norm"), eps, row.get("corruption"), row.get("severity"))
            except ValueError:
                continue
        out[name] = value
    return out


def backfill_from_results(
    uri: str,
    study: str,
    rows_by_hash: dict[str, list[dict]],
    configs: dict[str, dict],
    summary_metrics: Callable[[dict, list[dict]], dict[str, float]] | None = None,
) -> int:
    """Write the MLflow runs a study could not write while it ran (tracking failed).

    For each config hash with result rows but no FINISHED trial run in the study's experiment: an
    unfinished run for that hash (left RUNNING/KILLED/FAILED when tracking broke) is completed;
    otherwise a child run named ``<study>-<hash[:8]>`` is created under a new parent run tagged
    sslrobust.role=backfill (created only when needed). Params come from ``configs[hash]``, final
    metrics from the rows (:func:`metrics_from_rows`) plus ``summary_metrics(config, rows)`` when
    given (rows with missing cells as None, e.g. orchestrator.trainable.summary_metrics, so the
    backfilled runs carry the same summary numbers as live ones). Returns the number of runs
    written; idempotent (a second call writes 0).
    """
    from mlflow.entities import Metric, Param, RunTag

    experiment_id = study_experiment(uri, study)

    def run():
        client = _client(uri)
        by_hash: dict[str, list] = {}
        for r in _search_all(client, experiment_id, f"tags.`{ROLE_TAG}` = 'trial'"):
            h = r.data.tags.get(HASH_TAG)
            if h:
                by_hash.setdefault(h, []).append(r)
        parent_id = None
        written = 0
        try:
            for config_hash in sorted(rows_by_hash):
                rows = rows_by_hash[config_hash]
                if hasattr(rows, "to_dict"):  # a DataFrame
                    rows = rows.to_dict("records")
                rows = [_clean_row(r) for r in (rows or [])]
                if not rows:
                    continue
                runs = by_hash.get(config_hash, [])
                if any(r.info.status == "FINISHED" for r in runs):
                    continue
                config = configs.get(config_hash) or {}
                first = rows[0]
                tags = {BACKFILLED_TAG: "true"}
                for column, tag in (("node_id", "sslrobust.node_id"), ("git_sha", "sslrobust.git_sha"),
                                    ("trial_id", "sslrobust.trial_id")):
                    if first.get(column) is not None:
                        tags[tag] = str(first[column])
                existing = max(runs, key=lambda r: r.info.start_time or 0) if runs else None
                if existing is None:
                    if parent_id is None:
                        parent_tags = {**provenance_tags(), ROLE_TAG: "backfill", STUDY_TAG: study}
                        parent_id = client.create_run(
                            experiment_id,
                            tags=parent_tags,
                            run_name=f"{study} backfill {time.strftime('%Y-%m-%d %H:%M:%S')}",
                        ).info.run_id
                    name = str(first.get("run_name") or f"{study}-{config_hash[:8]}")
                    run_id = client.create_run(
                        experiment_id,
                        tags={
                            **tags,
                            PARENT_TAG: parent_id,
                            RUN_NAME_TAG: name,
                            HASH_TAG: config_hash,
                            ROLE_TAG: "trial",
                            STUDY_TAG: study,
                        },
                        run_name=name,
                    ).info.run_id
                    done_params: dict[str, str] = {}
                    tags = {}
                else:
                    run_id = existing.info.run_id
                    done_params = dict(existing.data.params)
                    tags = {k: v for k, v in tags.items() if k not in existing.data.tags or k == BACKFILLED_TAG}
                    if existing.info.status != "RUNNING":
                        client.update_run(run_id, status="RUNNING")
                flat = {k: v for k, v in flatten_params(config).items() if k not in done_params}
                values = metrics_from_rows(rows)
                if summary_metrics is not None and config:
                    values.update({
                        _clean_name(k): n for k, v in summary_metrics(config, rows).items()
                        if (n := _number(v)) is not None
                    })
                now = _now_ms()
                client.log_batch(
                    run_id,
                    metrics=[Metric(k, v, now, 0) for k, v in values.items()],
                    params=[Param(k, v) for k, v in flat.items()],
                    tags=[RunTag(k, v) for k, v in tags.items()],
                    synchronous=True,
                )
                client.set_terminated(run_id, "FINISHED")
                written += 1
        except BaseException:
            if parent_id is not None:
                with contextlib.suppress(Exception):
                    client.set_terminated(parent_id, "FAILED")
            raise
        if parent_id is not None:
            client.set_terminated(parent_id, "FINISHED")
        return written

    return _driver_call(uri, f"backfill runs of study '{study}'", run)
