"""Faults, done for real: nothing lost, nothing duplicated.

* a trial's Ray worker is SIGKILLed mid-training: the trial retries from its last checkpoint;
* the study's driver is SIGKILLed mid-study: `--resume`, and separately a plain re-run, finish the
  rest without re-running finished trials, and no MLflow run stays RUNNING;
* the MLflow server dies mid-study: the trials finish, their Parquet files are written, the end of
  the run prints the `--backfill-tracking` command, which then logs every trial once;
* a Parquet write is SIGKILLed half-way: readers never see the partial file;
* checkpoints load with `weights_only=True`: a pickle bomb is refused, named, never run;
* the servers a study starts (Ray's dashboard) listen on 127.0.0.1.

Each study runs through the real command line (`python -m orchestrator.study`) in a subprocess with
its own working directory, studies folder and Ray temp dir (RAY_TMPDIR, a short unique path), so
the Ray processes a test starts are found, and cleaned up, by that path alone.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import results

ROOT = Path(__file__).resolve().parents[1]
EPS = [0.0, 0.1]
TINY = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=192, test_subset=48, epochs=3, batch_size=64,
    ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1, train_attack_steps=1,
    eval_attack_steps=1, eval_eps_linf=EPS,
)
# Settings that must not leak into the subprocesses from the developer's shell.
SCRUBBED_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SSLROBUST_STORAGE", "SSLROBUST_DATA_DIR", "RAY_TMPDIR")


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment contains `text` (e.g. a test's unique RAY_TMPDIR)."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if needle in _read(f"/proc/{entry}/cmdline") or needle in _read(f"/proc/{entry}/environ"):
            found.append(int(entry))
    return found


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _tcp_listeners() -> dict[int, tuple[str, int]]:
    """socket inode -> (local address, port) of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in _read(table).decode().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            out[int(fields[9])] = (addr, int(port_hex, 16))
    return out


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    listeners = _tcp_listeners()
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match and int(match.group(1)) in listeners:
            found.add(listeners[int(match.group(1))])
    return found


def is_loopback(addr: str) -> bool:
    return addr in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or addr.startswith("127.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, proc=None, logs=None, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited (rc {proc.returncode}) before {what}\n{logs() if logs else ''}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs() if logs else ''}")


# --------------------------------------------------------------------------------------------
# a study workspace: its own cwd, studies folder, storage, sqlite MLflow store and Ray temp dir
# --------------------------------------------------------------------------------------------

class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.studies = root / "studies"
        self.studies.mkdir(parents=True, exist_ok=True)
        # Short: Ray's unix socket paths live under it and must fit in 107 bytes.
        self.ray_tmp = tempfile.mkdtemp(prefix="sslrt-", dir="/tmp")
        self.procs: list[subprocess.Popen] = []

    storage = property(lambda self: self.root / "runs")
    tracking_uri = property(lambda self: f"sqlite:///{self.root / 'mlflow.db'}")

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(SSLROBUST_STUDIES_DIR=str(self.studies), RAY_TMPDIR=self.ray_tmp, PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def write_study(self, name: str, factors: dict, seeds=(0,), **fixed) -> None:
        body = {"description": f"fault test {name}", "factors": factors, "seeds": list(seeds),
                "fixed": {**TINY, **fixed}, "resources": {"cpu": 1, "gpu": 0}, "max_failures": 2}
        (self.studies / f"{name}.yaml").write_text(json.dumps(body))

    def start(self, *args: str, log: str = "run", env: dict | None = None) -> subprocess.Popen:
        with open(self.root / f"{log}.out", "w") as out, open(self.root / f"{log}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator.study", *args], cwd=self.root,
                                    env=env or self.env(), stdout=out, stderr=err, start_new_session=True)
        proc.log = log
        self.procs.append(proc)
        return proc

    def logs(self, log: str) -> tuple[str, str]:
        read = lambda suffix: (self.root / f"{log}.{suffix}").read_text(errors="replace")  # noqa: E731
        return read("out"), read("err")

    def tail(self, log: str, lines: int = 40) -> str:
        out, err = self.logs(log)
        return ("--- stdout\n" + "\n".join(out.splitlines()[-lines:]) +
                "\n--- stderr\n" + "\n".join(err.splitlines()[-lines:]))

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(proc)
            raise AssertionError(f"`{' '.join(proc.args[3:])}` took over {timeout:g} s\n{self.tail(proc.log)}")
        return (rc, *self.logs(proc.log))

    def run(self, *args: str, log: str = "run", timeout: float = 300) -> tuple[int, str, str]:
        return self.finish(self.start(*args, log=log), timeout)

    @staticmethod
    def kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def ray_processes(self) -> list[int]:
        return processes_mentioning(self.ray_tmp)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill_group(proc)
        for _ in range(3):
            kill_all(self.ray_processes())
            time.sleep(0.2)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    # -- what the study left behind ---------------------------------------------------------
    def tune_files(self, study: str, pattern: str) -> list[Path]:
        return sorted(self.storage.glob(f"tune/{study}-*/*/{pattern}"))

    def result_files(self, study: str) -> dict[str, Path]:
        return {p.stem: p for p in (self.storage / "results" / study).glob("*.parquet")}


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    yield workspace
    workspace.cleanup()


def first_report(ws: Workspace, study: str) -> dict | None:
    """The first result Tune recorded for a trial of `study` (an epoch with its checkpoint)."""
    for path in ws.tune_files(study, "result.json"):
        lines = path.read_text().splitlines()
        if lines:
            try:
                return json.loads(lines[0])
            except ValueError:  # being written
                return None
    return None


def mlflow_runs(tracking_uri: str, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None, f"no MLflow experiment {study} at {tracking_uri}"
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def trial_runs_by_hash(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("sslrobust.role") == "trial":
            out.setdefault(run.data.tags["sslrobust.config_hash"], []).append(run)
    return out


def check_complete_results(ws: Workspace, study: str, hashes: set[str]):
    """Exactly one complete result per trial: every ε_test once, nothing else."""
    table = results.load(study, str(ws.storage))
    assert set(table["config_hash"]) == hashes
    assert not table.duplicated(list(results.KEY_COLUMNS)).any()
    for chash, rows in table.groupby("config_hash"):
        assert sorted(rows["eps_test"]) == EPS, chash
    return table


def check_one_finished_child_per_trial(runs, hashes: set[str]) -> dict[str, object]:
    by_hash = trial_runs_by_hash(runs)
    assert set(by_hash) == hashes
    finished = {}
    for chash, group in by_hash.items():
        done = [r for r in group if r.info.status == "FINISHED"]
        assert len(done) == 1, (chash, [r.info.status for r in group])
        finished[chash] = done[0]
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    return finished


# --------------------------------------------------------------------------------------------
# 1. a trial's worker process is SIGKILLed mid-training
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_of_a_trial_worker_resumes_from_its_last_checkpoint(ws):
    epochs = 4
    ws.write_study("wkill", {"ssl_weight": [0.5]}, epochs=epochs)
    proc = ws.start("wkill", log="wkill")
    # Tune records the trainable's pid with every result; the first result comes with the first
    # checkpoint (after epoch 1), so from here on a restart must not begin at epoch 0.
    report = wait_for(lambda: first_report(ws, "wkill"), 180, "the trial's first checkpointed epoch",
                      proc, lambda: ws.tail("wkill"))
    assert report["epoch"] == 1 and report["training_iteration"] == 1
    os.kill(report["pid"], signal.SIGKILL)

    rc, out, err = ws.finish(proc)
    assert rc == 0, ws.tail("wkill")
    assert "died" in out + err  # Ray saw the worker die (the retry is not a coincidence)
    resumed = re.findall(r"trial ([0-9a-f]{16}) resumes after epoch (\d+)", out)
    assert len(resumed) == 1, ws.tail("wkill")
    chash, epoch = resumed[0][0], int(resumed[0][1])
    assert 1 <= epoch <= epochs
    assert "trials run now: 1, skipped (results existed): 0, failed: 0" in out

    table = check_complete_results(ws, "wkill", {chash})
    client, runs = mlflow_runs(ws.tracking_uri, "wkill")
    run = check_one_finished_child_per_trial(runs, {chash})[chash]
    assert run.data.tags["sslrobust.attempt"] == "2"  # the retry reused the trial's run
    assert set(table["mlflow_run_id"]) == {run.info.run_id}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, epochs + 1))
    assert steps.count(1) == 1  # epoch 1 trained once: the retry started after it, not from epoch 0
    assert len(steps) <= epochs + 1  # at most the epoch in flight when the worker died is repeated


# --------------------------------------------------------------------------------------------
# 2. the driver is SIGKILLed mid-study
# --------------------------------------------------------------------------------------------

def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # an older checkpoint Tune just deleted
        return float("inf")


def _checkpoint_hash(trial_dir: Path) -> str | None:
    import torch

    for path in sorted(trial_dir.glob("checkpoint_*/trial_state.pt")):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["config_hash"]
        except Exception:  # noqa: BLE001 - being written when the driver died
            return None
    return None


@pytest.mark.slow
def test_sigkill_of_the_driver_then_resume_or_plain_rerun_finishes_the_rest(ws, tmp_path):
    ws.write_study("dkill", {"ssl_weight": [0.0, 0.5, 1.0]}, epochs=4)
    proc = ws.start("dkill", "--max-concurrent", "1", log="first")

    def mid_study():
        # A trial has finished, and a later one has a checkpoint that Tune's experiment state (what
        # --resume restores) already knows: the state was saved after that checkpoint was written.
        # (A finished trial keeps its last checkpoint, so it counts once among them.)
        done = ws.result_files("dkill")
        states = sorted(ws.storage.glob("tune/dkill-*/experiment_state-*.json"))
        if not done or not states:
            return False
        saved = _mtime(states[-1])
        known = {p.parent.parent for p in ws.tune_files("dkill", "checkpoint_*/trial_state.pt")
                 if _mtime(p) < saved}
        return len(known) > len(done)

    wait_for(mid_study, 180, "one finished trial and another one mid-training", proc, lambda: ws.tail("first"))

    # While it runs: the HTTP server this study's local Ray starts, its dashboard, is bound to
    # 127.0.0.1 (with ray[tune] alone it is the minimal dashboard, which opens no port at all).
    # Ray's own gRPC ports (GCS, raylet, workers) listen on every interface by Ray's design; Ray's
    # token authentication guards them.
    dashboards = [pid for pid in ws.ray_processes() if b"dashboard/dashboard.py" in _read(f"/proc/{pid}/cmdline")]
    assert dashboards, "the local Ray's dashboard process was not found"
    for pid in dashboards:
        assert b"--host=127.0.0.1\0" in _read(f"/proc/{pid}/cmdline")
        assert all(is_loopback(a) for a, _ in listening_addresses(pid)), listening_addresses(pid)

    ray_before = set(ws.ray_processes())
    assert ray_before, "the study's local Ray was not found by its RAY_TMPDIR"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A SIGKILLed driver cannot stop the Ray it started; some of it (dashboard and runtime-env
    # agents) outlives it. Clean up exactly that Ray: the processes that carry this RAY_TMPDIR.
    def ray_gone():
        alive = set(ws.ray_processes())
        kill_all(alive)
        return not alive

    wait_for(ray_gone, 30, "the killed driver's Ray processes to go away", interval=0.5)

    done_before = {h: (p.stat().st_mtime_ns, p.read_bytes()) for h, p in ws.result_files("dkill").items()}
    assert 1 <= len(done_before) < 3
    in_progress = {h for d in {p.parent.parent for p in ws.tune_files("dkill", "checkpoint_*/trial_state.pt")}
                   if (h := _checkpoint_hash(d)) and h not in done_before}
    _, runs = mlflow_runs(ws.tracking_uri, "dkill")
    assert any(r.info.status == "RUNNING" and r.data.tags.get("sslrobust.role") == "parent" for r in runs)

    # --resume with a grid that has a cell the interrupted run never started (λ = 2): refused before
    # anything starts, one line, nothing changed (Tune would restore the old grid and leave it out).
    files_before = {p: p.stat().st_mtime_ns for p in [*ws.storage.rglob("*"), ws.root / "mlflow.db"] if p.is_file()}
    rc, out, err = ws.run("dkill", "--max-concurrent", "1", "--resume", "--set", "ssl_weight=[0.0, 0.5, 1.0, 2.0]",
                          log="changed")
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out + err, ws.tail("changed")
    assert lines[0].startswith("error: --resume: the grid of dkill has 1 cell(s) that the interrupted run "), lines
    assert "(ssl_weight=2.0)" in lines[0] and "run without --resume" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in [*ws.storage.rglob("*"), ws.root / "mlflow.db"]
            if p.is_file()} == files_before

    # The same interrupted state twice: --resume here, a plain re-run in a copy.
    rerun = Workspace(tmp_path / "rerun")
    try:
        shutil.copytree(ws.storage, rerun.storage)
        shutil.copy2(ws.root / "mlflow.db", rerun.root / "mlflow.db")
        shutil.copytree(ws.studies, rerun.studies, dirs_exist_ok=True)
        resume = ws.start("dkill", "--max-concurrent", "1", "--resume", log="resume")
        plain = rerun.start("dkill", "--max-concurrent", "1", log="rerun")
        rc_resume, out_resume, _ = ws.finish(resume)
        rc_plain, out_plain, _ = rerun.finish(plain)

        # --resume: Tune restores the killed run; the finished trial is not trained again and the
        # one in flight continues from its checkpoint.
        assert rc_resume == 0, ws.tail("resume")
        assert "resuming " in out_resume
        for chash in in_progress:
            assert re.search(rf"trial {chash} resumes after epoch [1-9]", out_resume), ws.tail("resume")
        for chash in done_before:
            assert f"trial {chash} resumes" not in out_resume
        left = 3 - len(done_before)
        assert f"trials run now: {left}, skipped (results existed): {len(done_before)}, failed: 0" in out_resume

        # plain re-run: a new invocation runs the cells without results; it closes the dead
        # invocation's runs.
        assert rc_plain == 0, rerun.tail("rerun")
        assert f"3 trials, {len(done_before)} already done, {left} to run" in out_plain
        assert re.search(r"marked [1-9]\d* MLflow run\(s\) left RUNNING by an earlier, interrupted invocation "
                         r"as KILLED", out_plain)
        assert f"trials run now: {left}, skipped (results existed): {len(done_before)}, failed: 0" in out_plain

        for place in (ws, rerun):
            for chash, (mtime, data) in done_before.items():  # finished trials were not re-run
                path = place.result_files("dkill")[chash]
                assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
            all_hashes = set(place.result_files("dkill"))
            assert len(all_hashes) == 3
            check_complete_results(place, "dkill", all_hashes)
            _, runs = mlflow_runs(place.tracking_uri, "dkill")
            finished = check_one_finished_child_per_trial(runs, all_hashes)
            for chash in done_before:  # tracked once, by the killed invocation: never started again
                assert finished[chash].data.tags["sslrobust.attempt"] == "1"
                assert len(trial_runs_by_hash(runs)[chash]) == 1
            parents = [r for r in runs if r.data.tags.get("sslrobust.role") == "parent"]
            if place is ws:  # the killed invocation's parent run was reopened and ended
                assert [p.info.status for p in parents] == ["FINISHED"]
            else:  # the killed invocation's parent ended as KILLED, the new one FINISHED
                assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    finally:
        rerun.cleanup()


# --------------------------------------------------------------------------------------------
# 3. the worker node of a two-node cluster dies (needs tests/cluster_helpers.py)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "tests" / "cluster_helpers.py").exists(),
                    reason="needs tests/cluster_helpers.py (real two-node Ray clusters)")
def test_sigkill_of_a_worker_node_mid_study_retries_its_trial_from_the_checkpoint(tmp_path):
    from tests.cluster_helpers import LocalRayCluster, ProcessScope, tail

    workdir = tmp_path / "driver"
    ws = Workspace(workdir)  # only for the study file and the helpers that read what it left
    shutil.rmtree(ws.ray_tmp, ignore_errors=True)  # the cluster has its own temp dirs
    ws.write_study("nkill", {"ssl_weight": [0.0, 0.5]}, epochs=12)  # long enough that node b dies mid-training
    out_log, err_log = workdir / "nkill.out", workdir / "nkill.err"
    logs = lambda: f"--- stdout\n{tail(out_log)}\n--- stderr\n{tail(err_log)}"  # noqa: E731
    with ProcessScope("faults-node") as scope, LocalRayCluster(scope) as cluster:
        cluster.start_head(num_cpus=1, resources={"node_a": 1}, name="node_a")
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, name="node_b")
        cluster.nodes(wait_for=2)
        node_ids = {name: node.node_id for name, node in cluster.nodes_by_name.items()}
        env = {**cluster.env(), **{k: None for k in SCRUBBED_ENV}, "SSLROBUST_STUDIES_DIR": str(ws.studies)}
        driver = scope.popen([sys.executable, "-m", "orchestrator.study", "nkill", "--address", cluster.address,
                              "--max-concurrent", "2"], out_log, tag="driver", env=env, cwd=workdir,
                             stderr_log=err_log)

        def trial_on_node_b():  # a trial reported (and checkpointed) an epoch from a worker of node b
            on_b = scope.pids(tag="node_b")
            for path in ws.tune_files("nkill", "result.json"):
                lines = path.read_text().splitlines()
                try:
                    if lines and json.loads(lines[0])["pid"] in on_b:
                        return path.parent
                except ValueError:
                    pass
            return None

        wait_for(trial_on_node_b, 240, "a trial on node b to checkpoint an epoch", driver, logs)
        cluster.kill_node("node_b")  # the machine dies: raylet, agents and its workers, at once
        try:
            code = driver.wait(timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the study did not finish after node b died\n{logs()}") from None
        out = out_log.read_text(errors="replace")
        assert code == 0, logs()

    resumed = re.findall(r"trial ([0-9a-f]{16}) resumes after epoch ([1-9])", out)
    assert len(resumed) == 1, logs()
    chash = resumed[0][0]
    hashes = set(ws.result_files("nkill"))
    assert len(hashes) == 2 and chash in hashes
    table = check_complete_results(ws, "nkill", hashes)
    # the retried trial finished on the surviving node
    assert set(table[table.config_hash == chash]["node_id"]) == {node_ids["node_a"]}
    assert "trials run now: 2, skipped (results existed): 0, failed: 0" in out
    client, runs = mlflow_runs(ws.tracking_uri, "nkill")
    run = check_one_finished_child_per_trial(runs, hashes)[chash]
    assert run.data.tags["sslrobust.attempt"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")].count(1) == 1


# --------------------------------------------------------------------------------------------
# 4. the MLflow server goes away mid-study
# --------------------------------------------------------------------------------------------

class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts), in its own
    process group so that killing it kills its uvicorn workers too."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120) -> "MlflowServer":
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        log = open(self.folder / f"mlflow-server-{time.time_ns()}.log", "w")
        self.proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts")],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def healthy():
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout, f"mlflow server on port {self.port}", self.proc, interval=0.25)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            Workspace.kill_group(self.proc)


@pytest.mark.slow
def test_mlflow_server_dies_mid_study_then_backfill_logs_every_trial_once(ws):
    server = MlflowServer(ws.root, free_port()).start()
    try:
        ws.write_study("mlgone", {"ssl_weight": [0.0, 0.5]})
        proc = ws.start("mlgone", "--max-concurrent", "1", "--tracking-uri", server.uri, log="mlgone")
        # The first trial has started (its MLflow run exists, one epoch is logged); now the server goes.
        wait_for(lambda: first_report(ws, "mlgone"), 180, "the first trial's first epoch", proc,
                 lambda: ws.tail("mlgone"))
        server.kill()
        rc, out, err = ws.finish(proc)
        assert rc == 0, ws.tail("mlgone")
        hashes = set(ws.result_files("mlgone"))
        assert len(hashes) == 2  # the trials finished and their results reached Parquet
        check_complete_results(ws, "mlgone", hashes)
        assert re.search(r"MLflow tracking failed for [12] trial\(s\) and the study's parent run; their results "
                         r"are in Parquet", out), ws.tail("mlgone")
        commands = [line.strip() for line in out.splitlines() if "--backfill-tracking" in line]
        assert len(commands) == 1, ws.tail("mlgone")
        command = shlex.split(commands[0])
        assert command[:4] == ["python", "-m", "orchestrator.study", "mlgone"]
        assert command[command.index("--tracking-uri") + 1] == server.uri
        assert "Traceback" not in out

        server.start()  # the same port and database
        backfill = subprocess.run([sys.executable, *command[1:]], cwd=ws.root, env=ws.env(),
                                  capture_output=True, text=True, timeout=120)
        assert backfill.returncode == 0, backfill.stderr[-3000:]
        logged = re.search(r"logged (\d+) trial\(s\) of mlgone", backfill.stdout)
        assert logged and int(logged.group(1)) >= 1, backfill.stdout
        # the runs the outage left RUNNING (at least the parent: it could not be ended) were ended
        assert re.search(r"marked [1-9]\d* MLflow run\(s\) left RUNNING", backfill.stdout), backfill.stdout

        table = results.load("mlgone", str(ws.storage))
        client, runs = mlflow_runs(server.uri, "mlgone")
        finished = check_one_finished_child_per_trial(runs, hashes)
        parents = [r for r in runs if r.data.tags.get("sslrobust.role") == "parent"]
        assert [p.info.status for p in parents] == ["KILLED"]
        for chash, run in finished.items():
            expected = table[(table.config_hash == chash) & (table.eps_test == 0.1)]["robust_acc"].iloc[0]
            assert run.data.metrics["robust_acc/linf/0.1"] == pytest.approx(expected)
            assert "robust_acc_above_eps_train" in run.data.metrics
        assert {h: len(r) for h, r in trial_runs_by_hash(runs).items()} == {h: 1 for h in hashes}
    finally:
        server.kill()


# --------------------------------------------------------------------------------------------
# 5. a Parquet write is SIGKILLed half-way
# --------------------------------------------------------------------------------------------

WRITER = r"""
import datetime as dt, os, sys
from orchestrator import results
from orchestrator.result_schema import COLUMN_SPECS

storage, study, chash, n, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
now = dt.datetime.now(dt.timezone.utc)
base = dict(study=study, trial_id="t0", config_hash=chash, seed=0, dataset="fashion_mnist", arch="small_cnn",
            ssl_task="rotation", ssl_weight=0.5, attack_variant="joint", init="scratch", norm_train="linf",
            eps_train=0.1, train_attack_steps=1, rotations="one", norm="linf", attack="pgd", attack_steps=1,
            step_size=0.01, restarts=1, n_examples=48, clean_acc=0.75, robust_acc=0.5, node_id="node",
            finished_at=now)
filler = {"string": "x", "int64": 0, "double": 0.0}
rows = []
for i in range(n):
    # big, incompressible, distinct text per row: the write takes long enough to be interrupted
    row = {**base, "eps_test": i / 100, "config_json": os.urandom(size // 2).hex()}
    for name, kind, nullable in COLUMN_SPECS:
        if not nullable and name not in row:
            row[name] = filler.get(str(kind), now)
    rows.append(row)
print("writing", flush=True)
results.write_trial(storage, study, chash, rows)
print("written", flush=True)
"""


def _write_in_subprocess(storage: Path, chash: str, rows: int, size: int, kill: bool) -> Path | None:
    """Run results.write_trial in a subprocess; with kill, SIGKILL it while the file is half
    written and return the partial (hidden) file."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(storage), "pq", chash, str(rows), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if not kill:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "written" in out, err
        return None
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        folder = storage / "results" / "pq"

        def partial():
            found = [p for p in folder.glob(f".{chash}.*") if p.stat().st_size > 0] if folder.is_dir() else []
            return found[0] if found else None

        path = wait_for(partial, 60, "the temporary results file to fill", proc, interval=0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return path


@pytest.mark.slow
def test_parquet_write_killed_half_way_leaves_no_partial_file_visible(tmp_path):
    storage = tmp_path / "runs"
    kept, new = "a" * 16, "b" * 16
    _write_in_subprocess(storage, kept, rows=2, size=1000, kill=False)
    before = results.load("pq", str(storage))
    kept_file = storage / "results" / "pq" / f"{kept}.parquet"
    kept_bytes = kept_file.read_bytes()

    # A new trial's file, and a re-write of an existing one (a retry), each killed mid-write.
    for chash in (new, kept):
        partial = _write_in_subprocess(storage, chash, rows=20, size=6_000_000, kill=True)
        assert partial.exists() and partial.name.startswith(".")  # half-written, hidden
        assert not (storage / "results" / "pq" / f"{new}.parquet").exists()
        assert kept_file.read_bytes() == kept_bytes  # the complete earlier version is untouched
        assert results.completed_hashes(str(storage), "pq") == {kept}
        after = results.load("pq", str(storage))
        assert len(after) == len(before) == 2 and set(after["config_hash"]) == {kept}
        assert results.trial_table(str(storage), "pq", new).empty


# --------------------------------------------------------------------------------------------
# checkpoints: weights_only=True everywhere; a pickle bomb is refused and reported
# --------------------------------------------------------------------------------------------

def test_every_torch_load_passes_weights_only_true():
    calls = []
    for path in sorted([*ROOT.glob("orchestrator/*.py"), *ROOT.glob("trainables/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls, "no torch.load calls found: the test looks in the wrong place"
    assert [where for where, safe in calls if not safe] == []
    # and nothing unpickles by other means
    for path in sorted([*ROOT.glob("orchestrator/*.py")]):
        text = path.read_text()
        assert "pickle.load" not in text and "cloudpickle.load" not in text, path


class _Bomb:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bomb(path: Path, marker: Path) -> None:
    import torch

    torch.save({"trainer": _Bomb(str(marker)), "config_hash": "0" * 16}, path)
    # The bomb is armed: an unsafe load runs it (in a subprocess, so this process stays clean).
    probe = marker.with_name("probe-" + marker.name)
    torch.save({"x": _Bomb(str(probe))}, path.with_name("probe.pt"))
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(path.with_name("probe.pt"))], check=False, capture_output=True, timeout=120)
    assert probe.exists(), "the pickle bomb did not go off with weights_only=False: the test proves nothing"


@pytest.mark.slow
def test_a_pickle_bomb_trial_checkpoint_is_refused_named_and_not_used(tmp_path, monkeypatch):
    from ray import tune

    from orchestrator import trainable

    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    marker = tmp_path / "exploded"
    _pickle_bomb(folder / trainable.CHECKPOINT_FILE, marker)
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(folder)))
    messages = []
    assert trainable._load_checkpoint(messages.append) is None  # not used: the trial starts at epoch 0
    assert not marker.exists()  # and the payload never ran
    assert len(messages) == 1 and trainable.CHECKPOINT_FILE in messages[0]
    assert "unreadable" in messages[0] and "not using it" in messages[0] and "epoch 0" in messages[0]
    assert "\n" not in messages[0] and "Unsupported global" in messages[0]  # one line: why it was refused
    assert "weights_only` set to `False`" not in messages[0]  # and not torch's advice to load it unsafely


@pytest.mark.slow
def test_a_pickle_bomb_pretrained_backbone_is_refused_with_one_line(tmp_path):
    from orchestrator.errors import UserError
    from orchestrator.pretrain import load

    marker = tmp_path / "exploded"
    path = tmp_path / "pretrained" / "0123456789abcdef.pt"
    path.parent.mkdir()
    _pickle_bomb(path, marker)
    with pytest.raises(UserError) as err:
        load(str(path))
    message = str(err.value)
    assert str(path) in message and "delete it and re-run" in message and "\n" not in message
    assert not marker.exists()
