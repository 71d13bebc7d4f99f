"""One trainer per cell across invocations: a lease file next to the cell's results.

Two invocations of a study on the same storage may start the same cell. The trial that finds no
live lease writes its own (`.lease-<hash>.json`: owner `liveness.this_owner()` and a heartbeat it
renews every epoch) and trains; a trial that finds a live one waits for the cell's results and
reuses them. A lease whose owner is gone (`liveness.is_alive`) is taken over. The file is hidden
(leading dot), so results readers never see it.
"""
from __future__ import annotations

import json
import time

from . import liveness, results, storage as storage_mod

SETTLE_S = 1.0  # after writing a lease, read it back this much later: of two writers, the last one wins


class CellLease:
    def __init__(self, storage: str, study: str, config_hash: str):
        self.storage, self.study, self.config_hash = storage, study, config_hash
        self.fs, self.path = storage_mod.filesystem_and_path(
            f"{results.study_dir(storage, study)}/.lease-{config_hash}.json")
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
        """True: this process trains the cell (it holds the lease). False: the cell's results were
        written meanwhile by another (live) holder; waits for them as long as it lives."""
        waited = False
        while True:
            if self.config_hash in results.completed_hashes(self.storage, self.study):
                return False
            lease = self._read()
            if lease and lease.get("owner") != self.owner and liveness.is_alive(lease.get("owner"), lease.get("heartbeat")):
                if not waited:
                    log(f"cell {self.config_hash} is being trained by {lease['owner']}; waiting for its results")
                    waited = True
                time.sleep(poll_s)
                continue
            if self._claim(lease):
                return True

    def _claim(self, seen: dict | None) -> bool:
        """Write this process's lease over ``seen`` (none, its own or a dead owner's); whether it holds."""
        if not storage_mod.is_uri(self.storage):  # local disk: an exclusive create decides at once
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
