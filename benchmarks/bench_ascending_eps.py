"""Ascending-ε robustness curve against attacking every example at every ε.

    /work/venv/bin/python benchmarks/bench_ascending_eps.py [--n 500] [--steps 10] [--repeats 1]

`robust_accuracy_curve` takes ε in ascending order and attacks only the examples still classified
correctly; `attack_all=True` attacks every clean-correct example at every ε (the reference). Both
run on the 7-point default Fashion-MNIST l∞ grid (0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3), PGD with
step 2.5·ε/steps and a random start, on two small_cnn models trained here with the project's
Trainer (3,000 images, 2 epochs): one PGD-3 adversarially trained at ε = 0.1 (target: ascending
takes <= 0.7x the time of attack_all) and one standard-trained (reported too).

A third variant, `ascending_stop`, also stops attacking an example at the first PGD iterate that
fools it (attack "pgd_any_iterate", `eval_stop_on_success: true`, what studies run by default); its
ratio is against the same attack_all reference, with the accuracies printed so any difference the
protocol makes is visible.
"""
from __future__ import annotations

import argparse
import time

import common
from trainables.config import default_eps_grid
from trainables.evaluate import robust_accuracy_curve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    common.setup()
    print(common.machine())
    grid = default_eps_grid("fashion_mnist", "linf")
    x, y = common.load_fmnist(args.n, train=False)
    for name, adversarial in (("adversarially trained (PGD-3, eps 0.1)", True), ("standard-trained", False)):
        start = time.perf_counter()
        model = common.trained_model(adversarial, subset=args.train_subset, epochs=args.epochs)
        train_seconds = time.perf_counter() - start
        curves = {}

        def run(attack_all: bool, stop: bool = False):
            curves[attack_all, stop] = robust_accuracy_curve(
                model, x, y, "linf", grid, steps=args.steps, step_size_factor=2.5, batch_size=500,
                seed=0, attack_all=attack_all, stop_on_success=stop)

        times = common.interleaved({"ascending": lambda: run(False), "attack_all": lambda: run(True),
                                    "ascending_stop": lambda: run(False, True)}, args.repeats, warmup=0)
        ratio, line = common.ratio_line("time ratio ascending/attack_all", times, "ascending", "attack_all")
        ratio_stop, line_stop = common.ratio_line("time ratio ascending_stop/attack_all", times,
                                                  "ascending_stop", "attack_all")
        asc = [r["robust_acc"] for r in curves[False, False]]
        every = [r["robust_acc"] for r in curves[True, False]]
        stop = [r["robust_acc"] for r in curves[False, True]]
        # Fraction attacked at each ε > 0: the clean-correct ones at the first, then the survivors.
        attacked_asc = sum(asc[:-1])
        print(f"[{name}] trained in {train_seconds:.0f} s; n={args.n}, PGD-{args.steps}, grid {grid}")
        print(f"  ascending      {common.summary(times['ascending'])}")
        print(f"  attack_all     {common.summary(times['attack_all'])}")
        print(f"  ascending_stop {common.summary(times['ascending_stop'])}")
        print("  accuracy ascending      " + " ".join(f"{a:.3f}" for a in asc))
        print("  accuracy attack_all     " + " ".join(f"{a:.3f}" for a in every))
        print("  accuracy ascending_stop " + " ".join(f"{a:.3f}" for a in stop))
        print(f"  examples attacked: ascending {attacked_asc * args.n:.0f}, attack_all "
              f"{asc[0] * (len(grid) - 1) * args.n:.0f} (ratio {attacked_asc / (asc[0] * (len(grid) - 1)):.3f})")
        def verdict(r):
            return " (target <= 0.7: " + ("met" if r <= 0.7 else "MISSED") + ")" if adversarial else ""
        print(f"  {line}{verdict(ratio)}")
        print(f"  {line_stop}{verdict(ratio_stop)}")
    print(f"load average at end: {common.load_average()}")


if __name__ == "__main__":
    main()
