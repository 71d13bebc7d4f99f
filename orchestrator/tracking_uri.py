"""Where a study's MLflow store is: tracking URIs resolved for every Ray worker, and checked before
anything runs (a one-line TrackingError instead of MLflow retrying for minutes)."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.errors import UserError

SERVER_HINT = (
    "start it with `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
    "sqlite:///mlflow.db` or pass --tracking-uri sqlite:///mlflow.db"
)


class TrackingError(UserError):
    """MLflow tracking cannot be used: the one-line message says what, where and how to fix."""


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(exc: BaseException) -> str:
    """A short, one-line reason for a failed MLflow call (connection errors made readable)."""
    text = str(exc)
    low = text.lower()
    for needle, why in (
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
            return why
    if not text:
        return type(exc).__name__
    return one_line(f"{type(exc).__name__}: {text}" if len(text) < 20 else text)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


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


def sqlite_path(uri: str) -> str | None:
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
    if is_http(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code} from {url}"
        except urllib.error.URLError as exc:
            inner = exc.reason
            why = reason(inner) if isinstance(inner, BaseException) else one_line(str(inner))
        except (socket.timeout, TimeoutError):
            why = f"no answer within {timeout:g} s"
        except (OSError, ValueError) as exc:
            why = reason(exc)
        else:
            if status == 200:
                return
            why = f"HTTP {status} from {url}"
        if why == "timed out":
            why = f"no answer within {timeout:g} s"
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({why}); {SERVER_HINT}")
    if uri.lower().startswith("sqlite:"):
        path = sqlite_path(uri)
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


# The MLflow 3.17 UI takes its view (GenAI or model training) from the link's `workflowType`
# parameter, else from the browser's last choice (localStorage "mlflow.workflowType"), else GenAI;
# experiment tags are not read for it: with workflow-based navigation on (FeatureUtils
# shouldEnableWorkflowBasedNavigation, true in 3.17), useExperimentKind (ExperimentKindUtils.ts)
# derives the kind from that workflow type, not from the tag mlflow.experimentKind
# (WorkflowTypeContext.tsx). So every link this project prints carries the parameter.
ML_VIEW = "workflowType=machine_learning"


# The runs table nests child runs under a collapsed parent unless the runs are filtered and ordered
# by something other than their start time. This view lists the study's trial runs by name, their
# curves overlaid first in the chart view (orchestrator.metrics).
TRIALS_VIEW = (f"runs?{ML_VIEW}&compareRunsMode=CHART&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
               "&searchFilter=tags.%60sslrobust.role%60%20%3D%20%27trial%27")


def trials_view_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page (server at ``base``, e.g. http://127.0.0.1:5000) with the study's trial runs."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{TRIALS_VIEW}"


