"""Orchestration overhead: N trivial trials through `orchestrator.study` against bare Ray Tune.

Reference (measured in the same run): the same number of trivial function trials through a bare
`tune.Tuner` with Ray Tune's defaults (a new worker process per trial). Ours runs each trial for
real — config resolution, data loading, a one-step model, evaluation, an MLflow child run in a
sqlite store, a checkpoint, a Parquet file — so the ratio bounds everything the orchestration adds.

    python benchmarks/bench_orchestration_overhead.py [--trials 64] [--repeats 3]

Each measurement runs in a fresh Python process with a Ray of its own, timed from before its
first import of Ray Tune or the orchestrator (as `python -m orchestrator.study` pays them), so no
measurement inherits another's imports or worker clean-up. Each repeat measures both, in
alternating order (bare first, then ours first, ...), so that load from elsewhere on the machine
hits both alike; the headline is the median of the paired ratios. Bare Tune with reused actors is
measured once, for scale. (No torch import here: the driver of a real study does not import it
either; `benchmarks/common.py` does.)

Target: orchestrated time / bare-defaults time <= 0.2.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
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


def measure_in_this_process(which: str, trials: int, workdir: Path) -> float:
    import ray

    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        if which == "ours":
            return orchestrated(trials, workdir)
        return bare_tune(trials, str(workdir / which), reuse_actors=which == "reused")
    finally:
        ray.shutdown()


def measure(which: str, trials: int, workdir: Path) -> float:
    """`which` ("bare", "reused" or "ours") in a fresh Python process; its seconds."""
    done = subprocess.run([sys.executable, __file__, "--measure", which, "--trials", str(trials),
                           "--workdir", str(workdir)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SECONDS ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"measuring {which} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=["bare", "reused", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.trials
    if args.measure:
        print(f"SECONDS {measure_in_this_process(args.measure, n, args.workdir)}", flush=True)
        return 0

    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            order = ["bare", "ours"] if i % 2 == 0 else ["ours", "bare"]
            took = {name: measure(name, n, Path(folder) / f"{name}{i}") for name in order}
            ratios.append(took["ours"] / took["bare"])
            print(f"repeat {i + 1} ({' then '.join(order)}): bare Ray Tune defaults {took['bare']:.1f} s "
                  f"({took['bare'] / n:.2f} s/trial), orchestrator.study {took['ours']:.1f} s "
                  f"({took['ours'] / n:.2f} s/trial): ratio {ratios[-1]:.3f}", flush=True)
        reused = measure("reused", n, Path(folder) / "reused")
    print(f"bare Ray Tune, reused actors (no work in the trial): {reused:.1f} s ({reused / n:.2f} s/trial)")
    print(f"ratio orchestrated / bare defaults: median {statistics.median(ratios):.3f} of {len(ratios)} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target <= 0.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
