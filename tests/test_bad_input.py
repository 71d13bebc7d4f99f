"""Bad input, through the real command line: one clear line on stderr, exit status 2, no traceback,
and nothing written.

Every case runs `python -m orchestrator.study ...` in a subprocess from an empty working directory,
with its own studies folder (SSLROBUST_STUDIES_DIR) and Ray temp dir (RAY_TMPDIR). Afterwards the
working directory must still be empty: no runs/ folder, no mlflow.db, no mlartifacts/ (the checks
run before anything is created). The messages are listed in docs/errors.md.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Every test runs `python -m orchestrator.study` (or evaluate) in a new process: seconds each.
pytestmark = pytest.mark.slow

BASE = {
    "description": "a valid tiny study the cases start from",
    "factors": {"ssl_weight": [0.0, 0.5]},
    "seeds": [0],
    "fixed": {"dataset": "fashion_mnist", "arch": "small_cnn", "train_subset": 192, "test_subset": 48,
              "epochs": 2, "batch_size": 64, "train_attack_steps": 1, "eval_attack_steps": 1,
              "eval_eps_linf": [0.0, 0.1]},
    "resources": {"cpu": 1, "gpu": 0},
}
SEARCH = {"space": {"ssl_weight": {"low": 0.0, "high": 2.0}}, "objectives": ["clean_acc", "robust_acc_above_eps_train"],
          "num_samples": 2, "max_concurrent": 1}
SCRUBBED_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SSLROBUST_STORAGE", "SSLROBUST_DATA_DIR", "RAY_TMPDIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_processes_mentioning(text: str) -> None:
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        found = False
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as f:
                    found = found or needle in f.read()
            except OSError:
                pass
        if found:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Place:
    """An empty working directory, a studies folder beside it (with `base`), a Ray temp dir."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        self.studies = tmp_path / "studies"
        self.studies.mkdir()
        self.ray_tmp = tempfile.mkdtemp(prefix="sslrt-", dir="/tmp")  # short: Ray's socket paths
        self.write("base", json.dumps(BASE))

    def write(self, name: str, text: str) -> None:
        (self.studies / f"{name}.yaml").write_text(text)

    def run(self, *args: str, module: str = "orchestrator.study", env: dict | None = None):
        environ = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        environ.update(SSLROBUST_STUDIES_DIR=str(self.studies), RAY_TMPDIR=self.ray_tmp, **(env or {}))
        return subprocess.run([sys.executable, "-m", module, *args], cwd=self.cwd, env=environ,
                              capture_output=True, text=True, timeout=180)

    def close(self) -> None:
        _kill_processes_mentioning(self.ray_tmp)  # nothing, unless a check came too late
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def place(tmp_path):
    p = Place(tmp_path)
    yield p
    p.close()


def one_clear_line(proc) -> str:
    """The run failed with exit status 2 and exactly one line on stderr, `error: ...`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


# (id, extra study files {name: text}, arguments, what the line must say)
CASES = [
    ("unknown-study", {}, ["bsae"],
     ["unknown study 'bsae' (did you mean base?)", "available: base", "--list"]),
    ("unknown-field", {"typo": "factor: {ssl_weight: [0.0, 0.5]}"}, ["typo"],
     ["typo.yaml", "unknown field 'factor' (did you mean factors?)", "allowed: "]),
    ("misspelt-setting", {"typo": "fixed: {eps_trian: 0.1}"}, ["typo"],
     ["typo.yaml", "fixed: unknown field 'eps_trian' (did you mean eps_train"]),
    ("invalid-yaml", {"broken": "factors: {ssl_weight: [0.0, 0.5}"}, ["broken"],
     ["broken.yaml line 1", "not valid YAML"]),
    ("wrong-type", {"typed": "fixed: {epochs: three}"}, ["typed"],
     ["typed.yaml", "fixed.epochs", "'epochs' must be an integer, got 'three'"]),
    ("wrong-type-set", {}, ["base", "--set", "batch_size=big"],
     ["--set", "'batch_size' must be an integer, got 'big'"]),
    ("nan-eps-yaml", {"nan": "fixed: {eps_train: .nan}"}, ["nan"],
     ["nan.yaml", "fixed.eps_train", "'eps_train' must be finite, got nan"]),
    ("inf-lambda-yaml", {"inf": "factors: {ssl_weight: [0.0, .inf]}"}, ["inf"],
     ["inf.yaml", "factors.ssl_weight", "'ssl_weight' must be finite, got inf"]),
    ("negative-lambda-yaml", {"neg": "factors: {ssl_weight: [0.0, -0.5]}"}, ["neg"],
     ["neg.yaml", "factors.ssl_weight", "'ssl_weight' must be >= 0, got -0.5"]),
    ("negative-eps-set", {}, ["base", "--set", "eps_train=-1"],
     ["--set", "'eps_train' must be >= 0, got -1.0"]),
    ("nan-lambda-set", {}, ["base", "--set", "ssl_weight=[0, .nan]"],
     ["--set", "'ssl_weight' must be finite, got nan"]),
    ("inf-eps-set", {}, ["base", "--set", "eps_train=.inf"],
     ["--set", "'eps_train' must be finite, got inf"]),
    ("unknown-variant", {"variant": "factors: {attack_variant: [ce, jont]}"}, ["variant"],
     ["variant.yaml", "unknown attack_variant 'jont' (did you mean joint", "choose one of ce, joint, ssl"]),
    ("unknown-norm", {}, ["base", "--set", "norm_train=l3"],
     ["unknown norm_train 'l3' (did you mean l2", "choose one of linf, l2"]),
    ("unknown-eval-norm", {}, ["base", "--set", "eval_norms=[linf, l1]"],
     ["unknown eval_norms 'l1'", "choose one of linf, l2"]),
    ("unknown-dataset", {"data": "fixed: {dataset: cifar11}"}, ["data"],
     ["data.yaml", "unknown dataset 'cifar11' (did you mean cifar10", "choose one of"]),
    ("unknown-arch", {}, ["base", "--set", "arch=resnet50"],
     ["unknown arch 'resnet50' (did you mean preact_resnet18", "choose one of small_cnn"]),
    ("unknown-ssl-task", {}, ["base", "--set", "ssl_task=rotate"],
     ["unknown ssl_task 'rotate' (did you mean rotation", "choose one of none, rotation"]),
    ("center-smoothing-too-few-samples", {}, ["base", "--set", "label_free_eval=true", "--set",
                                              "center_smoothing_n0=20"],
     ["base.yaml", "'center_smoothing_n0' is 20, too few samples for center_smoothing_delta 0.25",
      "set center_smoothing_n0 >= 48 or raise center_smoothing_delta"]),
    ("empty-grid", {"empty": "factors: {ssl_weight: []}"}, ["empty"],
     ["empty.yaml", "factors.ssl_weight: the list is empty, so the grid has no cells", "give at least one value"]),
    ("empty-seeds", {"noseeds": "seeds: []"}, ["noseeds"],
     ["noseeds.yaml", "seeds: expected a non-empty list of integers"]),
    ("set-unknown-key", {}, ["base", "--set", "eps_trian=0.1"],
     ["--set: unknown setting 'eps_trian' (did you mean eps_train", "trainables/config.py"]),
    ("set-not-key-value", {}, ["base", "--set", "epochs"],
     ["--set 'epochs': expected key=value"]),
    ("unknown-scale", {}, ["base", "--scale", "huge"],
     ["unknown scale 'huge'", "choose one of smoke, default, paper"]),
    ("bad-resources", {}, ["base", "--resources", "cpu=1,tpu=1"],
     ["--resources: unknown resource 'tpu'"]),
    ("gpu-without-gpu", {}, ["base", "--resources", "cpu=1,gpu=1"],
     ["asks for gpu: 1 per trial but this machine has no CUDA GPU", "--resources cpu=1,gpu=0"]),
    ("gpu-in-study-without-gpu", {"gpu": "seeds: [0]\nresources: {cpu: 1, gpu: 0.5}"}, ["gpu"],
     ["asks for gpu: 0.5 per trial but this machine has no CUDA GPU", "--resources cpu=1,gpu=0"]),
    ("unreachable-address", {}, ["base", "--address", "127.0.0.1:{port}"],
     ["cannot reach a Ray cluster at --address 127.0.0.1:{port} (connection refused)", "ray start --head",
      "drop --address"]),
    ("unreachable-client-address", {}, ["base", "--address", "ray://127.0.0.1:{port}"],
     ["cannot reach a Ray cluster at --address ray://127.0.0.1:{port} (connection refused)"]),
    ("unreachable-tracking-uri", {}, ["base", "--tracking-uri", "http://127.0.0.1:{port}"],
     ["MLflow tracking server http://127.0.0.1:{port} is not reachable (connection refused)", "mlflow server",
      "--tracking-uri sqlite:///mlflow.db"]),
    ("tracking-file-store", {}, ["base", "--tracking-uri", "./mlruns"],
     ["tracking URI './mlruns' is a file store", "--tracking-uri sqlite:///mlflow.db"]),
    ("tracking-db-folder-missing", {}, ["base", "--tracking-uri", "sqlite:///{tmp}/nowhere/mlflow.db"],
     ["MLflow database directory {tmp}/nowhere does not exist", "create it or pass another --tracking-uri"]),
    ("max-concurrent-zero", {}, ["base", "--max-concurrent", "0"],
     ["--max-concurrent must be at least 1"]),
    ("max-concurrent-not-a-number", {}, ["base", "--max-concurrent", "two"],
     ["argument --max-concurrent: invalid int value: 'two'", "--help"]),
    ("unknown-option", {}, ["base", "--epochs", "3"],
     ["unrecognized arguments: --epochs 3", "--help"]),
    ("no-study", {}, [],
     ["name a study", "--list"]),
    ("empty-study-file", {"blank": ""}, ["blank"],
     ["blank.yaml: the study file is empty", "give at least a grid", "factors: {{ssl_weight: [0.0, 0.5]}}"]),
    ("study-file-not-a-mapping", {"listy": "- ssl_weight\n- 0.5"}, ["listy"],
     ["listy.yaml: a study file is a mapping of fields", "this one is a list", "`field: value` lines"]),
    ("study-without-grid", {"nogrid": "description: settings only\nfixed: {epochs: 1}"}, ["nogrid"],
     ["nogrid.yaml (default scale): the study has no grid", "give factors", "seeds", "or a search"]),
    ("storage-cannot-be-created", {}, ["base", "--storage", "/proc/sslrobust-{port}/runs"],
     ["--storage /proc/sslrobust-{port}/runs: cannot create or write /proc/sslrobust-{port}",
      "pass a --storage you can write"]),
    ("storage-under-a-file", {}, ["base", "--storage", "{tmp}/studies/base.yaml/runs"],
     ["--storage {tmp}/studies/base.yaml/runs: {tmp}/studies/base.yaml is a file, not a folder",
      "pass a --storage you can write"]),
    ("search-objective-undefined", {"search": json.dumps({**BASE, "factors": {}, "search": SEARCH})},
     ["search", "--set", "eval_eps_linf=[0.0, 0.05]"],
     ["search.yaml (default scale) search: objective robust_acc_above_eps_train is undefined",
      "no ε_test in eval_eps_linf [0.0, 0.05] is >= ε_train 0.1", "--set 'eval_eps_linf=[0.0, 0.05, 0.1]'"]),
    ("search-objective-not-measured", {"search": json.dumps({**BASE, "factors": {}, "search": SEARCH})},
     ["search", "--set", "norm_train=l2"],
     ["search: objective robust_acc_above_eps_train needs the trials evaluated in the training norm l2",
      "add l2 to eval_norms"]),
]


@pytest.mark.parametrize("files, args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(place, files, args, expected):
    if "gpu" in " ".join(args + list(files)):
        import torch

        if torch.cuda.device_count():
            pytest.skip("this machine has a GPU")
    port = free_port()
    fill = lambda text: text.format(port=port, tmp=place.tmp)  # noqa: E731
    for name, text in files.items():
        place.write(name, text)
    proc = place.run(*map(fill, args))
    line = one_clear_line(proc)
    for text in expected:
        assert fill(text) in line, line
    assert list(place.cwd.iterdir()) == []  # no runs/, no mlflow.db, no mlartifacts/
    assert sorted(p.name for p in place.tmp.iterdir()) == ["cwd", "studies"]  # nor --storage elsewhere


# `python -m orchestrator.evaluate` (re-evaluation of kept models): (id, arguments, what the line must say)
EVALUATE_CASES = [
    ("no-settings", ["base"], ["give the evaluation settings to change with --set, e.g. --set eval_attack_steps=100"]),
    ("training-setting", ["base", "--set", "epochs=3"],
     ["--set epochs: 'epochs' is a training setting and the kept models are already trained",
      "only evaluation settings (eval_*", "python -m orchestrator.study"]),
    ("seeds", ["base", "--set", "seeds=[1, 2]"], ["--set seeds: 'seeds' is a training setting"]),
    ("unknown-setting", ["base", "--set", "eval_atack_steps=50"],
     ["--set: unknown setting 'eval_atack_steps' (did you mean eval_attack_steps", "EVALUATION_KEYS"]),
    ("bad-value", ["base", "--set", "eval_attack_steps=0"], ["--set eval_attack_steps: 'eval_attack_steps' must be > 0, got 0"]),
    ("unknown-study", ["bsae", "--set", "eval_attack_steps=50"], ["unknown study 'bsae' (did you mean base?)"]),
    ("no-kept-models", ["base", "--set", "eval_attack_steps=50"],
     ["study 'base' (default scale) has no kept models in {cwd}/runs/models/base",
      "run it first (python -m orchestrator.study base --scale default) or pass the study's --storage"]),
]


@pytest.mark.parametrize("args, expected", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input_is_one_clear_line_and_writes_nothing(place, args, expected):
    line = one_clear_line(place.run(*args, module="orchestrator.evaluate"))
    for text in expected:
        assert text.format(cwd=place.cwd) in line, line
    assert list(place.cwd.iterdir()) == []


def test_evaluate_setting_a_kept_model_cannot_take_is_refused_before_anything_is_written(place, monkeypatch):
    """A kept model (a fresh small_cnn saved as a trial would) whose config cannot take the new
    setting: the one-line config error, the model and everything else left as they were."""
    import torch

    from orchestrator import models_store
    from orchestrator.spec import load_study

    from trainables.data import dataset_info
    from trainables.models import build_model

    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(place.studies))
    trial = load_study("base").trials()[0]
    torch.manual_seed(0)
    model = build_model("small_cnn", dataset_info("fashion_mnist"))
    models_store.save_model(str(place.cwd / "runs"), "base", trial.config_hash, trial.config,
                            models_store.encode_weights(model.state_dict()))
    before = tree(place.cwd)
    line = one_clear_line(place.run("base", "--set", "defence=ssl_reverse", "--set", "defence_tasks=[contrastive]",
                                    module="orchestrator.evaluate"))
    assert (f"--set (model {trial.config_hash}): defence task 'contrastive' is not one the model trains with "
            f"(rotation); add it to ssl_tasks or drop it from defence_tasks") in line, line
    assert tree(place.cwd) == before


def test_missing_dataset_is_named_with_how_to_get_it_before_any_trial(place):
    """The driver checks the datasets of the trials to run before it starts Ray or MLflow; with
    no internet (here: a proxy nobody answers at) the download fails and says so."""
    data = place.tmp / "no-data"
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    proc = place.run("base", "--set", "dataset=cifar10", "--data-dir", str(data), env=offline)
    line = one_clear_line(proc)
    for text in ("dataset cifar10 (train split) unavailable", "download failed", f"looked in {data}",
                 "to get it", f"--data-dir: here {data}"):
        assert text in line, line
    assert list(place.cwd.iterdir()) == []
    assert "Started a local Ray" not in proc.stderr and "run_trial" not in proc.stdout  # before any trial


def test_corrupt_results_file_is_named_and_never_used(place, monkeypatch):
    """A garbage Parquet file where a trial's result belongs: the study (and --dry-run, and the
    report) name it instead of counting that cell as done; nothing is written."""
    from orchestrator.spec import load_study

    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(place.studies))
    chash = load_study("base").trials()[0].config_hash
    folder = place.cwd / "runs" / "results" / "base"
    folder.mkdir(parents=True)
    (folder / f"{chash}.parquet").write_bytes(b"PAR1 this is not a parquet file")
    before = tree(place.cwd)
    for args, module in ((["base"], "orchestrator.study"), (["base", "--dry-run"], "orchestrator.study"),
                         (["base"], "orchestrator.report")):
        line = one_clear_line(place.run(*args, module=module))
        assert f"results file runs/results/base/{chash}.parquet is corrupt" in line or \
            f"{folder}/{chash}.parquet is corrupt" in line, line
        assert "delete it and re-run the study" in line
        assert tree(place.cwd) == before  # no mlflow.db, no report, the file left as it was


def test_unknown_study_lists_the_closest_names(place):
    for name in ("weight_sweep", "weight_search", "eps_train"):
        place.write(name, json.dumps(BASE))
    line = one_clear_line(place.run("weight_swep"))
    assert "unknown study 'weight_swep' (did you mean weight_sweep, weight_search" in line
