"""How a trial learns its MLflow run id without MLflow: the driver's tracking callback writes it to
a file in the trial's folder of the Tune experiment (local disk or object store) when the trial
starts; the trial reads it before writing its Parquet rows (`mlflow_run_id`)."""
from __future__ import annotations

from . import storage as storage_mod

FILE_NAME = "mlflow_run_id"


def _path(storage: str, invocation: str, trial_id: str) -> str:
    return storage_mod.join(storage, "tune", invocation, trial_id, FILE_NAME)


def write(storage: str, invocation: str, trial_id: str, run_id: str) -> None:
    """Raises OSError."""
    fs, path = storage_mod.filesystem_and_path(_path(storage, invocation, trial_id))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(run_id.encode())


def read(storage: str, invocation: str, trial_id: str) -> str | None:
    """The run id, or None (tracking failed, or is off)."""
    try:
        fs, path = storage_mod.filesystem_and_path(_path(storage, invocation, trial_id))
        with fs.open_input_stream(path) as f:
            return f.read().decode().strip() or None
    except OSError:
        return None
