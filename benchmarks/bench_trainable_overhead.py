"""Trainable overhead: one trial through `orchestrator.study` against the bare training loop.

Both train and evaluate the same configuration on one thread, after a warm-up (the bare loop
in this process, the trial in its reused Ray worker). The trial adds what orchestration
costs: Ray Tune reporting, a checkpoint each epoch, an MLflow child run (sqlite), per-epoch metrics,
the Parquet file, the curve plot and the artifacts. Reference, in the same run: `Trainer` + its
`evaluate()` called directly.

    python benchmarks/bench_trainable_overhead.py [--train-subset 3000] [--epochs 3]

Target: bare time / trial time >= 0.95 (the trial keeps at least 95% of the bare throughput).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
WARM_UP_SUBSET = 64


def config(args) -> dict:
    return dict(dataset="fashion_mnist", arch="small_cnn", train_subset=args.train_subset, test_subset=500,
                epochs=args.epochs, batch_size=128, ssl_task="rotation", ssl_weight=0.5, rotations="one",
                attack_variant="joint", eps_train=0.1, train_attack_steps=3, train_step_size_factor=1.5,
                eval_attack_steps=10, eval_eps_linf=[0.0, 0.05, 0.1, 0.15], seed=0)


def bare(cfg: dict) -> float:
    """The bare loop in a fresh interpreter that imports only torch and trainables: no Ray, MLflow
    or pandas objects for Python's garbage collector to walk, the most favourable reference."""
    code = f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import bench_trainable_overhead as b; " \
           f"print(b.bare_loop(json.loads({json.dumps(json.dumps(cfg))})))"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def bare_loop(cfg: dict) -> float:
    import torch

    from trainables.train import Trainer

    torch.set_num_threads(1)
    warm_up = Trainer({**cfg, "train_subset": WARM_UP_SUBSET})
    for _ in warm_up.epochs():
        pass
    warm_up.evaluate()
    start = time.perf_counter()
    trainer = Trainer(cfg)
    for _ in trainer.epochs():
        pass
    trainer.evaluate()
    return time.perf_counter() - start


def trial(cfg: dict, workdir: Path) -> float:
    """Tune's time_total_s of the measured trial. A small trial runs first in the same (reused)
    worker, so the measured one sees a warm worker, as every trial but a worker's first does: the
    one-time imports are the orchestration benchmark's business, not training throughput."""
    from study_runs import run_benchmark_study

    fixed = {k: v for k, v in cfg.items() if k not in ("seed", "train_subset")}
    spec = {"description": "a warm-up trial, then the measured trial", "seeds": [cfg["seed"]],
            "factors": {"train_subset": [WARM_UP_SUBSET, cfg["train_subset"]]}, "fixed": fixed,
            "resources": {"cpu": 1, "gpu": 0}}
    outcome = run_benchmark_study(workdir, "one", spec, max_concurrent=1)
    measured = [m for m in outcome.trial_metrics if m["config"]["cell"]["train_subset"] == cfg["train_subset"]]
    return float(measured[0]["time_total_s"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cfg = config(args)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        trial_seconds = trial(cfg, Path(folder))
    ray.shutdown()
    bare_seconds = bare(cfg)
    print(f"bare Trainer + evaluate: {bare_seconds:.1f} s")
    print(f"one orchestrated trial:  {trial_seconds:.1f} s (Tune's time_total_s: the trial function until its last report)")
    print(f"throughput ratio bare / trial: {bare_seconds / trial_seconds:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
