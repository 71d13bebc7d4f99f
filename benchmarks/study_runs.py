"""Run a throw-away study through `orchestrator.study`'s own code path (spec file, Tuner, MLflow in a
sqlite file, Parquet), for the overhead benchmarks. No torch import here: the driver of a real study
does not import it either."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path


def run_benchmark_study(workdir: Path, name: str, spec: dict, max_concurrent: int | None = None):
    """Write `spec` as `<workdir>/studies/<name>.yaml`, run it with storage and tracking under
    `workdir`, and return the StudyOutcome; fails loudly unless every trial ran."""
    from orchestrator.runner import RunOptions, run_study
    from orchestrator.spec import load_study

    studies = workdir / "studies"
    studies.mkdir(exist_ok=True)
    (studies / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    os.environ["SSLROBUST_STUDIES_DIR"] = str(studies)
    loaded = load_study(name)
    outcome = run_study(loaded, RunOptions(storage=str(workdir / "runs"), tracking_uri=f"sqlite:///{workdir}/mlflow.db",
                                           max_concurrent=max_concurrent, verbose=0), out=io.StringIO())
    expected = len(loaded.trials())
    assert outcome.ran == expected and not outcome.failed, outcome
    return outcome
