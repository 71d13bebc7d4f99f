"""One trainer per piece of work across invocations: a lease file next to what the work stores.

Two invocations of a study on the same storage may start the same cell, or need the same SSL
pre-training. The process that finds no live lease writes its own (`.lease-<hash>.json`: owner
`liveness.this_owner()` and a heartbeat it renews every epoch) and trains; one that finds a live
lease waits for the work's product (the cell's results, the pre-trained file) and reuses it. A lease
whose owner is gone (`liveness.is_alive`) is taken over. The file is hidden (leading dot), so
results readers never see it.
"""
from __future__ import annotations

import json
import time
from typing import Callable

from . import liveness, results, storage as storage_mod

SETTLE_S = 1.0  # after writing a lease, read it back this much later: of two writers, the last one wins


class Lease:
    """The lease at `path` on the work named `what`, whose product (`product`, as the wait is
    announced) exists once `done()` is true."""

    def __init__(self, path: str, done: Callable[[], bool], what: str, product: str = "it"):
        self.location, self.done, self.what, self.product = path, done, what, product
        self.fs, self.path = storage_mod.filesystem_and_path(path)
        self.owner = liveness.this_owner()

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{self.path}.{self.owner.replace(':', '-')}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps({"owner": self.owner, "heartbeat": time.time()}).encode())
        self.fs.move(tmp, self.path)

    def acquire(self, log, poll_s: float = 2.0) -> bool:
        """True: this process does the work (it holds the lease). False: its product was stored
        meanwhile by another (live) holder; waits for it as long as that holder lives."""
        waited = False
        while True:
            if self.done():
                return False
            lease = self._read()
            if lease and lease.get("owner") != self.owner and liveness.is_alive(lease.get("owner"), lease.get("heartbeat")):
                if not waited:
                    log(f"{self.what} is being trained by {lease['owner']}; waiting for {self.product}")
                    waited = True
                time.sleep(poll_s)
                continue
            if self._claim(lease):
                return True

    def _claim(self, seen: dict | None) -> bool:
        """Write this process's lease over ``seen`` (none, its own or a dead owner's); whether it holds."""
        if not storage_mod.is_uri(self.location):  # local disk: an exclusive create decides at once
            import os

            if seen is not None:
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False  # another trial claimed it first: look again
            with os.fdopen(fd, "w") as f:
                json.dump({"owner": self.owner, "heartbeat": time.time()}, f)
            return True
        self._write()  # object stores: no exclusive create; of two writers the last one wins
        time.sleep(SETTLE_S)
        lease = self._read()
        return bool(lease and lease.get("owner") == self.owner)

    def renew(self) -> None:
        try:
            self._write()
        except OSError:
            pass  # the next renewal tries again; meanwhile the pid check keeps the lease on this host

    def release(self) -> None:
        lease = self._read()
        if lease and lease.get("owner") == self.owner:
            try:
                self.fs.delete_file(self.path)
            except OSError:
                pass


class CellLease(Lease):
    """The lease on training one cell of a study (its results: results.write_trial)."""

    def __init__(self, storage: str, study: str, config_hash: str):
        super().__init__(f"{results.study_dir(storage, study)}/.lease-{config_hash}.json",
                         lambda: config_hash in results.completed_hashes(storage, study), f"cell {config_hash}",
                         "its results")
