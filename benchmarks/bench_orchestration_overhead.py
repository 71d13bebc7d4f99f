"""Orchestration overhead: N trivial trials through `orchestrator.study` against bare Ray Tune.

Reference (measured in the same run): the same number of trivial function trials through a bare
`tune.Tuner` with Ray Tune's defaults (a new worker process per trial). Ours runs each trial for
real — config resolution, data loading, a one-step model, evaluation, an MLflow child run in a
sqlite store, a checkpoint, a Parquet file — so the ratio bounds everything the orchestration adds.

    python benchmarks/bench_orchestration_overhead.py [--trials 64]

Target: orchestrated time / bare-defaults time <= 0.2.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TRIVIAL = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=64, test_subset=16, epochs=1, batch_size=64,
    ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1, train_attack_steps=1,
    eval_attack_steps=1, eval_eps_linf=[0.0, 0.1],
)


def bare_tune(trials: int, storage: str) -> float:
    from ray import tune

    def trivial(config):
        tune.report({"score": config["i"]})

    start = time.perf_counter()
    tune.Tuner(
        trivial, param_space={"i": tune.grid_search(list(range(trials)))},
        run_config=tune.RunConfig(name="bare", storage_path=storage, verbose=0),
    ).fit()
    return time.perf_counter() - start


def orchestrated(trials: int, workdir: Path) -> float:
    from orchestrator.runner import RunOptions, run_study
    from orchestrator.spec import load_study

    studies = workdir / "studies"
    studies.mkdir()
    # 64 cells of one grid: the seeds axis is the cheapest way to get N distinct configurations.
    (studies / "trivial.yaml").write_text(json.dumps({
        "description": "trivial trials for the overhead benchmark", "factors": {"ssl_weight": [0.5]},
        "seeds": list(range(trials)), "fixed": TRIVIAL, "resources": {"cpu": 1, "gpu": 0},
    }))
    os.environ["SSLROBUST_STUDIES_DIR"] = str(studies)
    spec = load_study("trivial")
    start = time.perf_counter()
    outcome = run_study(spec, RunOptions(storage=str(workdir / "runs"),
                                         tracking_uri=f"sqlite:///{workdir}/mlflow.db", verbose=0),
                        out=io.StringIO())
    elapsed = time.perf_counter() - start
    assert outcome.ran == trials and not outcome.failed, outcome
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=64)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        bare = bare_tune(args.trials, os.path.join(folder, "bare"))
        ours = orchestrated(args.trials, Path(folder))
    ray.shutdown()
    print(f"bare Ray Tune defaults: {bare:.1f} s for {args.trials} trivial trials ({bare / args.trials:.2f} s/trial)")
    print(f"orchestrator.study:     {ours:.1f} s for {args.trials} trials ({ours / args.trials:.2f} s/trial)")
    print(f"ratio orchestrated / bare defaults: {ours / bare:.2f} (target <= 0.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
