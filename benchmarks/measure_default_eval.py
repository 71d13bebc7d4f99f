"""How far the default evaluation is from AutoAttack on the models the default weight_sweep trains.

Loads each trial's last Ray Tune checkpoint of a finished `weight_sweep` run, and evaluates it on the
study's test images with each candidate evaluation (the ascending-ε curve of trainables.evaluate) and
with the standard AutoAttack; prints robust accuracy per ε, the largest excess over AutoAttack
(positive: the candidate overstates robustness) and the seconds each took.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/measure_default_eval.py /tmp/i17runs/tune/weight_sweep-*/ \
        --images 500 --trials 00000 00002 00004 00006
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.spec import load_study  # noqa: E402
from trainables.config import resolve  # noqa: E402
from trainables.evaluate import robust_accuracy_curve  # noqa: E402
from trainables.train import Trainer  # noqa: E402

CANDIDATES = {
    "pgd10": dict(attack="pgd", steps=10, stop_on_success=True),
    "apgd_s10_t1": dict(attack="apgd", apgd_steps=10, target_classes=1),
    "apgd_s20_t1": dict(attack="apgd", apgd_steps=20, target_classes=1),
    "apgd_s20_t3": dict(attack="apgd", apgd_steps=20, target_classes=3),
    "autoattack": dict(attack="autoattack"),
}


def load_trial(trial_dir: str, fixed: dict):
    cell = json.load(open(os.path.join(trial_dir, "params.json")))["cell"]
    config = resolve({**fixed, **cell})
    checkpoint = sorted(glob.glob(os.path.join(trial_dir, "checkpoint_*")))[-1]
    state = torch.load(os.path.join(checkpoint, "trial_state.pt"), map_location="cpu", weights_only=False)
    trainer = Trainer(config, device="cpu")
    trainer.load_state_dict(state["trainer"])
    trainer.model.eval()
    return cell, config, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tune_dir")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--trials", nargs="*", default=None, help="trial-id suffixes, e.g. 00000")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    fixed = load_study("weight_sweep").fixed
    dirs = sorted(d for d in glob.glob(os.path.join(args.tune_dir, "*_0*")) if os.path.isdir(d))
    if args.trials:
        dirs = [d for d in dirs if any(os.path.basename(d).split("_")[1] == t for t in args.trials)]
    for trial_dir in dirs:
        cell, config, trainer = load_trial(trial_dir, fixed)
        data = trainer.test_data()
        x, y = data.images.float()[: args.images] / 255, data.labels[: args.images]
        grid = config["eval_eps_linf"]
        curves, seconds = {}, {}
        for name in args.candidates:
            start = time.perf_counter()
            records = robust_accuracy_curve(trainer.model, x, y, "linf", grid, seed=config["seed"],
                                            **CANDIDATES[name])
            seconds[name] = time.perf_counter() - start
            curves[name] = [r["robust_acc"] for r in records]
            if name == "autoattack":
                print("  autoattack fooled_by:", [r["fooled_by"] for r in records], flush=True)
        from trainables.masking import fired, masking_checks

        start = time.perf_counter()
        checks = masking_checks(trainer.model, x, y, "linf", config["eps_train"], still_robust=None)
        print(f"  masking checks: fired {fired(checks)} in {time.perf_counter() - start:.1f} s: "
              + ", ".join(f"{k} {v:.3f}" for k, v in checks.items() if k.endswith("_value")), flush=True)
        print(f"trial {os.path.basename(trial_dir)} λ={cell['ssl_weight']} seed={cell['seed']} "
              f"({len(y)} images); ε = {grid}", flush=True)
        for name in args.candidates:
            excess = max(a - b for a, b in zip(curves[name], curves["autoattack"])) if "autoattack" in curves else float("nan")
            print(f"  {name:12s} {' '.join(f'{a:.3f}' for a in curves[name])}  max excess {excess:+.3f}  "
                  f"{seconds[name]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
