"""One study trial against the bare training loop on the same configuration.

The trial runs through `orchestrator.runner.run_study` as a study runs it: Ray Tune with a reused
worker, the driver's MLflow callback (a sqlite store), a checkpoint each epoch, the Parquet file and
the kept model. The reference, in the same run, is `Trainer(config)`, its epochs and `evaluate()`
called directly in a fresh interpreter that imports only torch and trainables, on as many threads
as the trial gets. Both run a small warm-up first (the trial in the same worker), so neither pays
for one-time imports: this measures training throughput, not start-up.

The configuration is one trial of a study (default: `weight_sweep` at its default scale, the first
trial with λ > 0). With --repeats N the two alternate (bare trial, trial bare, ...) and the headline
is the median of the paired ratios.

    python benchmarks/bench_trial_vs_bare.py [--study weight_sweep] [--scale default] [--set KEY=VALUE ...]
        [--trial INDEX] [--repeats 1]

Ratio: bare seconds / trial seconds (Tune's time_total_s: the trial function until its last
report), i.e. the trial's throughput relative to the bare loop. Target >= 0.97.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WARM_UP_SUBSET = 64


def study_trial(args) -> tuple[dict, dict, float]:
    """(the trial's factors, its settings without the seed, CPUs per trial) of trial `args.trial`."""
    from orchestrator.spec import load_study

    spec = load_study(args.study, args.scale, args.sets)
    trials = spec.trials()
    index = args.trial if args.trial is not None else next(
        (i for i, t in enumerate(trials) if (t.config.get("ssl_weight") or 0) > 0), 0)
    trial = trials[index]
    settings = {**spec.fixed, **trial.factors}
    return trial.factors, settings, spec.resources["cpu"]


def bare(settings: dict, threads: int) -> float:
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import bench_trial_vs_bare as b; "
            f"print(b.bare_loop(json.loads({json.dumps(json.dumps(settings))}), {threads}))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd=HERE.parent)
    return float(done.stdout.strip().splitlines()[-1])


def bare_loop(settings: dict, threads: int) -> float:
    import torch

    from trainables.train import Trainer

    torch.set_num_threads(threads)
    warm_up = Trainer({**settings, "train_subset": WARM_UP_SUBSET})
    for _ in warm_up.epochs():
        pass
    warm_up.evaluate()
    start = time.perf_counter()
    trainer = Trainer(settings)
    for _ in trainer.epochs():
        pass
    trainer.evaluate()
    return time.perf_counter() - start


def trial(settings: dict, threads: float, work_dir: Path) -> tuple[float, float]:
    """(Tune's time_total_s, the trial's own train_seconds + eval_seconds) of the measured trial,
    run after a warm-up trial in the same reused worker."""
    from orchestrator.trainable import EVAL_SECONDS, TRAIN_SECONDS
    from study_runs import run_benchmark_study

    seed = settings["seed"]
    fixed = {k: v for k, v in settings.items() if k not in ("seed", "train_subset")}
    spec = {"description": "a warm-up trial, then the measured trial", "seeds": [seed],
            "factors": {"train_subset": [WARM_UP_SUBSET, settings["train_subset"]]}, "fixed": fixed,
            "resources": {"cpu": threads, "gpu": 0}}
    outcome = run_benchmark_study(work_dir, "one", spec, max_concurrent=1)
    measured = [m for m in outcome.trial_metrics if m["config"]["cell"]["train_subset"] == settings["train_subset"]]
    return float(measured[0]["time_total_s"]), float(measured[0][TRAIN_SECONDS] + measured[0][EVAL_SECONDS])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="weight_sweep")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trial", type=int, help="index into the study's trials (default: the first with λ > 0)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    factors, settings, cpus = study_trial(args)
    threads = max(1, int(cpus))
    print(f"{args.study} ({args.scale} scale), trial {factors}, {threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}")
    import ray

    ray.init(num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False)
    ratios = []
    try:
        for i in range(args.repeats):
            times = {}
            for kind in (("bare", "trial") if i % 2 == 0 else ("trial", "bare")):
                if kind == "bare":
                    times["bare"] = bare(settings, threads)
                else:
                    with tempfile.TemporaryDirectory(prefix="bench-trial-") as folder:
                        times["trial"], times["work"] = trial(settings, cpus, Path(folder))
            ratios.append(times["bare"] / times["trial"])
            print(f"repeat {i + 1}: bare Trainer + evaluate {times['bare']:.1f} s; trial {times['trial']:.1f} s "
                  f"(its own training + evaluation {times['work']:.1f} s); bare / trial {ratios[-1]:.3f}")
    finally:
        ray.shutdown()
    print(f"throughput ratio bare / trial = {statistics.median(ratios):.3f} (median of {len(ratios)}; "
          f"target >= 0.97); load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
