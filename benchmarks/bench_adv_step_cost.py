"""Cost of one adversarial training step with k-step PGD against k+1 clean forward+backward passes.

    /work/venv/bin/python benchmarks/bench_adv_step_cost.py [--repeats 9] [--ks 3 10]

The adversarial step is what `Trainer.train_epoch` does per batch, through the Trainer's own
methods: `_adversarial` (k-step PGD l∞, ε=0.1, train-mode BN, random start), then `update_loss`,
backward and the optimiser step. The reference is k+1 clean forward+backward passes of the same
loss on the same batch (parameter gradients, no optimiser step), so the ratio is the overhead of
the attack machinery beyond its unavoidable network passes (target <= 1.15).

Two settings: plain adversarial training (ssl_task none, variant ce) and the joint rotation
variant (λ=0.5, one random rotation per image; its reference passes include the SSL views).
"""
from __future__ import annotations

import argparse

import common
from trainables.objectives import SSLBatch, update_loss
from trainables.train import Trainer


def make_trainer(k: int, ssl: bool) -> Trainer:
    extra = (dict(ssl_task="rotation", ssl_weight=0.5, attack_variant="joint", rotations="one")
             if ssl else dict(ssl_task="none", attack_variant="ce"))
    return Trainer(dict(train_subset=512, batch_size=128, eps_train=0.1, train_attack="pgd",
                        train_attack_steps=k, train_bn_mode="train", seed=0, **extra), device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    common.setup()
    print(common.machine())
    x, y = common.load_fmnist(args.batch, train=True)
    for ssl in (False, True):
        for k in args.ks:
            trainer = make_trainer(k, ssl)
            model = trainer.model
            labels = (trainer.task.sample(len(y), trainer.generator, trainer.device)
                      if ssl else None)
            batch = SSLBatch(trainer.task, 0.5, labels, False) if ssl else None

            def adversarial_step():
                model.train()
                x_adv = trainer._adversarial(x, y, batch)
                model.train()
                loss, _ = update_loss(model, x_adv, y, batch)
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()

            def clean_passes():
                model.train()
                for _ in range(k + 1):
                    loss, _ = update_loss(model, x, y, batch)
                    trainer.optimizer.zero_grad(set_to_none=True)
                    loss.backward()

            times = common.interleaved({"adversarial": adversarial_step, "clean": clean_passes},
                                       args.repeats)
            ratio, line = common.ratio_line("ratio", times, "adversarial", "clean")
            name = "joint rotation (one), λ=0.5" if ssl else "plain AT (ce, no SSL)"
            print(f"[{name}] k={k} batch={args.batch}")
            print(f"  adversarial step (PGD-{k} + update) {common.summary(times['adversarial'])}")
            print(f"  {k + 1} clean fwd+bwd             {common.summary(times['clean'])}")
            print(f"  {line}  (target <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'})")
    print(f"load average at end: {common.load_average()}")


if __name__ == "__main__":
    main()
