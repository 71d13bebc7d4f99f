"""How far candidate evaluations are from AutoAttack on the models a finished weight_sweep kept.

Loads each kept model of the study (`orchestrator.models_store.load_model`), takes the study's own
test images (the trial's `test_subset` draw), and evaluates it with each candidate (the ascending-ε
curve of trainables.evaluate) and with the standard AutoAttack over the same grid. Prints robust
accuracy per ε, the largest excess over AutoAttack (positive: the candidate overstates robustness)
and the seconds each took on this machine.

    cd /tmp/ws && python -m orchestrator.study weight_sweep --set eval_attack=pgd   # trains the models
    OMP_NUM_THREADS=1 python /path/to/benchmarks/measure_default_eval.py --storage /tmp/ws/runs \
        [--seeds 0] [--candidates pgd10 apgd_s10_t1 apgd_s20_t3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.models_store import load_model, models_dir  # noqa: E402
from trainables.data import load_split  # noqa: E402
from trainables.train import DATA_SELECTION_SEED  # noqa: E402
from trainables.evaluate import robust_accuracy_curve  # noqa: E402

CANDIDATES = {
    "pgd10": dict(attack="pgd", steps=10, stop_on_success=True),
    "apgd_s5_t1": dict(attack="apgd", apgd_steps=5, target_classes=1),
    "apgd_s10_t1": dict(attack="apgd", apgd_steps=10, target_classes=1),
    "apgd_s10_t3": dict(attack="apgd", apgd_steps=10, target_classes=3),
    "apgd_s20_t1": dict(attack="apgd", apgd_steps=20, target_classes=1),
    "apgd_s20_t3": dict(attack="apgd", apgd_steps=20, target_classes=3),
    "apgd_s25_t3": dict(attack="apgd", apgd_steps=25, target_classes=3),
    "apgd_s25_t2": dict(attack="apgd", apgd_steps=25, target_classes=2),
    "apgd_s50_t2": dict(attack="apgd", apgd_steps=50, target_classes=2),
    "apgd_s50_t1": dict(attack="apgd", apgd_steps=50, target_classes=1),
    "apgd_s50_t3": dict(attack="apgd", apgd_steps=50, target_classes=3),
    "apgd_s100_t1": dict(attack="apgd", apgd_steps=100, target_classes=1),
    "apgd_s100_t3": dict(attack="apgd", apgd_steps=100, target_classes=3),
    "apgd_s50_t5": dict(attack="apgd", apgd_steps=50, target_classes=5),
    "apgd_s75_t3": dict(attack="apgd", apgd_steps=75, target_classes=3),
    "apgd_s75_t2": dict(attack="apgd", apgd_steps=75, target_classes=2),
    "apgd_s60_t3": dict(attack="apgd", apgd_steps=60, target_classes=3),
    # the attacks' passes in bf16 (where the CPU computes it natively), every verdict in fp32
    "apgd_s75_t3_bf16": dict(attack="apgd", apgd_steps=75, target_classes=3, precision="bf16"),
    "apgd_s100_t3_bf16": dict(attack="apgd", apgd_steps=100, target_classes=3, precision="bf16"),
    # AutoAttack's gradient part (APGD-CE, APGD-T over 9 targets, 100 steps each): on CPU the
    # full version's Square (5000 queries per robust point and ε) costs ~240x PGD-10.
    "apgd_s100_t9": dict(attack="apgd", apgd_steps=100, target_classes=9),
    "autoattack": dict(attack="autoattack"),
}


def kept_hashes(storage: str, study: str) -> list[str]:
    folder = models_dir(storage, study)
    return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".json"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default="runs")
    parser.add_argument("--study", default="weight_sweep")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="only models of these seeds")
    parser.add_argument("--ssl-weights", type=float, nargs="*", default=None, help="only models of these λ")
    parser.add_argument("--images", type=int, default=None, help="first N of the study's test images")
    parser.add_argument("--candidates", nargs="*", default=["pgd10", "apgd_s10_t1", "apgd_s20_t3"])
    parser.add_argument("--reference", default="autoattack", choices=["autoattack", "apgd_s100_t9", "none"],
                        help="none: candidates only (compare with a reference printed by an earlier run)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many of the study's test images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = args.reference
    names = [c for c in args.candidates if c != reference] + ([reference] if reference != "none" else [])
    excess = {name: [] for name in names}
    for config_hash in kept_hashes(args.storage, args.study):
        model, config = load_model(args.study, config_hash, args.storage)
        if args.seeds is not None and config["seed"] not in args.seeds:
            continue
        if args.ssl_weights is not None and config["ssl_weight"] not in args.ssl_weights:
            continue
        data = load_split(config["dataset"], False, None, config["test_subset"], DATA_SELECTION_SEED)
        x, y = data.images.float() / 255, data.labels
        end = args.offset + args.images if args.images else None
        x, y = x[args.offset: end], y[args.offset: end]
        grid = config["eval_eps_linf"]
        curves, seconds = {}, {}
        for name in names:
            start = time.perf_counter()
            records = robust_accuracy_curve(model, x, y, "linf", grid, seed=config["seed"], **CANDIDATES[name])
            seconds[name] = time.perf_counter() - start
            curves[name] = [r["robust_acc"] for r in records]
        print(f"model {config_hash} λ={config['ssl_weight']} seed={config['seed']} ({len(y)} images); "
              f"ε = {grid}", flush=True)
        if records[-1].get("fooled_by"):
            print(f"  {names[-1]} fooled_by:", json.dumps([r.get("fooled_by") for r in records[1:]]), flush=True)
        for name in names:
            if reference == "none":
                print(f"  {name:12s} {' '.join(f'{a:.3f}' for a in curves[name])}  {seconds[name]:.1f} s", flush=True)
                continue
            worst = max(a - b for a, b in zip(curves[name], curves[reference]))
            excess[name].append(worst)
            print(f"  {name:12s} {' '.join(f'{a:.3f}' for a in curves[name])}  max excess {worst:+.3f}  "
                  f"{seconds[name]:.1f} s", flush=True)
    print(f"largest excess over {reference} across models:",
          ", ".join(f"{name} {max(v):+.3f}" for name, v in excess.items() if v), flush=True)


if __name__ == "__main__":
    main()
