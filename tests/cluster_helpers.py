"""Real processes for tests: Ray nodes started with `ray start`, an `mlflow server`, CLI drivers.

Everything here is built around :class:`ProcessScope`. Every process a scope starts runs in a new
session (its own process group) with two extra environment variables, ``SSLROBUST_TEST_SCOPE``
(a token unique to the scope) and ``SSLROBUST_TEST_TAG`` (which part of the test it belongs to,
e.g. ``node_b``). Descendants inherit them, including the Ray daemons that ``ray start`` leaves
behind and the Ray worker processes a raylet forks later (their process titles no longer show
any path, but their environment still carries the token). :meth:`ProcessScope.kill` finds the
processes by that token (and by the scope's temp dirs in their command line, and by the process
groups it started) by reading ``/proc``, so it stops exactly what the test started:

* never ``ray stop``, which kills every Ray process of the machine, including other tests'
  clusters and a user's own;
* a scope's context manager kills everything on exit, also when the test failed or timed out.

Typical use (see tests/test_multinode.py)::

    with ProcessScope("multinode") as scope, \\
            MlflowServer(scope, tmp_path / "mlflow") as server, \\
            LocalRayCluster(scope) as cluster:
        cluster.start_head(num_cpus=1, resources={"node_a": 1})
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        server.wait_ready()
        code = scope.run([sys.executable, "-m", "orchestrator.study", ...], tmp_path / "driver.log",
                         timeout=300, tag="driver", env=cluster.env())  # the token, for --address
        cluster.kill_node("node_b")          # a fault: SIGKILL one node's raylet and workers
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, name="node_b2")

Linux only (``/proc``).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

SCOPE_ENV = "SSLROBUST_TEST_SCOPE"
TAG_ENV = "SSLROBUST_TEST_TAG"
RAY_BIN = str(Path(sys.executable).with_name("ray"))
MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))
# Unix socket paths (Ray's raylet and plasma sockets live under the temp dir) must stay below
# ~107 bytes, so Ray's temp dirs are made directly under /tmp, never under pytest's tmp_path.
SHORT_TMP_ROOT = "/tmp"


# --------------------------------------------------------------------------------------------
# ports and temp dirs
# --------------------------------------------------------------------------------------------

def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports that were free a moment ago (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


@contextlib.contextmanager
def short_tmp_dir(prefix: str = "srt-"):
    """A fresh directory directly under /tmp (short enough for Ray's unix sockets), removed on exit
    unless SSLROBUST_KEEP_TEST_DIRS=1 (then its path is printed, for post-mortems)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SHORT_TMP_ROOT))
    try:
        yield path
    finally:
        if os.environ.get("SSLROBUST_KEEP_TEST_DIRS") == "1":
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def tail(path: Path | str, chars: int = 4000) -> str:
    """The end of a log file ('' if it does not exist), for assertion messages."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours
        return b""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a live process, None if it is gone."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # the command name may contain spaces and ')'
    return fields[0].decode(), int(fields[2])


def _pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


# --------------------------------------------------------------------------------------------
# the scope
# --------------------------------------------------------------------------------------------

class ProcessScope:
    """Starts processes and guarantees they (and their descendants) are stopped.

    Membership of a live, non-zombie process (other than this Python process):
    its environment holds ``SSLROBUST_TEST_SCOPE=<token>``, or it is in a process group the scope
    started, or its command line contains one of the scope's paths (:meth:`add_path`).
    """

    def __init__(self, name: str = "test"):
        self.token = f"{name}-{os.getpid()}-{secrets.token_hex(6)}"
        self._env_needle = f"{SCOPE_ENV}={self.token}".encode()
        self._groups: dict[int, tuple[str, subprocess.Popen]] = {}  # pgid -> (tag, its leader)
        self._paths: dict[bytes, str] = {}  # path -> tag
        self.closed = False

    # -- starting
    def env(self, tag: str = "", extra: dict | None = None, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)  # None unsets a variable
            else:
                env[key] = str(value)
        env[SCOPE_ENV] = self.token
        env[TAG_ENV] = tag
        return env

    def add_path(self, path: Path | str, tag: str = "") -> None:
        """Processes whose command line contains `path` belong to the scope (with that tag)."""
        self._paths[str(path).encode()] = tag

    def popen(self, cmd: Sequence[str], log: Path | str, tag: str = "", env: dict | None = None,
              cwd: Path | str | None = None, stderr_log: Path | str | None = None) -> subprocess.Popen:
        """Start cmd in its own session with stdout (and stderr, unless `stderr_log` is given)
        appended to `log`.

        `env` is applied on top of os.environ (a value None unsets that variable); the scope's own
        two variables are always set.
        """
        if self.closed:
            raise RuntimeError("this ProcessScope has been closed")
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(log, "ab"))
            err = files.enter_context(open(stderr_log, "ab")) if stderr_log else subprocess.STDOUT
            proc = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, cwd=cwd, env=self.env(tag, env),
                                    start_new_session=True)
        self._groups[proc.pid] = (tag, proc)
        return proc

    def run(self, cmd: Sequence[str], log: Path | str, timeout: float, tag: str = "",
            env: dict | None = None, cwd: Path | str | None = None,
            stderr_log: Path | str | None = None) -> int:
        """popen and wait; returns the exit code. On timeout kills the tag's processes and raises
        TimeoutError naming the command, with the end of its log."""
        proc = self.popen(cmd, log, tag=tag, env=env, cwd=cwd, stderr_log=stderr_log)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if tag:
                self.kill(tag=tag)
            else:
                _kill_pids(self._group_members(proc.pid))
            proc.wait(timeout=10)
            logs = "".join(f"\n--- end of {f}:\n{tail(f)}" for f in (log, stderr_log) if f)
            raise TimeoutError(f"{' '.join(map(str, cmd))} did not finish within {timeout:g} s{logs}") from None

    # -- finding
    def _group_members(self, pgid: int) -> set[int]:
        return {pid for pid in _pids() if (st := _stat(pid)) and st[1] == pgid and st[0] != "Z"}

    def pids(self, tag: str | None = None) -> set[int]:
        """Live members of the scope; with `tag`, only those started under that tag."""
        me = os.getpid()
        found = set()
        live_groups = set()
        for pid in _pids():
            if pid == me:
                continue
            st = _stat(pid)
            if st is None or st[0] == "Z":
                continue
            live_groups.add(st[1])
            environ = _read(f"/proc/{pid}/environ")
            if self._env_needle in environ:
                if tag is None:
                    found.add(pid)
                    continue
                own = [v for v in environ.split(b"\0") if v.startswith(TAG_ENV.encode() + b"=")]
                if own and own[0] == f"{TAG_ENV}={tag}".encode():
                    found.add(pid)
                    continue
            if st[1] in self._groups and (tag is None or self._groups[st[1]][0] == tag):
                found.add(pid)
                continue
            if self._paths:
                cmdline = _read(f"/proc/{pid}/cmdline")
                if any(p in cmdline and (tag is None or t == tag) for p, t in self._paths.items()):
                    found.add(pid)
        # Forget groups that are over (leader reaped, no member left): their number may be reused
        # by an unrelated process group later.
        for pgid, (_, leader) in list(self._groups.items()):
            if pgid not in live_groups and leader.poll() is not None:
                del self._groups[pgid]
        return found

    # -- stopping
    def kill(self, tag: str | None = None, grace: float = 3.0, sig: int = signal.SIGTERM) -> set[int]:
        """Stop the scope's processes (or one tag's): `sig`, up to `grace` seconds for them to
        exit, then SIGKILL until none is left (new ones started meanwhile are caught too).
        Returns the pids that would not die (empty unless something is badly wrong)."""
        deadline = time.monotonic() + grace
        first = self.pids(tag)
        _kill_pids(first, sig)
        while first and time.monotonic() < deadline:
            time.sleep(0.1)
            first = self.pids(tag)
        deadline = time.monotonic() + 15.0
        left = self.pids(tag)
        while left and time.monotonic() < deadline:
            _kill_pids(left, signal.SIGKILL)
            time.sleep(0.1)
            left = self.pids(tag)
        return left

    def close(self) -> None:
        """Kill every process of the scope. Safe to call twice."""
        left = self.kill()
        self.closed = True
        if left:
            print(f"WARNING: ProcessScope {self.token}: processes {sorted(left)} survived SIGKILL",
                  file=sys.stderr)

    def __enter__(self) -> "ProcessScope":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# --------------------------------------------------------------------------------------------
# mlflow server
# --------------------------------------------------------------------------------------------

class MlflowServer:
    """`mlflow server --host 127.0.0.1 --port <free> --backend-store-uri sqlite:///<workdir>/mlflow.db`
    in a scope (artifacts are served by it from <workdir>/mlartifacts).

    ``start()`` returns at once (the server takes 10-30 s to come up on a busy machine, so start it
    first and do other work); ``wait_ready()`` waits for ``/health``."""

    def __init__(self, scope: ProcessScope, workdir: Path | str, port: int | None = None,
                 tag: str = "mlflow"):
        self.scope = scope
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.tag = tag
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = self.scope.popen(
            [MLFLOW_BIN, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}"],
            self.log, tag=self.tag, cwd=self.workdir)
        return self

    def wait_ready(self, timeout: float = 90.0) -> "MlflowServer":
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server at {self.uri} not up within {timeout:g} s:\n{tail(self.log)}")

    def stop(self) -> None:
        self.scope.kill(tag=self.tag)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Ray nodes
# --------------------------------------------------------------------------------------------

@dataclass
class RayNode:
    name: str  # also the scope tag of its processes
    temp_dir: Path
    num_cpus: int
    resources: dict
    log: Path
    head: bool
    ports: dict = field(default_factory=dict)
    node_id: str | None = None  # filled by LocalRayCluster.nodes()


ROOT_TAG = "ray-temp-dir"


class LocalRayCluster:
    """A Ray cluster of several nodes on this machine, each a separate `ray start` (its own raylet,
    object store and workers), with token authentication (a fresh random token in the
    environment: ~/.ray/auth_token is neither read nor written).

    What two raylets on one machine need (Ray 2.60), beyond separate --temp-dir:

    * ``--dashboard-agent-listen-port``: fixed at 52365 by default, so a second node (or any other
      Ray on the machine) collides; every node gets a free port;
    * ``--min-worker-port=0 --max-worker-port=0``: workers bind random ports instead of sharing
      10002-19999 between raylets;
    * node manager, object manager, metrics export, runtime env agent and dashboard agent gRPC
      ports are 0 (random) by default and need nothing;
    * the head: a free ``--port`` (GCS), ``--include-dashboard=false`` (else 8265) and no Ray
      client server (only with ray[client], port 10001).

    ``stop()`` (and leaving the ``with`` block) kills every node's processes through the scope;
    ``kill_node(name)`` kills one node (a fault), leaving the others up.
    """

    def __init__(self, scope: ProcessScope, object_store_mb: int = 150, start_timeout: float = 120.0,
                 node_env: dict | None = None):
        """`node_env`: variables every `ray start` gets, and with it every Ray worker process (trials),
        as env.sh's exports do on a real cluster."""
        self.scope = scope
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.nodes_by_name: dict[str, RayNode] = {}
        self.address: str | None = None
        self._auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                      "RAY_USAGE_STATS_ENABLED": "0"}
        self.node_env = dict(node_env or {})
        self._tmp_cm = short_tmp_dir("srt-ray-")
        self.root: Path | None = None

    # -- environment for anything that talks to the cluster (drivers, `ray status`, ...)
    def env(self, extra: dict | None = None) -> dict:
        """Variables to add to a driver's environment (pass to ProcessScope.popen/run `env`)."""
        return {**self._auth, **(extra or {})}

    def _start(self, name: str, head: bool, num_cpus: int, resources: dict | None) -> RayNode:
        if self.root is None:
            self.root = self._tmp_cm.__enter__()
            self.scope.add_path(f"{self.root}/", tag=ROOT_TAG)  # any process naming our temp dir
        if name in self.nodes_by_name:
            raise ValueError(f"a node named {name!r} exists already")
        temp_dir = self.root / name
        temp_dir.mkdir()
        self.scope.add_path(f"{temp_dir}/", tag=name)
        gcs_port, agent_port = free_ports(2)
        node = RayNode(name=name, temp_dir=temp_dir, num_cpus=num_cpus, resources=dict(resources or {}),
                       log=self.root / f"{name}.log", head=head, ports={"dashboard_agent_listen": agent_port})
        cmd = [RAY_BIN, "start", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--resources={json.dumps(node.resources)}", f"--temp-dir={temp_dir}",
               f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
               f"--dashboard-agent-listen-port={agent_port}", "--min-worker-port=0", "--max-worker-port=0",
               "--disable-usage-stats"]
        if head:
            node.ports["gcs"] = gcs_port
            cmd += ["--head", f"--port={gcs_port}", "--include-dashboard=false"]
        else:
            if self.address is None:
                raise RuntimeError("start_head() first")
            cmd += [f"--address={self.address}"]
        self.nodes_by_name[name] = node
        code = self.scope.run(cmd, node.log, timeout=self.start_timeout, tag=name, env={**self.node_env, **self._auth})
        if code != 0:
            raise RuntimeError(f"`ray start` for node {name} exited with {code}:\n{tail(node.log)}")
        if head:
            written = temp_dir / "ray_current_cluster"  # the address as Ray announces it
            self.address = (written.read_text().strip() if written.exists() else "") or f"127.0.0.1:{gcs_port}"
        return node

    def start_head(self, num_cpus: int = 1, resources: dict | None = None, name: str = "head") -> RayNode:
        return self._start(name, True, num_cpus, resources)

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, name: str | None = None) -> RayNode:
        return self._start(name or f"node{len(self.nodes_by_name)}", False, num_cpus, resources)

    # -- inspecting (in a subprocess: the test process keeps no Ray connection or auth state)
    def nodes(self, wait_for: int = 0, timeout: float = 60.0) -> list[dict]:
        """Ray's node table, `[{"node_id", "alive", "resources"}]`, after waiting (up to timeout) for
        at least `wait_for` alive nodes. Fills in RayNode.node_id by the nodes' custom resources."""
        script = (
            "import json, sys, time, ray\n"
            "ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
            "deadline = time.monotonic() + float(sys.argv[2])\n"
            "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[3]) and time.monotonic() < deadline:\n"
            "    time.sleep(0.5)\n"
            "print('NODES_JSON=' + json.dumps([{'node_id': n['NodeID'], 'alive': n['Alive'],\n"
            "      'resources': n['Resources']} for n in ray.nodes()]), flush=True)\n"
        )
        log = self.root / "nodes-query.log"
        log.write_text("")
        code = self.scope.run([sys.executable, "-c", script, self.address, str(timeout), str(wait_for)],
                              log, timeout=timeout + 60, tag="nodes-query", env=self._auth)
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("NODES_JSON=")]
        if code != 0 or not lines:
            raise RuntimeError(f"could not list the nodes of {self.address} (exit {code}):\n{tail(log)}")
        table = json.loads(lines[-1][len("NODES_JSON="):])
        for node in self.nodes_by_name.values():
            mine = [n for n in table if n["alive"] and node.resources
                    and all(n["resources"].get(k) == v for k, v in node.resources.items())]
            if len(mine) == 1:
                node.node_id = mine[0]["node_id"]
        return table

    # -- stopping
    def kill_node(self, name: str, sig: int = signal.SIGKILL, grace: float = 0.0) -> None:
        """Stop one node's processes (raylet, agents, its Ray workers; for the head also the GCS):
        SIGKILL at once by default, like a machine that dies."""
        left = self.scope.kill(tag=name, grace=grace, sig=sig)
        if left:
            raise RuntimeError(f"node {name}: processes {sorted(left)} survived SIGKILL")

    def stop(self) -> None:
        """Stop every node (workers first) and remove the temp dirs. Safe to call twice."""
        for name in reversed(list(self.nodes_by_name)):
            self.scope.kill(tag=name, grace=3.0)
        self.scope.kill(tag="nodes-query", grace=0.0)
        self.scope.kill(tag=ROOT_TAG, grace=0.0)  # anything else naming the temp dir
        if self.root is not None:
            self._tmp_cm.__exit__(None, None, None)
            self.root = None

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
