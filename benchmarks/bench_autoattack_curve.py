"""Our AutoAttack curve against torchattacks' AutoAttack, and each member attack against its
torchattacks counterpart.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_autoattack_curve.py [--n 500] [--per-attack] [--skip-curve]

Model: small_cnn PGD-3 adversarially trained at ε = 0.1 with the project's Trainer (3,000
Fashion-MNIST images, 2 epochs, as the tests' session model). Ours: `robust_accuracy_curve(...,
attack="autoattack")` over the 6 positive ε of the default Fashion-MNIST l∞ grid, ascending, each
ε attacking only the examples still robust (and FAB-T searching each example's targets once for the
whole curve). Reference: AutoAttack's standard version built from
torchattacks 3.5.1's APGD, APGDT, FAB and Square at the published budgets (`torchattacks_autoattack`;
that library's own `AutoAttack(version="standard")` runs 10 steps, not 100), run on all examples at
each ε separately (what a user of that library does). Targets:
time ratio ours / reference ≤ 0.35, and at every ε our accuracy within 0.01 of the reference and
never above it by more than 0.01. `--per-attack`: APGD-CE, APGD-T, FAB-T and Square alone at
ε = 0.1 against torchattacks' APGD, APGDT, FAB (multi-targeted) and Square, on the same images.
Both wall and CPU seconds are printed: CPU seconds keep the ratio readable on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchattacks

import common
from trainables.apgd import apgd, apgd_targeted
from trainables.config import default_eps_grid
from trainables.evaluate import robust_accuracy_curve
from trainables.fab import fab_targeted
from trainables.square import square


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--per-attack", action="store_true")
    parser.add_argument("--skip-curve", action="store_true",
                        help="only the per-attack comparison (its accuracies do not depend on the machine's load)")
    args = parser.parse_args()
    common.setup()
    print(common.machine(), "| load", common.load_average(), flush=True)
    model = common.trained_model(adversarial=True, subset=3000, epochs=2).eval()
    x, y = common.load_fmnist(args.n, train=False)
    grid = default_eps_grid("fashion_mnist", "linf")

    if not args.skip_curve:
        curve(model, x, y, grid)
    if args.per_attack:
        per_attack(model, x, y)


def torchattacks_autoattack(model, eps: float):
    """AutoAttack's standard version (Croce and Hein 2020) from torchattacks' attacks, at the
    published budgets: APGD-CE, APGD-T (9 targets) and FAB-T (9 targets) with 100 steps each, Square
    with 5,000 queries, each on the points the earlier ones left robust (torchattacks' MultiAttack).
    torchattacks 3.5.1's own `AutoAttack(version="standard")` leaves APGD, APGD-T and FAB at their
    default 10 steps: a weaker and cheaper reference than AutoAttack."""
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, loss="ce", n_restarts=1, seed=0),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_classes=10, n_restarts=1, seed=0),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, multi_targeted=True, n_classes=10, n_restarts=1,
                         seed=0),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
    ])


def curve(model, x, y, grid) -> None:
    start, start_cpu = time.perf_counter(), time.process_time()
    records = robust_accuracy_curve(model, x, y, "linf", grid, attack="autoattack")
    ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    ours = {r["eps_test"]: r["robust_acc"] for r in records}
    print(f"ours: {ours_s:.0f} s ({ours_cpu:.0f} CPU s); fooled_by per ε: {[r['fooled_by'] for r in records[1:]]}",
          flush=True)
    ref, ref_s, ref_cpu = {0.0: records[0]["robust_acc"]}, 0.0, 0.0
    for eps in grid[1:]:
        start, start_cpu = time.perf_counter(), time.process_time()
        adv = torchattacks_autoattack(model, eps)(x, y)
        ref_s, ref_cpu = ref_s + time.perf_counter() - start, ref_cpu + time.process_time() - start_cpu
        ref[eps] = accuracy(model, adv, y)
        print(f"  eps {eps:<6g} ours {ours[eps]:.3f}  torchattacks {ref[eps]:.3f}  diff {ours[eps] - ref[eps]:+.3f}",
              flush=True)
    worst = max(abs(ours[e] - ref[e]) for e in grid)
    above = max(ours[e] - ref[e] for e in grid)
    # CPU seconds as well as wall seconds: on a shared machine the CPU-time ratio is the one to read
    print(f"time: ours {ours_s:.0f} s, torchattacks {ref_s:.0f} s, ratio {ours_s / ref_s:.3f} (target <= 0.35); "
          f"CPU time: ours {ours_cpu:.0f} s, torchattacks {ref_cpu:.0f} s, ratio {ours_cpu / ref_cpu:.3f}")
    print(f"accuracy: largest |ours - torchattacks| {worst:.3f} (target <= 0.01); ours above by at most {above:+.3f}")
    print("load", common.load_average(), flush=True)


def per_attack(model, x, y) -> None:
    """APGD-CE, APGD-T, FAB-T and Square alone at ε = 0.1 against their torchattacks counterparts."""
    eps = 0.1
    pairs = {
        "APGD-CE": (lambda: apgd(model, x, y, "ce", "linf", eps, 100, generator=torch.Generator().manual_seed(0)),
                    lambda: torchattacks.APGD(model, eps=eps, steps=100, loss="ce")(x, y)),
        "APGD-T": (lambda: apgd_targeted(model, x, y, "linf", eps, 100, 9, generator=torch.Generator().manual_seed(0)),
                   lambda: torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10)(x, y)),
        "FAB-T": (lambda: fab_targeted(model, x, y, "linf", eps, 100, 9),
                  lambda: torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10)(x, y)),
        "Square": (lambda: square(model, x, y, "linf", eps, 5000, generator=torch.Generator().manual_seed(0)),
                   lambda: torchattacks.Square(model, eps=eps, n_queries=5000)(x, y)),
    }
    for name, (ours, ref) in pairs.items():
        t0 = time.perf_counter(); a = accuracy(model, ours(), y); t1 = time.perf_counter()
        b = accuracy(model, ref(), y); t2 = time.perf_counter()
        print(f"{name:8s} eps {eps}: ours {a:.3f} ({t1 - t0:.0f} s)  torchattacks {b:.3f} ({t2 - t1:.0f} s)  "
              f"diff {a - b:+.3f}  {'OK' if abs(a - b) <= 0.01 else 'OUTSIDE 0.01'}", flush=True)


if __name__ == "__main__":
    main()
