"""What the study command prints: the compact progress line, not Ray Tune's banners or its
slow-callback warnings (the MLflow writes run off Tune's event loop); `--tune-output` brings Tune's
own output back. The real CLI in a subprocess with its own local Ray, so that every line a user
sees (stdout and stderr, Ray's and Tune's loggers included) is checked."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=128, test_subset=32, epochs=1, batch_size=64,
    ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1, train_attack_steps=1,
    eval_attack_steps=1, eval_eps_linf=[0.0, 0.1],
)
# Tune warns about a slow callback ("The `process_trial_result` operation took 0.64 s") only once
# its module has been imported for 60 s; the CLI runs here with that grace period over, so that a
# slow tracking callback shows from the first trial on.
CLI = ("import sys, ray.tune.utils.util as u; u.START_OF_TIME -= 3600; "
       "from orchestrator.study import main; sys.exit(main(sys.argv[1:]))")


def _study(tmp_path: Path, name: str, weights: list[float]) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir(exist_ok=True)
    (studies / f"{name}.yaml").write_text(json.dumps({
        "description": "console test", "seeds": [0], "factors": {"ssl_weight": weights},
        "fixed": TINY, "resources": {"cpu": 1, "gpu": 0}}))
    return studies


def _cli(tmp_path: Path, studies: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "SSLROBUST_STUDIES_DIR": str(studies), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CLI, *args, "--storage", str(tmp_path / "runs"),
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--max-concurrent", "1"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    return done.returncode, done.stdout


@pytest.mark.slow
def test_the_console_shows_the_progress_line_not_tune_banners_or_slow_callback_warnings(tmp_path):
    studies = _study(tmp_path, "console", [0.0])
    status, text = _cli(tmp_path, studies, "console")
    assert status == 0, text[-3000:]
    assert re.search(r"^\[console\] 1/1 done, 0 running, 0 pending, \S+ elapsed \| .+: robust "
                     r"[0-9.]+ at ε_train$", text, re.MULTILINE), text[-3000:]
    for noise in ("Configuration for experiment", "View detailed results here", "process_trial_result",
                  "operation took", "Wrote the latest version of all result files",
                  "Checkpoint successfully created"):
        assert noise not in text, f"{noise!r} printed:\n{text[-3000:]}"

    # --tune-output: Tune's own output instead (one more cell, so that something runs)
    _study(tmp_path, "console", [0.0, 1.0])
    status, text = _cli(tmp_path, studies, "console", "--tune-output")
    assert status == 0, text[-3000:]
    assert "Configuration for experiment" in text, text[-3000:]
    assert not re.search(r"\[console\] \d+/\d+ done", text), text[-3000:]
