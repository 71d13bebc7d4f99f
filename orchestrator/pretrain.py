"""SSL pre-training as a shared dependency: trained once per settings, reused by every trial.

The backbone lives at `{storage}/pretrained/{hash}.pt`, keyed by the hash of
`trainables.train.pretrain_settings`, so later studies reuse it too. A detached Ray actor on the
head node (never a spot worker) hands out one lease per hash across the whole cluster: the first
trial that needs a pre-training trains it while the others wait for the file. The holder renews
its lease while it trains, so a lease whose trial was killed expires and another trial takes over.
"""
from __future__ import annotations

import io
import threading
import time

import pyarrow.fs as pafs
import ray
import torch

from trainables.train import pretrain_rotation, pretrain_settings

from .errors import UserError
from .spec import settings_hash
from .storage import filesystem_and_path, join

LEASE_SECONDS = 120.0
RENEW_SECONDS = 20.0
COORDINATOR_NAME = "sslrobust_pretrain_leases"
COORDINATOR_NAMESPACE = "sslrobust"


@ray.remote(num_cpus=0, max_restarts=-1)
class PretrainLeases:
    """Cluster-wide leases: at most one live holder per pre-training hash."""

    def __init__(self):
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, lease_seconds: float) -> bool:
        now = time.time()
        current = self.leases.get(key)
        if current is None or current[0] == holder or current[1] < now:
            self.leases[key] = (holder, now + lease_seconds)
            return True
        return False

    def renew(self, key: str, holder: str, lease_seconds: float) -> bool:
        current = self.leases.get(key)
        if current is None or current[0] != holder:
            return False
        self.leases[key] = (holder, time.time() + lease_seconds)
        return True

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]

    def node_id(self) -> str:
        """The Ray node this coordinator runs on (the head's)."""
        return ray.get_runtime_context().get_node_id()


# Every Ray head advertises this resource (ray._common.constants.HEAD_NODE_RESOURCE_NAME). The
# coordinator lives on the head: on a spot worker, a preemption would drop every lease it holds.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def coordinator():
    return PretrainLeases.options(
        name=COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={HEAD_NODE_RESOURCE: 0.001},
        scheduling_strategy="DEFAULT",  # not inside the calling trial's placement group
    ).remote()


def pretrained_path(storage: str, config: dict) -> str:
    return join(storage, "pretrained", f"{settings_hash(pretrain_settings(config))}.pt")


def _read(path: str) -> dict | None:
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


def _write_atomically(path: str, state: dict) -> None:
    fs, fs_path = filesystem_and_path(path)
    parent = fs_path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = f"{parent}/.{fs_path.rsplit('/', 1)[1]}.tmp-{time.time_ns()}"
    with fs.open_output_stream(tmp) as stream:
        stream.write(buffer.getvalue())
    fs.move(tmp, fs_path)


def ensure_pretrained(storage: str, config: dict, holder: str, data_dir: str | None = None,
                      device: str = "auto", log=print) -> tuple[dict, bool]:
    """Return (pre-trained state, trained_here); trains it only if nobody has or is doing so."""
    path = pretrained_path(storage, config)
    key = path
    leases = coordinator()
    waited = False
    while True:
        state = _read(path)
        if state is not None:
            return state, False
        if ray.get(leases.acquire.remote(key, holder, LEASE_SECONDS)):
            break
        if not waited:
            log(f"waiting for another trial to finish SSL pre-training {path}")
            waited = True
        time.sleep(2.0)
    stop = threading.Event()

    def renew():
        while not stop.wait(RENEW_SECONDS):
            leases.renew.remote(key, holder, LEASE_SECONDS)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        state = _read(path)  # someone may have finished between our check and the lease
        if state is not None:
            return state, False
        log(f"SSL pre-training {path}")
        state = pretrain_rotation(config, data_dir=data_dir, device=device)
        _write_atomically(path, state)
        return state, True
    finally:
        stop.set()
        ray.get(leases.release.remote(key, holder))
