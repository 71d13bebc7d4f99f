"""Is the process that owns something (an MLflow parent run, a cell being trained) still alive?

An owner is ``host:pid:start`` (start: the process's start time in clock ticks since boot, from
/proc, so a reused pid is not taken for the old process) plus a heartbeat (Unix seconds) that the
owner renews while it works. On the owner's own host the pid decides; elsewhere the heartbeat does:
an owner whose heartbeat is older than STALE_AFTER_S is gone.
"""
from __future__ import annotations

import os
import socket
import time

HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 300.0


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # the command name (field 2) may hold spaces: count fields after its closing parenthesis
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def this_owner() -> str:
    """``host:pid:start`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _pid_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not start or not os.path.exists(f"/proc/{pid}") or _start_ticks(pid) == start


def is_alive(owner: str | None, heartbeat: float | str | None, now: float | None = None) -> bool:
    """Whether ``owner`` (from `this_owner`, maybe of another host) still lives. Without an owner
    (records from before owners were kept) only a fresh heartbeat counts."""
    host, pid, start = (owner.split(":", 2) + ["", "", ""])[:3] if owner else ("", "", "")
    if host == socket.gethostname() and pid.isdigit():
        return _pid_alive(int(pid), start)
    try:
        beat = float(heartbeat)
    except (TypeError, ValueError):
        return False
    return (now if now is not None else time.time()) - beat < STALE_AFTER_S
