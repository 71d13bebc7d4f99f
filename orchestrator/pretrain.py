"""SSL pre-training as a shared dependency: trained once per settings, reused by every trial.

The backbone lives at `{storage}/pretrained/{hash}.pt`, keyed by the hash of
`trainables.train.pretrain_settings`, so later studies reuse it too. The driver knows every
pre-training its pending cells need before any trial starts: `needed` lists the missing ones and
`pretrain_missing` trains each once, as a Ray task with a trial's resources, before the grid
starts (a lease beside the file keeps two invocations at once from both training it). Trials then
only load the file (`load_or_train`); they train one themselves only when the driver could not
know it in advance (a search that samples a pre-training setting: every sample is a setting of its
own).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .cell_lease import Lease
from .errors import UserError, last_line
from .spec import settings_hash
from .storage import filesystem_and_path, join, write_atomic

INIT = "ssl_pretrained"


def pretrained_path(storage: str, config: dict) -> str:
    from trainables.train import pretrain_settings  # torch: only where a study pre-trains

    return join(storage, "pretrained", f"{settings_hash(pretrain_settings(config))}.pt")


def exists(path: str) -> bool:
    fs, fs_path = filesystem_and_path(path)
    return fs.get_file_info(fs_path).type != pafs.FileType.NotFound


def load(path: str) -> dict | None:
    """The stored pre-training at `path`, or None if there is none. Raises UserError (one line) for
    a file torch.load(weights_only=True) refuses (corrupt, or a pickle that would run code)."""
    import torch

    fs, fs_path = filesystem_and_path(path)
    if fs.get_file_info(fs_path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(fs_path) as stream:
        payload = stream.read()
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise UserError(
            f"corrupt SSL pre-training checkpoint {path} ({type(err).__name__}); delete it and re-run: "
            f"it will be trained again"
        ) from None


def train_and_store(path: str, config: dict, data_dir: str | None, device: str = "auto", progress=None) -> dict:
    """Pre-train (trainables.train.pretrain_rotation; `progress(epoch, loss)` after each epoch) and
    write the state to `path` atomically."""
    import torch

    from trainables.train import pretrain_rotation

    state = pretrain_rotation(config, data_dir=data_dir, device=device, progress=progress)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs, fs_path = filesystem_and_path(path)
    folder, name = fs_path.rsplit("/", 1)
    write_atomic(fs, folder, name, buffer.getvalue())
    return state


def load_or_train(storage: str, config: dict, data_dir: str | None, log=print) -> tuple[dict, bool]:
    """A trial's pre-trained state and whether the trial trained it (only a setting the driver's
    stage could not plan, see the module docstring)."""
    path = pretrained_path(storage, config)
    state = load(path)
    if state is not None:
        return state, False
    log(f"SSL pre-training {path}")
    trained = train_once(path, config, data_dir, log)
    return load(path), trained


# ----------------------------------------------------------------------------- the driver's stage


@dataclass
class Pretraining:
    """One distinct pre-training setting: its file, a configuration that has it, the cells needing it."""

    path: str
    config: dict
    cells: list[str] = field(default_factory=list)  # config hashes
    error: str | None = None  # one line, when its training failed


def depends_on(config: dict, keys) -> bool:
    """Whether one of `keys` (e.g. the settings a search samples) is a setting of the pre-training."""
    from trainables.train import pretrain_settings

    return bool(set(keys) & (set(pretrain_settings(config)) | {"val_subset"}))


def needed(storage: str, configs: list[tuple[str, dict]]) -> list[Pretraining]:
    """The distinct pre-trainings that the (config hash, config) pairs need and storage lacks."""
    by_path: dict[str, Pretraining] = {}
    for chash, config in configs:
        if config["init"] != INIT:
            continue
        path = pretrained_path(storage, config)
        by_path.setdefault(path, Pretraining(path, config)).cells.append(chash)
    return [p for p in by_path.values() if not exists(p.path)]


@dataclass(frozen=True)
class _TaskResult:
    trained: bool = False  # False without an error: another invocation stored it meanwhile
    error: str | None = None  # one line: the pre-training failed
    setup_error: str | None = None  # a dataset the node cannot fetch: the study stops (trial_setup)


def train_once(path: str, config: dict, data_dir: str | None, log=print) -> bool:
    """Train and store the pre-training at `path` unless another process (another invocation of a
    study on the same storage) holds its lease (cell_lease.Lease, beside the file) and stores it
    meanwhile; whether this process trained it."""
    folder, name = path.rsplit("/", 1)
    lease = Lease(f"{folder}/.lease-{name.removesuffix('.pt')}.json", lambda: exists(path),
                  f"SSL pre-training {path}")
    if not lease.acquire(log):
        return False
    try:
        train_and_store(path, config, data_dir, progress=lambda epoch, loss: lease.renew())
    finally:
        lease.release()
    return True


def _pretrain_task(path: str, config: dict, data_dir: str | None, cpus: float) -> _TaskResult:
    """`train_once` in a Ray worker, its failures as values."""
    import torch

    from trainables.datafiles import DatasetUnavailable

    torch.set_num_threads(max(1, int(cpus)))
    try:
        return _TaskResult(trained=train_once(path, config, data_dir, log=lambda line: print(line, flush=True)))
    except DatasetUnavailable as err:
        return _TaskResult(setup_error=str(err))
    except Exception as err:  # noqa: BLE001 - reported with the setting; its cells are not run
        return _TaskResult(error=last_line(err))


def pretrain_missing(missing: list[Pretraining], resources: dict, data_dir: str | None, *,
                     max_concurrent: int | None, max_retries: int, log, wait_step=None) -> int:
    """Train each of `missing` once, as a Ray task with a trial's `resources` ({"cpu", "gpu"}), at
    most `max_concurrent` at a time; a node lost under a task retries it up to `max_retries` times.
    A failed one gets its `error` line (and is logged); returns how many were trained. Raises
    UserError for a dataset a node cannot fetch (a set-up error: no other pre-training or trial
    would fare better). `wait_step()` is called every few seconds while tasks run."""
    import ray

    task = ray.remote(_pretrain_task).options(
        num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=max_retries)
    queue, running, trained = list(missing), {}, 0
    while queue or running:
        while queue and (max_concurrent is None or len(running) < max_concurrent):
            p = queue.pop(0)
            log(f"SSL pre-training {p.path} ({len(p.cells)} cell(s) need it)")
            running[task.remote(p.path, p.config, data_dir, resources["cpu"])] = (p, time.monotonic())
        done, _ = ray.wait(list(running), num_returns=1, timeout=10.0)
        if wait_step is not None:
            wait_step()
        for ref in done:
            p, started = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:  # its worker died more than max_retries times
                result = _TaskResult(error=last_line(err))
            if result.setup_error:
                for other in running:
                    ray.cancel(other, force=True)
                raise UserError(result.setup_error)
            if result.error:
                p.error = f"SSL pre-training {p.path} failed ({result.error})"
                log(f"{p.error}; the {len(p.cells)} cell(s) that need it are not run")
            elif result.trained:
                trained += 1
                log(f"SSL pre-training {p.path} done in {time.monotonic() - started:.0f} s")
            else:
                log(f"SSL pre-training {p.path} was stored by another invocation; using it")
    return trained
