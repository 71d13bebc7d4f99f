"""PGD speed: trainables.attacks.pgd against torchattacks' PGD / PGDL2 on the same model and batch.

    /work/venv/bin/python benchmarks/bench_pgd_vs_torchattacks.py [--repeats 9] [--norms linf l2] [--n 512]

small_cnn trained for one epoch on 3,000 Fashion-MNIST images, 512 test images, 10 steps, random
start, eval mode for both. Prints the median time of each and the speed ratio
torchattacks / ours (>= 1.0 means ours is at least as fast).
"""
from __future__ import annotations

import argparse

import torch
import torchattacks

import common
from trainables.attacks import pgd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--norms", nargs="+", default=["linf", "l2"], choices=["linf", "l2"])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    common.setup()
    print(common.machine())
    model = common.trained_model(adversarial=False, subset=3000, epochs=1)
    x, y = common.load_fmnist(args.n, train=False)
    settings = {"linf": (0.1, 2.5 * 0.1 / args.steps), "l2": (1.5, 2.5 * 1.5 / args.steps)}
    for norm in args.norms:
        eps, alpha = settings[norm]
        reference = (torchattacks.PGD(model, eps=eps, alpha=alpha, steps=args.steps, random_start=True)
                     if norm == "linf" else
                     torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=args.steps, random_start=True))
        fns = {
            "ours": lambda: pgd(model, x, y, norm=norm, eps=eps, step_size=alpha, steps=args.steps,
                                random_start=True, bn_mode="eval"),
            "torchattacks": lambda: reference(x, y),
        }
        times = common.interleaved(fns, args.repeats)
        ratio, line = common.ratio_line("speed ratio torchattacks/ours", times, "torchattacks", "ours")
        x_ours, x_ref = fns["ours"](), fns["torchattacks"]()
        with torch.no_grad():
            acc_ours = (model(x_ours).argmax(1) == y).float().mean().item()
            acc_ref = (model(x_ref).argmax(1) == y).float().mean().item()
        print(f"[{norm}] eps={eps} alpha={alpha:.4f} steps={args.steps} n={args.n}")
        print(f"  ours         {common.summary(times['ours'])}  robust acc {acc_ours:.3f}")
        print(f"  torchattacks {common.summary(times['torchattacks'])}  robust acc {acc_ref:.3f}")
        print(f"  {line}  (target >= 1.0: {'met' if ratio >= 1.0 else 'MISSED'})")
    print(f"load average at end: {common.load_average()}")


if __name__ == "__main__":
    main()
