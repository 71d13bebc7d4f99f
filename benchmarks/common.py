"""Shared helpers of the benchmark scripts: threads, data, small trained models, fair timing.

Every benchmark measures its reference in the same process and interleaves the measured
functions (A B, B A, A B, ...) so that load from other processes on the machine hits both alike;
the headline figure is the median of the paired ratios (see `ratio_line`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def setup(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} CPU, "
            f"{torch.get_num_threads()} threads, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def load_fmnist(n: int, train: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n Fashion-MNIST images as float32 (n, 1, 28, 28) in [0, 1] and their labels."""
    from trainables.data import load_split, to_float

    split = load_split("fashion_mnist", train, subset=n, seed=seed, device="cpu")
    return to_float(split.images), split.labels


def trained_model(adversarial: bool, subset: int = 5000, epochs: int = 2, eps: float = 0.1,
                  seed: int = 0):
    """A small_cnn trained on a Fashion-MNIST subset with the project's Trainer: standard training
    (eps_train=0) or plain PGD-3 adversarial training (variant ce, no SSL), in eval mode."""
    from trainables.train import Trainer

    trainer = Trainer(
        dict(train_subset=subset, epochs=epochs, ssl_task="none", attack_variant="ce",
             eps_train=eps if adversarial else 0.0, train_attack_steps=3, seed=seed),
        device="cpu",
    )
    for _ in trainer.epochs():
        pass
    trainer.model.eval()
    return trainer.model


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, run in turn `repeats` times after `warmup` rounds, the
    order alternating between rounds.
    The process CPU seconds of the same runs are under "<name>:cpu" (less sensitive to other
    processes on a shared machine than wall time, though not immune: threads wait for cores)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    times.update({name + ":cpu": [] for name in fns})
    for i in range(repeats):
        # Alternate the order (A B, B A, ...) so neither function always runs first.
        order = list(fns.items()) if i % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            cpu, start = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            times[name + ":cpu"].append(time.process_time() - cpu)
    return times


def ratio_line(label: str, times: dict[str, list[float]], num: str, den: str) -> tuple[float, str]:
    """num/den as the median of the paired ratios (run i of num against run i of den, measured back
    to back, so both saw about the same load from other processes): the headline figure. Also
    reported: the ratio of the fastest runs, and of the median process CPU times."""
    paired = median([a / b for a, b in zip(times[num], times[den])])
    fastest = min(times[num]) / min(times[den])
    cpu = median(times[num + ":cpu"]) / median(times[den + ":cpu"])
    return paired, (f"{label} = {paired:.3f} (median of {len(times[num])} paired wall-clock ratios; "
                    f"fastest runs {fastest:.3f}; CPU time {cpu:.3f})")


def median(values: list[float]) -> float:
    return statistics.median(values)


def summary(values: list[float]) -> str:
    q = sorted(values)
    return f"median {statistics.median(q) * 1000:.1f} ms (min {q[0] * 1000:.1f}, max {q[-1] * 1000:.1f}, n={len(q)})"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
