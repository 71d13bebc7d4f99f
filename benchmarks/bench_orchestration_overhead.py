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
import os
import sys
import tempfile
import time
from pathlib import Path

TRIVIAL = dict(
    dataset="fashion_mnist", arch="small_cnn", train_subset=16, test_subset=16, epochs=1, batch_size=16,
    ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1, train_attack_steps=1,
    eval_attack_steps=1, eval_eps_linf=[0.0, 0.1],
)


def bare_tune(trials: int, storage: str, reuse_actors: bool = False) -> float:
    from ray import tune

    def trivial(config):
        tune.report({"score": config["i"]})

    start = time.perf_counter()
    tune.Tuner(
        trivial, param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name="bare", storage_path=storage, verbose=0),
    ).fit()
    return time.perf_counter() - start


def orchestrated(trials: int, workdir: Path) -> float:
    from study_runs import run_benchmark_study

    # 64 cells of one grid: the seeds axis is the cheapest way to get N distinct configurations.
    spec = {"description": "trivial trials for the overhead benchmark", "factors": {"ssl_weight": [0.5]},
            "seeds": list(range(trials)), "fixed": TRIVIAL, "resources": {"cpu": 1, "gpu": 0}}
    start = time.perf_counter()
    run_benchmark_study(workdir, "trivial", spec)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=64)
    args = parser.parse_args()
    import ray

    def fresh(measure) -> float:
        # Each measurement gets a Ray of its own: a run that follows 64 per-trial worker processes
        # in the same Ray would share the machine with their clean-up.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            return measure()
        finally:
            ray.shutdown()

    with tempfile.TemporaryDirectory() as folder:
        bare = fresh(lambda: bare_tune(args.trials, os.path.join(folder, "bare")))
        reused = fresh(lambda: bare_tune(args.trials, os.path.join(folder, "bare-reused"), reuse_actors=True))
        ours = fresh(lambda: orchestrated(args.trials, Path(folder)))
    print(f"bare Ray Tune defaults: {bare:.1f} s for {args.trials} trivial trials ({bare / args.trials:.2f} s/trial)")
    print(f"bare Ray Tune, reused actors (no work in the trial): {reused:.1f} s ({reused / args.trials:.2f} s/trial)")
    print(f"orchestrator.study:     {ours:.1f} s for {args.trials} trials ({ours / args.trials:.2f} s/trial)")
    print(f"ratio orchestrated / bare defaults: {ours / bare:.2f} (target <= 0.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
