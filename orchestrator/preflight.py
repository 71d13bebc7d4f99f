"""Checks before a study starts anything, and the connection to Ray.

Each refuses bad input with one line (UserError) before the MLflow database, the storage folders or
any trial exist, instead of a traceback from a Ray worker.
"""
from __future__ import annotations

import os
import socket
import sys
import uuid

import pyarrow.fs as pafs

from . import storage as storage_mod
from .errors import UserError, first_line
from .spec import Trial


# ----------------------------------------------------------------------------- Ray (once the checks passed)


def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # A local Ray of this machine; its dashboard (if installed) listens on 127.0.0.1 only.
            # No workers prestarted for the first driver: Tune starts its trial actors with a
            # runtime_env (its env_vars), for which Ray starts new workers, so the prestarted ones
            # (one per CPU) only import Ray (~0.5 s of CPU each) while the study starts, and idle.
            # Without them the smoke study's first trial started 8.0 s after the command instead of
            # 9.3 s (mean of 3 runs; stage timestamps; RESULTS.md §10). Ray refuses a system config
            # when RAY_ADDRESS (set inside a Ray job) makes this call join that cluster instead.
            starts_ray = {} if os.environ.get("RAY_ADDRESS") else {
                "_system_config": {"prestart_worker_first_driver": False}}
            ray.init(dashboard_host="127.0.0.1", log_to_driver=True, **starts_ray)
    except ConnectionError as err:
        token_hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
            "(docs/cluster.md)")
        raise UserError(f"cannot reach a Ray cluster at --address {address}: {first_line(err)}; "
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


# ----------------------------------------------------------------------------- before anything is created


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
        raise UserError(f"--storage {storage}: not a usable location ({first_line(err)}); {how}") from None
    probe_name = f".sslrobust-probe-{uuid.uuid4().hex}"
    if not isinstance(fs, pafs.LocalFileSystem):
        try:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{probe_name}") as stream:
                stream.write(b"probe")
            fs.delete_file(f"{path}/{probe_name}")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--storage {storage}: cannot write there ({first_line(err)}); {how}") from None
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
