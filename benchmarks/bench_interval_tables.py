"""What the intervals over seeds and test examples add to the end of a run.

The main job's shape (weight_sweep default: 4 λ × 3 seeds × 6 ε_test × 1,000 test examples) as
results rows with per-example correctness, read back through the real Parquet writer and reader;
timed: the end-of-run robustness table and paired differences (orchestrator.summary) and the
report's two interval tables, with the `correct` column (crossed bootstrap, the default 2,000
replicates) and without it (the t-interval over seeds, the reference, same run). The first call
in a process pays for drawing the bootstrap's example weights once; both are printed.

    python benchmarks/bench_interval_tables.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from orchestrator import intervals, results  # noqa: E402
from orchestrator.spec import load_study  # noqa: E402
from orchestrator.interval_tables import interval_report_tables  # noqa: E402
from orchestrator.summary import paired_difference_text, robustness_table  # noqa: E402
from trainables.correct_bits import pack_correct  # noqa: E402

LAMBDAS = (0.0, 0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)
EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
N = 1000


def rows_of(lam: float, seed: int, rng) -> list[dict]:
    config = dict(dataset="fashion_mnist", arch="small_cnn", ssl_task="rotation", ssl_weight=lam,
                  attack_variant="joint", init="scratch", norm_train="linf", eps_train=0.1, train_attack_steps=3,
                  rotations="all", seed=seed)
    now = dt.datetime.now(dt.timezone.utc)
    difficulty = np.linspace(-2, 2, N)
    correct = np.ones(N, bool)
    out = []
    for eps in EPS:  # nested masks, as the ascending-ε curve gives
        correct &= rng.random(N) < 1 / (1 + np.exp(-(difficulty + 2.5 - 12 * eps + 0.1 * lam)))
        out.append(dict(study="bench", trial_id="t", config_hash=f"h{lam:g}-{seed}".replace(".", "_"), node_id="n",
                        finished_at=now, config_json=json.dumps(config, sort_keys=True), norm="linf", eps_test=eps,
                        attack="apgd", n_examples=N, clean_acc=0.9, robust_acc=correct.sum() / N,
                        correct=pack_correct(correct), **config))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    storage = tempfile.mkdtemp()
    for lam in LAMBDAS:
        for seed in SEEDS:
            rows = rows_of(lam, seed, rng)
            results.write_trial(storage, "bench", rows[0]["config_hash"], rows)
    with_bits = results.load("bench", storage)
    without = with_bits.assign(correct=None)
    spec = load_study("weight_sweep")  # its factors: the table's lines

    def end_of_run(table) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        robustness_table(spec, table)
        paired_difference_text(spec, table)
        interval_report_tables(table, ["ssl_weight"])
        return time.perf_counter() - wall, time.process_time() - cpu

    end_of_run(with_bits)  # imports and pandas' first calls, outside the measurement
    timed = {"bootstrap": [], "t": []}
    for _ in range(args.repeats):  # alternating, each bootstrap run drawing its weights afresh
        intervals._example_weights.cache_clear()  # as at the end of a run: one process, one draw
        timed["bootstrap"].append(end_of_run(with_bits))
        timed["t"].append(end_of_run(without))
    print(f"{len(LAMBDAS)} λ × {len(SEEDS)} seeds × {len(EPS)} ε × {N} examples; end-of-run table + paired "
          f"differences + the report's two interval tables, median of {args.repeats} (wall / CPU seconds):")
    medians = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in timed.items()}
    (bw, bc), (tw, tc) = medians["bootstrap"], medians["t"]
    print(f"  crossed bootstrap ({intervals.DEFAULT_REPLICATES} replicates): {bw:.3f} / {bc:.3f}")
    print(f"  t-interval over seeds (reference):     {tw:.3f} / {tc:.3f}")
    print(f"  added by the bootstrap: {bw - tw:.3f} s wall, {bc - tc:.3f} s CPU; ratio bootstrap / t = "
          f"{bw / tw:.2f} wall, {bc / tc:.2f} CPU")


if __name__ == "__main__":
    main()
